"""hook_typo: a test plugin with a misspelt hook name, which the loader refuses."""

from qpgevent.plugin import DECLINED, Plugin


class HookTypo(Plugin):
    def hook_mial(self, session, sender, params):
        return DECLINED
