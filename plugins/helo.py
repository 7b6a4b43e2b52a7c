"""helo: refuse HELO/EHLO names that are forged, malformed or unknown to the DNS.

qpsmtpd's ``helo`` (formerly check_spamhelo). At HELO and EHLO the name the client gives
goes through the rules its ``policy`` turns on, cheap ones first; the first that fails
refuses the HELO/EHLO (550 5.7.1, or as ``reject`` / ``reject_type`` say; with
``reject = naughty`` the refusal waits for the ``naughty`` plugin). Each rule can also be
turned on or off by its own option, whatever the policy.

=================  ========  ==================================================================
rule               policy    fails when the name...
=================  ========  ==================================================================
badhelo            lenient   is listed in ``badhelo`` (or ``badhelo_file``): a name, or a
                             regular expression (a pattern with any of ``{}[]()^$|*+?\\!``),
                             ``!pattern`` meaning "anything that does not match"
plain_ip           lenient   is an IP address without brackets (RFC 5321 4.1.3 wants ``[...]``)
forged_literal     lenient   is an address literal that is not the client's address
invalid_localhost  lenient   is ``localhost`` (or ``*.localhost``) and the client is not on loopback
claims_us          lenient   is our own name (``me``, ``our_names``) or address, and the client
                             is not connecting from that address
invalid_syntax     rfc       is not a host name (letters, digits, hyphens; UTF-8 labels that
                             IDNA 2008 can encode) nor an address literal (RFC 5321 4.1.3)
not_fqdn           rfc       has no dot (a local alias; RFC 5321 2.3.5)
no_forward_dns     rfc       has no A or AAAA record
no_reverse_dns     rfc       (the client's address has no PTR record)
address_literal    strict    is an address literal at all, even the right one
no_matching_dns    strict    matches the client neither forward (an A/AAAA in the client's
                             /24 or /64) nor reverse (a PTR name equal to it, or in the same
                             last two labels); RFC 5321 4.1.4 says a server MUST NOT refuse
                             on this alone: use it with ``reject = 0`` or ``naughty``
=================  ========  ==================================================================

A DNS that cannot answer now gives a temporary refusal (450), whatever ``reject_type``
says. Relay clients and whitelisted hosts (``is_immune``) are not checked.

Options:
  policy           lenient (default), rfc or strict: which rules are on
  <rule>           yes / no: turn one rule (but badhelo) on or off (default: as the policy says)
  badhelo          names and patterns, comma-separated (default: none)
  badhelo_file     a file of them, one per line, ``#`` comments (default: none)
  our_names        more names that are ours, besides ``me`` (default: none)
  ipv4_prefix      bits a forward address must share with the client for no_matching_dns
                   (default 24); ipv6_prefix the same for IPv6 (default 64)
  reject, reject_type  as every plugin (default: refuse, perm)

Results: ``connection.results.get("helo")`` fails the rule that refused, passes
``helo`` otherwise, errs ``dns`` when the DNS did not answer; evidence ``forward_match``
and ``reverse_match`` (booleans) when the DNS rules ran. Unlike qpsmtpd: ``reject_type`` is honoured (qpsmtpd
forced disconnect), a failing DNS is a 4xx rather than a pass, IPv6 literals are
literals, and there is no X-HELO header (the Received header carries the HELO name).

Example::

    [[helo]]
      policy = rfc
      no_reverse_dns = no
      badhelo = yahoo.com, aol.com, "!\\.example$"
      reject = naughty
"""

import ipaddress
import re

from qpgevent import dns
from qpgevent.plugin import DECLINED, Plugin, same_network
from qpgevent.policy import Entries

LENIENT = ("badhelo", "plain_ip", "forged_literal", "invalid_localhost", "claims_us")
RFC = LENIENT + ("invalid_syntax", "not_fqdn", "no_forward_dns", "no_reverse_dns")
STRICT = RFC + ("address_literal", "no_matching_dns")
POLICIES = {"lenient": LENIENT, "rfc": RFC, "strict": STRICT}
#: Every rule, in the order they run: no DNS first, then the rules that need it.
RULES = ("badhelo", "plain_ip", "forged_literal", "address_literal", "invalid_localhost",
         "claims_us", "invalid_syntax", "not_fqdn", "no_forward_dns", "no_reverse_dns",
         "no_matching_dns")
DNS_RULES = ("no_forward_dns", "no_reverse_dns", "no_matching_dns")
REGEX_CHARS = re.compile(r"[{}\[\]()^$|*+?\\!]")
LDH_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class Helo(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = ['policy = option("lenient", "rfc", "strict", default="lenient")',
                  "badhelo = force_list(default=list())",
                  'badhelo_file = path(default="")',
                  "our_names = force_list(default=list())",
                  "ipv4_prefix = integer(min=0, max=32, default=24)",
                  "ipv6_prefix = integer(min=0, max=128, default=64)",
                  *(f"{rule} = boolean(default=None)" for rule in RULES if rule != "badhelo")]

    def setup(self):
        policy = POLICIES[self.config["policy"]]
        # badhelo is on in every policy; an empty list makes it a no-op.
        # (badhelo's option is its list, not an on/off switch: it is always a rule.)
        self.rules = [rule for rule in RULES
                      if rule == "badhelo" or (rule in policy if self.config.get(rule) is None else self.config[rule])]
        # The file is re-read when it changes (kept as it was if the new one is broken).
        self.badhelo_patterns = Entries(self.config["badhelo"], self.config["badhelo_file"], _parse_badhelo)
        self.our_names = {name.lower().rstrip(".") for name in self.config["our_names"]}

    def hook_helo(self, session, host):
        return self.check(session, host)

    def hook_ehlo(self, session, host):
        return self.check(session, host)

    def check(self, session, host):
        if self.is_immune(session):
            return DECLINED
        helo = Name(host)
        for rule in self.rules:
            if rule in DNS_RULES:
                break
            problem = getattr(self, rule)(session, helo)
            if problem:
                return self._refuse(session, rule, problem)
        dns_rules = [rule for rule in self.rules if rule in DNS_RULES]
        if not dns_rules:
            return DECLINED
        try:
            found = self._look_up(session, helo, dns_rules)
        except dns.TemporaryFailure as error:
            self.log.info("temperror: %s", error)
            session.connection.results.add(self, err="dns")
            return self.reject("cannot check your HELO name now, try again later", session,
                               reject_type="temp")
        for rule in dns_rules:
            problem = getattr(self, rule)(session, helo, *found)
            if problem:
                return self._refuse(session, rule, problem)
        self.log.debug("pass: %s", host)
        session.connection.results.add(self, pass_="helo")
        return DECLINED

    def _refuse(self, session, rule, problem):
        self.log.info("fail, %s: %r from %s", rule, problem[1], session.connection.remote_ip)
        session.connection.results.add(self, fail=rule)
        return self.reject(problem[0], session)

    # -- rules without DNS: each gives (reply text, the name) or None ---------------
    def badhelo(self, session, helo):
        name = helo.text.lower().rstrip(".")
        for pattern, negated in self.badhelo_patterns.get():
            if negated is None:
                if name == pattern or (helo.ascii and helo.ascii == pattern):
                    return f"I do not believe you are {helo.text}.", helo.text
            elif bool(pattern.search(name)) != negated:
                return "Your HELO hostname is not allowed", helo.text
        return None

    def plain_ip(self, session, helo):
        if helo.plain_ip is not None:
            return "Plain IP is invalid HELO hostname (RFC 5321 4.1.3: write it in brackets)", helo.text
        return None

    def forged_literal(self, session, helo):
        if helo.literal is not None and not same_network(str(helo.literal), session.connection.remote_ip):
            return "Forged IPs not accepted here", helo.text
        return None

    def address_literal(self, session, helo):
        if helo.literal is not None or helo.text.startswith("["):
            return "RFC 5321 allows an address literal, but we do not", helo.text
        return None

    def invalid_localhost(self, session, helo):
        name = (helo.ascii or helo.text.lower()).rstrip(".")
        if name == "localhost" or name.endswith(".localhost") or name == "localhost.localdomain":
            if not _is_loopback(session.connection.remote_ip):
                return "You are not localhost", helo.text
        return None

    def claims_us(self, session, helo):
        connection = session.connection
        if connection.remote_ip == connection.local_ip:
            return None  # from our own address: it may well be us
        ours = {session.me.lower().rstrip(".")} | self.our_names
        address = helo.literal if helo.literal is not None else helo.plain_ip
        if (helo.ascii in ours or (address is not None and connection.local_ip
                                   and same_network(str(address), connection.local_ip))):
            return f"You are not {session.me}", helo.text
        return None

    def invalid_syntax(self, session, helo):
        if helo.literal is not None or helo.plain_ip is not None:
            return None  # plain_ip has its own rule
        if not helo.valid_host_name:
            return "HELO name contains invalid FQDN characters. Read RFC 1035", helo.text
        return None

    def not_fqdn(self, session, helo):
        if helo.literal is None and helo.plain_ip is None and "." not in helo.text.strip("."):
            return "HELO name is not fully qualified. Read RFC 5321", helo.text
        return None

    # -- rules with DNS ----------------------------------------------------------
    def _look_up(self, session, helo, rules):
        """(addresses of the name or None, PTR names of the client or None), asked at once."""
        calls = []
        wants_forward = helo.ascii is not None and ("no_forward_dns" in rules or "no_matching_dns" in rules)
        if wants_forward:
            calls.append((dns.addresses, helo.ascii))
        wants_reverse = "no_reverse_dns" in rules or "no_matching_dns" in rules
        if wants_reverse:
            calls.append((dns.ptr, session.connection.remote_ip))
        results = dns.parallel(calls)
        addresses = results.pop(0) if wants_forward else None
        names = results.pop(0) if wants_reverse else None
        results, ip = session.connection.results, session.connection.remote_ip
        if "no_matching_dns" in rules or "no_forward_dns" in rules:
            results.add(self, forward_match=(
                (helo.literal is not None and same_network(str(helo.literal), ip))
                or any(same_network(ip, a, self.config["ipv4_prefix"], self.config["ipv6_prefix"])
                       for a in addresses or ())))
        if names is not None and helo.ascii:
            results.add(self, reverse_match=any(_same_domain(name, helo.ascii) for name in names))
        return addresses, names

    def no_forward_dns(self, session, helo, addresses, names):
        if helo.literal is not None or helo.plain_ip is not None:
            return None  # an address needs no look-up
        if not addresses:
            return "HELO hostname does not exist", helo.text
        return None

    def no_reverse_dns(self, session, helo, addresses, names):
        if not names:
            return f"no reverse DNS for {session.connection.remote_ip}", helo.text
        return None

    def no_matching_dns(self, session, helo, addresses, names):
        found = session.connection.results.get(self)
        if found is not None and (found.get("forward_match") or found.get("reverse_match")):
            return None
        return "That HELO hostname fails FCrDNS", helo.text


class Name:
    """What a HELO argument is: an address literal, a bare IP, a host name (and its A-label form)."""

    def __init__(self, text):
        self.text = text
        self.literal = _literal(text)
        self.plain_ip = _ip(text)
        bracketed = self.literal is not None or text.startswith("[")
        self.ascii = None if bracketed or self.plain_ip is not None else dns.ascii_name(text)
        self.valid_host_name = self.ascii is not None and _is_host_name(text, self.ascii)


def _literal(text):
    """The address of ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3), else None."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        address = _ip(inner[5:])
        return address if address is not None and address.version == 6 else None
    address = _ip(inner)
    return address if address is not None and address.version == 4 else None


def _ip(text):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_host_name(text, ascii_name):
    # The raw text: letters, digits, hyphens and dots, or UTF-8 (IDNA's job); no escapes.
    if any(c.isascii() and not (c.isalnum() or c in "-.") for c in text) or text.endswith("."):
        return False
    return len(ascii_name) <= 253 and all(LDH_LABEL.match(label) for label in ascii_name.split("."))


def _is_loopback(ip):
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def _same_domain(ptr_name, helo_name):
    """Equal, or the same last two labels (qpsmtpd: foo.example.com matches bar.example.com)."""
    if ptr_name == helo_name:
        return True
    ptr_labels, helo_labels = ptr_name.split("."), helo_name.split(".")
    return len(ptr_labels) >= 2 and len(helo_labels) >= 2 and ptr_labels[-2:] == helo_labels[-2:]


def _parse_badhelo(entries):
    """badhelo entries: a plain name, or a regular expression (``!`` in front: must NOT match)."""
    patterns = []
    for pattern in entries:
        if REGEX_CHARS.search(pattern):
            negated = pattern.startswith("!")
            try:
                patterns.append((re.compile(pattern[1:] if negated else pattern, re.I), negated))
            except re.error as error:
                raise ValueError(f"badhelo pattern {pattern!r}: {error}") from None
        else:
            patterns.append((pattern.lower().rstrip("."), None))
    return patterns
