"""relay: let listed client addresses relay mail to any domain.

At connect, a client whose address is in ``clients`` (IPs or CIDR networks, IPv4 or
IPv6) becomes a relay client (``connection.relay_client``), unless it is also in
``never``. ``rcpt_ok`` then accepts any recipient from it.

Options:
  clients  addresses / networks allowed to relay (default: none)
  never    addresses / networks never allowed to relay, even if in ``clients``
  only     if true, refuse every recipient from clients that may not relay (a
           submission-only port): 550 5.7.1 Relaying denied

Example::

    [[relay]]
      clients = 192.0.2.0/24, 2001:db8::/32
"""

import ipaddress

from qpgevent.plugin import DECLINED, DENY, Plugin, ip_in


class Relay(Plugin):
    configspec = """
    clients = force_list(default=list())
    never = force_list(default=list())
    only = boolean(default=False)
    """

    def setup(self):
        self.clients = [ipaddress.ip_network(n, strict=False) for n in self.config["clients"]]
        self.never = [ipaddress.ip_network(n, strict=False) for n in self.config["never"]]

    def hook_connect(self, session):
        ip = session.connection.remote_ip
        if ip_in(ip, self.clients) and not ip_in(ip, self.never):
            session.connection.relay_client = True
            self.log.info("%s may relay", ip)
        return DECLINED

    def hook_rcpt(self, session, recipient, params):
        if self.config["only"] and not session.connection.relay_client:
            return DENY, "5.7.1 Relaying denied"
        return DECLINED
