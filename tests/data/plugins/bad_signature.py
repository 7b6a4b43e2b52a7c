"""bad_signature: a test plugin whose hook_mail misses arguments, which the loader refuses."""

from qpgevent.plugin import DECLINED, Plugin


class BadSignature(Plugin):
    def hook_mail(self, session):
        return DECLINED
