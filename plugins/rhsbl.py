"""rhsbl: refuse senders whose domain, or whose HELO name, is on a right-hand-side blocklist.

At MAIL, the sender's domain and the name the client gave in HELO/EHLO are looked up
in every zone of ``zones`` at once (RFC 5782 2.3: ``<domain>.<zone>``; a listing is an
A record in 127.0.0.0/8, its reason the TXT record). Both are checked at MAIL, as in
qpsmtpd, so the log line of a refused HELO name shows the sender too. A listing gives::

    550 5.7.1 sender domain spam.example is listed in dbl.example: <TXT>
    550 5.7.1 HELO name spam.example is listed in dbl.example: <TXT>

UTF-8 (IDN) domains, which need SMTPUTF8, are looked up in their IDNA 2008 A-label
form (``bücher.example`` -> ``xn--bcher-kva.example.dbl.example``), and replies name
them that way. Skipped: the null sender's (empty) domain, but not its HELO name, so a
bounce does not dodge the check; address literals, and HELO names that are an IP
address or have no dot. A zone that cannot answer now (SERVFAIL, timeout) gives
``450 4.4.3 cannot check ... now, try again later`` (temporary whatever ``reject_type``
says), unless another listing already decides; ``fail_open = yes`` accepts the sender
instead. Relay clients and whitelisted
clients or senders (``is_immune``) are not checked.

Options:
  zones      RHS blocklist zones (default none)
  check      what to look up: sender, helo, or both (default sender, helo)
  fail_open  a DNS failure accepts the sender instead of 4xx (default no)
  plus the standard reject (1, 0, naughty), reject_type, loglevel, timeout

Results (``transaction.results.get("rhsbl")``): fail the zones listing a domain, err
those that did not answer; evidence ``refusal``, the refusal text when a domain is listed
(also with reject = 0 or naughty).

Example::

    [[rhsbl]]
      zones = dbl.spamhaus.org, multi.surbl.org
      check = sender, helo
"""

import ipaddress
import re

from qpgevent import dns
from qpgevent.plugin import DECLINED, Plugin

_ZONE = re.compile(r"^[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})+\.?$")
_WHAT = {"sender": "sender domain", "helo": "HELO name"}


class Rhsbl(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = """
    zones = force_list(default=list())
    check = force_list(default=list("sender", "helo"))
    fail_open = boolean(default=False)
    """

    def setup(self):
        for zone in self.config["zones"]:
            if not _ZONE.match(zone):
                raise ValueError(f"zones: {zone!r} is not a DNS zone name")
        self.zones = [zone.rstrip(".").lower() for zone in self.config["zones"]]
        unknown = set(self.config["check"]) - set(_WHAT)
        if unknown or not self.config["check"]:
            raise ValueError(f"check: {', '.join(sorted(unknown)) or 'nothing'}: write sender, helo or both")

    def hook_mail(self, session, sender, params):
        if not self.zones or self.is_immune(session):
            return DECLINED
        domains = {}  # A-label domain -> what it is, in check order; one look-up if both agree
        if "sender" in self.config["check"] and _is_domain(sender.host):
            domains.setdefault(dns.ascii_name(sender.host), "sender")
        helo = session.connection.hello_host
        if "helo" in self.config["check"] and _is_domain(helo):
            domains.setdefault(dns.ascii_name(helo), "helo")
        domains.pop(None, None)  # not a DNS name (IDNA 2008 refuses it): nothing can list it
        if not domains:
            return DECLINED
        pairs = [(domain, zone) for domain in domains for zone in self.zones]
        results = dns.parallel([(listing, domain, zone) for domain, zone in pairs], return_exceptions=True)
        failed = None
        for (domain, zone), reason in zip(pairs, results):
            if isinstance(reason, dns.TemporaryFailure):
                session.transaction.results.add(self, err=zone)
                failed = failed or (domain, zone, reason)
            elif isinstance(reason, BaseException):
                raise reason  # a bug, not the DNS: the hook runner answers 451 and logs it
            elif reason is not None:
                text = f"{_WHAT[domains[domain]]} {domain} is listed in {zone}"
                text += f": {reason}" if reason else ""
                self.log.info("%s", text)
                session.transaction.results.add(self, fail=zone, refusal=text)
                return self.reject(f"{self.enhanced_status('7.1')} {text}", session)
        if failed is not None:
            domain, zone, error = failed
            self.log.warning("%s: %s", zone, error)
            if self.config["fail_open"]:
                return DECLINED
            return self.reject(f"4.4.3 cannot check {domain} against {zone} now, try again later",
                               session, reject_type="temp")
        return DECLINED


def listing(domain, zone):
    """The TXT reason ("" without one) when ``domain`` is listed in ``zone``; None if not."""
    name = f"{domain}.{zone}"
    values = [value for value in dns.a(name) if _is_listing(value)]
    if not values:
        return None
    try:
        texts = dns.txt(name)
    except dns.TemporaryFailure:
        texts = []  # the listing is known; its reason is only a courtesy
    reason = " ".join(texts).strip()
    return "".join(c if c.isprintable() else " " for c in reason)  # it goes into a reply


def _is_listing(value):
    # RFC 5782 2.1: 127.0.0.0/8 lists; 127.255.255.0/24 are the lists' error codes.
    address = ipaddress.ip_address(value)
    return address in dns.LISTING and address not in dns.LIST_ERRORS


def _is_domain(host):
    """A name worth looking up: not empty, not an address (literal or bare), has a dot."""
    if not host or host.startswith("[") or "." not in host.strip("."):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False
