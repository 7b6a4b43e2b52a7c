"""blocker: a test plugin that blocks its worker's event loop, as a badly written plugin would.

At ``mail``, a sender whose local part is ``block`` makes it call the real (unpatched)
``time.sleep`` for ``seconds``: no other greenlet of the worker runs meanwhile. Every
other sender is declined at once.

Options:
  seconds  how long to block (default 300)
"""

import gevent.monkey

from qpgevent.plugin import DECLINED, Plugin

blocking_sleep = gevent.monkey.get_original("time", "sleep")


class Blocker(Plugin):
    configspec = "seconds = float(default=300)"

    def hook_mail(self, session, sender, params):
        if sender.user == "block":
            blocking_sleep(self.config["seconds"])
        return DECLINED
