"""resolvable_fromhost: refuse senders whose domain could not receive a reply.

A bounce or a reply to the sender must be deliverable, so at MAIL the sender's domain
must resolve the way a mail server would route to it (RFC 5321 5.1):

- it has MX records, and at least one of their targets (the best ``max_mx_targets``)
  has an A or AAAA record outside ``invalid_networks`` (loopback, private, link-local,
  multicast, 0.0.0.0/8...: an MX pointing at ``localhost`` or 10.1.2.3 reaches nobody).
  When MX records exist, only they count: no falling back to the domain's own address;
- or it has no MX record but an A or AAAA record of its own (the implicit MX), outside
  ``invalid_networks`` too.

Refusals (standard ``reject`` / ``reject_type``; the status class follows the reply's)::

    550 5.7.27 sender domain example.com does not accept mail (null MX, RFC 7505)
    550 5.1.8 sender domain example.com does not resolve: no MX, A or AAAA record
    550 5.1.8 sender domain example.com has no usable MX: mx.example.com (127.0.0.1 unusable)

A null MX (RFC 7505 3: one MX record, preference 0, exchange ".") is the domain saying
it sends no mail that can be answered; a domain that does not exist (NXDOMAIN) and one
with no such records are refused the same way. When the DNS cannot answer now
(SERVFAIL, timeout) and nothing usable was found, the answer is
``450 4.4.3 cannot resolve sender domain example.com now, try again later``, whatever
``reject_type`` says (``reject = 0`` lets it pass, ``naughty`` defers it). UTF-8 (IDN)
domains, which need SMTPUTF8, are looked up in their IDNA 2008 A-label form, and
replies name them that way.

Not checked: the null sender ``<>`` (bounces), relay clients, whitelisted clients or
senders (``is_immune``). Address literals (``user@[192.0.2.1]``) as ``address_literals``
says: skip (accept), check (the address must be outside ``invalid_networks``), or reject.

Options:
  invalid_networks  addresses an MX target or implicit MX may not have (default:
                    0.0.0.0/8, 10.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12,
                    192.168.0.0/16, 224.0.0.0/4, 240.0.0.0/4, ::/128, ::1/128, fc00::/7,
                    fe80::/10, ff00::/8); set it empty for an intranet of private MXs
  max_mx_targets    MX targets looked up, best preference first (default 10)
  address_literals  skip, check or reject (default skip)
  plus the standard reject (1, 0, naughty), reject_type, loglevel, timeout

qpsmtpd's default ``reject_type`` for this plugin was soft (4xx); ours is the standard
perm. Write ``reject_type = temp`` for qpsmtpd's caution.

Results (``transaction.results.get("resolvable_fromhost")``): pass ``mx``, ``implicit mx``
or ``literal`` (a checked address literal), skip ``literal`` (not checked), fail
``unresolvable``, err ``dns``; evidence:
  how      how the domain resolved: "mx", "implicit mx" or "literal"
  host     the usable MX target (the domain, for an implicit MX; the address, for a literal)
  refusal  the refusal text

Example::

    [[resolvable_fromhost]]
      invalid_networks = 0.0.0.0/8, 127.0.0.0/8, ::1/128
      address_literals = reject
"""

import ipaddress

from qpgevent import dns
from qpgevent.plugin import DECLINED, Plugin, ip_in

INVALID_NETWORKS = ("0.0.0.0/8", "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                    "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "::/128", "::1/128", "fc00::/7",
                    "fe80::/10", "ff00::/8")
NULL_MX = [(0, ".")]


class ResolvableFromhost(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = f"""
    invalid_networks = force_list(default=list({", ".join(f'"{n}"' for n in INVALID_NETWORKS)}))
    max_mx_targets = integer(min=1, default=10)
    address_literals = option("skip", "check", "reject", default="skip")
    """

    def setup(self):
        self.invalid = [ipaddress.ip_network(n, strict=False) for n in self.config["invalid_networks"]]

    def hook_mail(self, session, sender, params):
        if sender.is_null or not sender.host or self.is_immune(session):
            return DECLINED
        results = session.transaction.results
        if sender.host.startswith("["):
            return self.literal(session, sender.host)
        domain = sender.host
        try:
            found, problem = self.resolve(domain)
        except dns.TemporaryFailure as error:
            self.log.warning("%s: %s", domain, error)
            results.add(self, err="dns", error=str(error))
            return self.reject(f"4.4.3 cannot resolve sender domain {a_label(domain)} now, try again later",
                               session, reject_type="temp")
        if found is not None:
            how, host = found
            results.add(self, pass_=how, how=how, host=host)
            return DECLINED
        status, text = problem
        results.add(self, fail="unresolvable", refusal=text)
        self.log.info("%s", text)
        return self.reject(f"{self.enhanced_status(status)} {text}", session)

    def resolve(self, domain):
        """((how, host), None) when ``domain`` can receive mail, else (None, (status, why)).

        Raises TemporaryFailure when the DNS could not say and nothing usable was found.
        """
        name = a_label(domain)
        records = dns.mx(domain)
        if records == NULL_MX:
            return None, ("7.27", f"sender domain {name} does not accept mail (null MX, RFC 7505)")
        if not records:
            addresses = dns.addresses(domain)  # the implicit MX, RFC 5321 5.1
            if not addresses:
                return None, ("1.8", f"sender domain {name} does not resolve: no MX, A or AAAA record")
            usable = [address for address in addresses if not ip_in(address, self.invalid)]
            if usable:
                return ("implicit mx", domain), None
            return None, ("1.8", f"sender domain {name} has no MX and only unusable addresses: "
                                 f"{', '.join(sorted(addresses))}")
        # "." among other MX records is no null MX (RFC 7505 3 forbids the mix): no target.
        targets = [host for _, host in records if host != "."][:self.config["max_mx_targets"]]
        results = dns.parallel([(dns.addresses, host) for host in targets], return_exceptions=True)
        why, failure = [], None
        for host, addresses in zip(targets, results):
            if isinstance(addresses, dns.TemporaryFailure):
                failure = failure or addresses
                continue
            if isinstance(addresses, BaseException):
                raise addresses  # a bug, not the DNS: the hook runner answers 451 and logs it
            usable = [address for address in addresses if not ip_in(address, self.invalid)]
            if usable:
                return ("mx", host), None
            why.append(f"{host} ({', '.join(sorted(addresses))} unusable)" if addresses
                       else f"{host} (no address)")
        if failure is not None:
            raise failure  # a target we could not look up might have been usable
        return None, ("1.8", f"sender domain {name} has no usable MX: {'; '.join(why) or 'none'}")

    def literal(self, session, host):
        results = session.transaction.results
        mode = self.config["address_literals"]
        if mode == "skip":
            results.add(self, skip="literal", how="literal")
            return DECLINED
        address = host[1:-1].removeprefix("IPv6:").removeprefix("ipv6:")
        if mode == "check" and not ip_in(address, self.invalid):
            results.add(self, pass_="literal", how="literal", host=address)
            return DECLINED
        text = (f"sender address literal {host} is not a usable address" if mode == "check"
                else f"sender address literal {host} not accepted: use a domain")
        results.add(self, fail="literal", refusal=text)
        return self.reject(f"{self.enhanced_status('1.8')} {text}", session)


def a_label(domain):
    """``domain`` as it was looked up (IDNA 2008 A-labels), for replies and logs."""
    return dns.ascii_name(domain) or domain.encode("ascii", "backslashreplace").decode("ascii")
