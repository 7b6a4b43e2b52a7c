"""hold_mail: hook_mail makes the file ``release``.entered, then waits until the file named by
``release`` exists. Tests only: it lets a test act (reset the connection) while the server has
a reply still to write."""
from pathlib import Path

from qpgevent.plugin import DECLINED, Plugin
from qpgevent.testing import wait_until


class HoldMail(Plugin):
    configspec = "release = string()"

    def hook_mail(self, session, sender, params):
        Path(self.config["release"] + ".entered").touch()
        wait_until(Path(self.config["release"]).exists, timeout=20, what="the test's release file")
        return DECLINED
