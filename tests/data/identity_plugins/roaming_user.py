"""roaming_user: a test plugin standing in for AUTH, which is not built yet.

At MAIL, a sender listed in ``senders`` makes the client a relay client, as a
successful AUTH would (qpsmtpd's Auth does ``relay_client(1)``): the case of a roaming
user on an address some check refused.

Options:
  senders  addresses that "authenticate" (default roaming@example.test)
"""

from qpgevent.plugin import DECLINED, Plugin


class RoamingUser(Plugin):
    configspec = 'senders = force_list(default=list("roaming@example.test"))'

    def hook_mail(self, session, sender, params):
        if sender.address.lower() in self.config["senders"]:
            session.connection.relay_client = True
        return DECLINED
