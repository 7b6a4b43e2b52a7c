"""hosts_allow: limit concurrent connections per client address, and refuse listed hosts.

Runs at ``pre_connection``, before anything is said to the client.

- ``max_conn_ip``: more than this many sessions at once from one address get
  ``421 4.7.0 too many connections from <ip>, try again later``. 0: no limit. The
  sessions are counted over all worker processes, whichever one accepted them. An IPv6
  client is counted with its whole /64 (``ipv6_prefix``): one end site usually has a
  /64, 2**64 addresses to spread its connections over; the reply then names the /64.
- ``rules``: lines ``NETWORK ACTION [message]``, first match wins. ACTION is one of
  OK (skip the limit), DENY (554, close) or DENYSOFT (421, close).
- ``exempt``: networks the per-address limit does not apply to.

Options:
  max_conn_ip  sessions at once per address (default 0: no limit)
  rules        ``NETWORK ACTION [message]`` lines, first match wins (default: none)
  exempt       networks without the per-address limit (default: none)
  ipv4_prefix  IPv4 clients are counted per network of this length (default 32: per address)
  ipv6_prefix  IPv6 clients are counted per network of this length (default 64)

Example::

    [[hosts_allow]]
      max_conn_ip = 20
      rules = "192.0.2.0/24 DENY spam source", "198.51.100.7 OK"
"""

import ipaddress

from qpgevent.plugin import DECLINED, DENY, DENYSOFT, OK, Plugin, ip_in

_ACTIONS = {"OK": OK, "DENY": DENY, "DENYSOFT": DENYSOFT}


class HostsAllow(Plugin):
    configspec = """
    max_conn_ip = integer(min=0, default=0)
    rules = force_list(default=list())
    exempt = force_list(default=list())
    ipv4_prefix = integer(min=0, max=32, default=32)
    ipv6_prefix = integer(min=0, max=128, default=64)
    """

    def setup(self):
        self.rules = []
        for rule in self.config["rules"]:
            words = rule.split(None, 2)
            if len(words) < 2 or words[1].upper() not in _ACTIONS:
                raise ValueError(f"rule {rule!r}: write NETWORK OK|DENY|DENYSOFT [message]")
            network = ipaddress.ip_network(words[0], strict=False)
            self.rules.append((network, _ACTIONS[words[1].upper()], words[2] if len(words) > 2 else None))
        self.exempt = [ipaddress.ip_network(n, strict=False) for n in self.config["exempt"]]

    def hook_pre_connection(self, session):
        ip = session.connection.remote_ip
        for network, action, message in self.rules:
            if ip_in(ip, [network]):
                if action is OK:
                    return DECLINED
                return action, message or f"{ip} is not welcome here"
        limit = self.config["max_conn_ip"]
        if limit and not ip_in(ip, self.exempt):
            counted = self.counted_as(ip)
            if session.concurrent_connections(counted) > limit:
                return DENYSOFT, f"too many connections from {counted}, try again later"
        return DECLINED

    def counted_as(self, ip):
        """The address, or the network (``2001:db8:1:2::/64``), whose sessions count for ``ip``."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:  # not an IP address (a Unix socket peer): counted alone
            return ip
        prefix = self.config["ipv4_prefix" if address.version == 4 else "ipv6_prefix"]
        if prefix == address.max_prefixlen:
            return ip
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
