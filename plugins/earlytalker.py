"""earlytalker: refuse clients that talk before our greeting.

RFC 5321 3.1: a client waits for the 220 greeting before it sends anything. Spam
engines often do not. At connect this plugin waits ``wait`` seconds before the greeting;
a client that sends anything meanwhile is refused with
``554 5.7.1 Connecting host started transmitting before SMTP greeting`` (or as the
standard ``reject`` / ``reject_type`` options say; ``reject = 0`` only records it).
Relay clients are not delayed.

Options:
  wait  seconds to wait before the greeting (default 1)

Results: ``connection.results.get("earlytalker")`` fails ``early talker`` when the client
talked early (whatever ``reject`` says), passes ``waited`` when it waited.

Example::

    [[earlytalker]]
      wait = 2
"""

from qpgevent.plugin import DECLINED, Plugin


class Earlytalker(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = "wait = float(min=0, default=1.0)"

    def hook_connect(self, session):
        if self.is_immune(session):
            return DECLINED
        if session.wait_for_input(self.config["wait"]):
            session.connection.results.add(self, fail="early talker")
            self.log.info("%s talked before the greeting", session.connection.remote_ip)
            return self.reject("Connecting host started transmitting before SMTP greeting", session)
        session.connection.results.add(self, pass_="waited")
        return DECLINED
