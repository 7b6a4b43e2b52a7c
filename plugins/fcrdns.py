"""fcrdns: require forward-confirmed reverse DNS of the client (qpsmtpd's fcrdns).

At connect, two checks, as qpsmtpd names them:

- has_reverse_dns: the client's address has a PTR name (in-addr.arpa, or ip6.arpa for
  IPv6). None: ``5.7.25 no reverse DNS for <ip>``.
- has_forward_dns: one of those names (up to 10) has an A record (AAAA for IPv6 clients)
  that gives the client's address back, or an address in the same /24 (IPv4) or /64
  (IPv6): pools of servers whose names and addresses are crossed (mx0 sends as mx1)
  pass, as in qpsmtpd. None: ``5.7.25 reverse DNS of <ip> is not confirmed``.

The refusal follows ``reject`` / ``reject_type``; with ``reject = naughty`` it waits for
the ``naughty`` plugin. A DNS that cannot answer now (SERVFAIL, timeout) is a temporary
refusal (``4.7.25``), whatever ``reject_type`` says: a perm refusal must rest on an
answer. When the core already confirmed the name at connect (``[dns] reverse_lookup``,
``connection.remote_host`` set) the plugin asks nothing more; when the core's look-up
timed out it does not ask again either. Otherwise it looks up itself (answers the core
got come from the cache). Relay clients and whitelisted hosts are not checked: list
local clients (127.0.0.1) in ``relay``.

Unlike qpsmtpd's: it refuses (qpsmtpd's documented reject options were never used, and
names whose addresses do not match passed), and it matches IPv6 networks too.

Options:
  ipv4_prefix  bits an IPv4 forward address must share with the client (default 24; 32: exact)
  ipv6_prefix  the same for IPv6 (default 64; 128: exact)
  reject, reject_type  as every plugin (default: refuse, perm)

Results: reads the core's ``connection.results.get("reverse_lookup")`` (pass, fail, or
err when it timed out); records ``connection.results.get("fcrdns")``: pass, fail or err
``iprev``, with the evidence ``iprev`` (RFC 8601 2.7.3: pass, fail, permerror,
temperror; the Authentication-Results header reads it) and, on pass, ``name`` (the
confirmed name).

Example::

    [[fcrdns]]
      reject = naughty
"""

from qpgevent import dns
from qpgevent.plugin import DECLINED, Plugin, same_network


class Fcrdns(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = """
    ipv4_prefix = integer(min=0, max=32, default=24)
    ipv6_prefix = integer(min=0, max=128, default=64)
    """

    def hook_connect(self, session):
        if self.is_immune(session):
            return DECLINED
        connection = session.connection
        if connection.remote_host:  # the core confirmed it, exactly
            connection.results.add(self, pass_="iprev", iprev="pass", name=connection.remote_host)
            return DECLINED
        ip = connection.remote_ip
        if connection.results.has("reverse_lookup", "err"):
            return self._temporary(session, "the reverse look-up at connect did not answer in time")
        try:
            result, name, problem = self.check(ip)
        except dns.TemporaryFailure as error:
            return self._temporary(session, str(error))
        if result == "pass":
            connection.results.add(self, pass_="iprev", iprev="pass", name=name)
            self.log.debug("pass, %s is %s", ip, name)
            return DECLINED
        connection.results.add(self, fail="iprev", iprev=result, problem=problem)
        self.log.info("%s, %s", result, problem)
        return self.reject(f"{self.enhanced_status('7.25')} {problem}", session)

    def check(self, ip):
        """("pass", name, "") or (iprev result, None, why not); raises dns.TemporaryFailure."""
        names = dns.ptr(ip)[:dns.MAX_PTR_NAMES]
        if not names:
            return "permerror", None, f"no reverse DNS for {ip}"
        forward = dns.aaaa if ":" in ip else dns.a
        results = dns.parallel([(forward, name) for name in names], return_exceptions=True)
        failure = None
        for name, addresses in zip(names, results):
            if isinstance(addresses, dns.TemporaryFailure):
                failure = failure or addresses
            elif isinstance(addresses, BaseException):
                raise addresses
            elif any(self._matches(ip, address) for address in addresses):
                return "pass", name, ""
        if failure is not None:
            raise failure  # a name we could not look up might have confirmed it
        self.log.debug("%s has PTR %s, none of them gives it back", ip, ", ".join(names))
        return "fail", None, f"reverse DNS of {ip} ({names[0]}) is not confirmed"

    def _matches(self, ip, address):
        return same_network(ip, address, self.config["ipv4_prefix"], self.config["ipv6_prefix"])

    def _temporary(self, session, why):
        session.connection.results.add(self, err="iprev", iprev="temperror", problem=why)
        self.log.info("temperror: %s", why)
        return self.reject("4.7.25 cannot check your reverse DNS now, try again later", session,
                           reject_type="temp")
