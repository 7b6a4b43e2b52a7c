"""whitelist: mark hosts, HELO names, senders and recipients as exempt from checks.

Put it first: it only sets notes, which later plugins read.

- connect: a client whose address is in ``hosts`` (addresses or CIDR networks) gets
  the connection note ``whitelisthost``; ``Plugin.is_immune`` is then true for the
  whole session, so immune-aware plugins (badmailfrom, greylisting, karma, limit,
  earlytalker, ...) leave it alone.
- HELO/EHLO: a name in ``helos`` (any case) sets the connection note ``whitelisthelo``.
- MAIL: a sender in ``senders`` sets the transaction note ``whitelistsender`` (also
  read by ``is_immune``, for the rest of that transaction).
- RCPT: a recipient in ``recipients`` is added to the transaction note
  ``whitelistrcpt``, a set of addresses (lower case): greylisting skips those.

Senders and recipients are written as in ``badmailfrom``: ``user@example.com``,
``@example.com`` or ``example.com`` (the whole domain), ``/regex/``. Each list can
also come from a file, re-read when it changes (qpsmtpd's whitelisthosts,
whitelisthelo, whitelistsenders and whitelistrcpt files).

Unlike qpsmtpd's plugin, this one never answers OK: a whitelisted recipient is not
thereby accepted (rcpt_ok still decides, so whitelisting a recipient cannot open a
relay), and the other connect plugins still run. Host entries are networks, not
text prefixes (qpsmtpd's "192.0.2.1" also matched 192.0.2.10 to 192.0.2.19).

Options:
  hosts, hosts_file            addresses / networks, and a file of them
  helos, helos_file            HELO names
  senders, senders_file        envelope senders
  recipients, recipients_file  envelope recipients

Example::

    [[whitelist]]
      hosts = 192.0.2.0/24, 2001:db8::25
      senders = @partner.example
      recipients = postmaster@example.test, abuse@example.test
"""

from qpgevent.plugin import DECLINED, Plugin, ip_in
from qpgevent.policy import Entries, match_address, networks, parse_patterns


def parse_helos(entries):
    return [entry.lower() for entry in entries]


class Whitelist(Plugin):
    configspec = """
    hosts = force_list(default=list())
    hosts_file = path(default="")
    helos = force_list(default=list())
    helos_file = path(default="")
    senders = force_list(default=list())
    senders_file = path(default="")
    recipients = force_list(default=list())
    recipients_file = path(default="")
    """

    def setup(self):
        config = self.config
        self.hosts = Entries(config["hosts"], config["hosts_file"], networks)
        self.helos = Entries(config["helos"], config["helos_file"], parse_helos)
        self.senders = Entries(config["senders"], config["senders_file"], parse_patterns)
        self.recipients = Entries(config["recipients"], config["recipients_file"], parse_patterns)

    def hook_connect(self, session):
        ip = session.connection.remote_ip
        if ip_in(ip, self.hosts.get()):
            session.connection.notes["whitelisthost"] = True
            self.log.info("host %s is whitelisted", ip)
        return DECLINED

    def hook_helo(self, session, host):
        return self._hello(session, host)

    def hook_ehlo(self, session, host):
        return self._hello(session, host)

    def _hello(self, session, host):
        if host.lower() in self.helos.get():
            session.connection.notes["whitelisthelo"] = True
            self.log.info("HELO %s is whitelisted", host)
        return DECLINED

    def hook_mail(self, session, sender, params):
        if not sender.is_null and match_address(self.senders.get(), sender.address):
            session.transaction.notes["whitelistsender"] = True
            self.log.info("sender %s is whitelisted", sender.format())
        return DECLINED

    def hook_rcpt(self, session, recipient, params):
        if match_address(self.recipients.get(), recipient.address):
            session.transaction.notes.setdefault("whitelistrcpt", set()).add(recipient.address.lower())
            self.log.info("recipient %s is whitelisted", recipient.format())
        return DECLINED
