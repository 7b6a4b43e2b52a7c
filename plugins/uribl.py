"""uribl: look the domains of links in a message up on URI blocklists (SURBL, URIBL, Spamhaus DBL).

After the message is received (data_post), the body is read from the spool in chunks
(the first ``max_scan_size`` octets; never the whole of a big message in memory), and
the host names of its links are collected: ``http://``, ``https://`` and ``ftp://``
URLs and bare ``www.`` names, after undoing quoted-printable soft line breaks and
``=2E``-style escapes (a base64-encoded part is not decoded). Each host is reduced to
its registered domain (the last two labels, or three under a ``two_level_suffixes``
entry such as co.uk) and, unless in ``whitelist_domains``, looked up as
``<domain>.<zone>`` in every zone at once (qpgevent.dns.parallel: the wait of the
slowest look-up, not the sum), at most ``max_domains`` domains per message.

A listing is an A record in 127.0.0.0/8 (not 127.255.255.0/24, the lists' error
codes); with ``ZONE:MASK`` it must also share a bit with MASK (URIBL's bitmask, e.g.
``multi.uribl.com:2`` for black). Then ``action``:

  add-header  (default) ``X-URIBL-Match: <domain> in <zone>`` for each listing
  deny        ``554 5.7.1 link to <domain> is listed in <zone>`` (reject / reject_type)
  denysoft    451 with the same text

A DNS failure leaves the domain unchecked (logged): URI lists are a spam signal, not a
reason to hold mail. Results: ``transaction.results.get("uribl")`` fails the zones that
list a link (evidence ``listings``, ``[(domain, zone), ...]``), errs those that did not
answer, passes ``clean`` when none listed one.

Options:
  zones               blocklist zones, ``ZONE`` or ``ZONE:MASK`` (default none)
  action              add-header, deny or denysoft (default add-header)
  whitelist_domains   domains never looked up (default none)
  two_level_suffixes  suffixes under which a domain has three labels (default co.uk,
                      com.au, co.jp, com.br, co.nz, co.za)
  max_domains         most domains looked up per message (default 20)
  max_scan_size       octets of body scanned (default 1048576)
  plus the standard reject, reject_type, loglevel, timeout

Example::

    [[uribl]]
      zones = multi.uribl.com, multi.surbl.org
      action = deny
"""

import ipaddress
import re

from qpgevent import dns
from qpgevent.plugin import DECLINED, DENYSOFT, Plugin

_HOST = re.compile(rb"(?:(?:https?|ftp)://(?:[^\s/@<>\"']*@)?|\bwww\.)([a-z0-9][a-z0-9.-]*\.[a-z]{2,63})\b",
                   re.IGNORECASE)
_SOFT_BREAK = re.compile(rb"=\r?\n")
_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
OVERLAP = 512  # bytes kept from the previous chunk: a URL may straddle two


def hosts_in(chunks, limit):
    """The host names of links in ``chunks`` (their first ``limit`` octets), lower case, in order."""
    found, tail, seen = [], b"", 0
    for chunk in chunks:
        chunk = chunk[:max(0, limit - seen)]
        seen += len(chunk)
        text = tail + chunk
        plain = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), _SOFT_BREAK.sub(b"", text))
        for match in _HOST.finditer(plain):
            found.append(match.group(1).decode("ascii").lower().rstrip(".-"))
        tail = text[-OVERLAP:]
        if seen >= limit:
            break
    return list(dict.fromkeys(found))


class Uribl(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = [
        "zones = force_list(default=list())",
        'action = option("add-header", "deny", "denysoft", default="add-header")',
        "whitelist_domains = force_list(default=list())",
        'two_level_suffixes = force_list(default=list("co.uk", "com.au", "co.jp", "com.br", "co.nz", "co.za"))',
        "max_domains = integer(min=1, default=20)",
        "max_scan_size = integer(min=1, default=1048576)",
    ]

    def setup(self):
        self.zones = []
        for entry in self.config["zones"]:
            zone, _, mask = entry.partition(":")
            self.zones.append((zone.strip().lower(), int(mask) if mask else None))
        self.whitelist = {domain.lower() for domain in self.config["whitelist_domains"]}
        self.two_level = {suffix.lower() for suffix in self.config["two_level_suffixes"]}

    def registered_domain(self, host):
        labels = host.split(".")
        keep = 3 if ".".join(labels[-2:]) in self.two_level else 2
        return ".".join(labels[-keep:])

    def hook_data_post(self, session):
        transaction = session.transaction
        if not self.zones or self.is_immune(session):
            return DECLINED
        hosts = hosts_in(transaction.body_chunks(), self.config["max_scan_size"])
        domains = [domain for domain in dict.fromkeys(self.registered_domain(host) for host in hosts)
                   if domain not in self.whitelist][:self.config["max_domains"]]
        pairs = [(domain, zone, mask) for domain in domains for zone, mask in self.zones]
        answers = dns.parallel([(dns.a, f"{domain}.{zone}") for domain, zone, _ in pairs], return_exceptions=True)
        listings = []
        for (domain, zone, mask), answer in zip(pairs, answers):
            if isinstance(answer, dns.TemporaryFailure):
                self.log.info("%s not checked in %s: %s", domain, zone, answer)
                transaction.results.add(self, err=zone)
                continue
            if isinstance(answer, BaseException):
                raise answer
            if any(_is_listing(value, mask) for value in answer):
                listings.append((domain, zone))
        if not listings:
            transaction.results.add(self, pass_="clean", listings=[])
            return DECLINED
        transaction.results.add(self, fail=list(dict.fromkeys(zone for _, zone in listings)), listings=listings)
        self.log.info("listed: %s", ", ".join(f"{domain} in {zone}" for domain, zone in listings))
        domain, zone = listings[0]
        action = self.config["action"]
        if action == "deny":
            return self.reject(f"link to {domain} is listed in {zone}", session)
        if action == "denysoft":
            return DENYSOFT, f"link to {domain} is listed in {zone}"
        for domain, zone in listings:
            transaction.headers.add("X-URIBL-Match", f"{domain} in {zone}")
        return DECLINED


def _is_listing(value, mask):
    address = ipaddress.ip_address(value)
    if address not in dns.LISTING or address in dns.LIST_ERRORS:
        return False
    return mask is None or bool(int(address) & 0xFF & mask)
