"""How much TLS a delivery needs: per-domain policy, MTA-STS (RFC 8461), DANE (RFC 7672).

Owns the decision the queue runner makes before it connects to a domain's servers:

- ``none``: never STARTTLS; ``may``: STARTTLS when offered, the certificate not checked
  (opportunistic, RFC 7435: the default); ``encrypt``: TLS or no delivery (deferred),
  any certificate; ``verify``: TLS with a certificate valid for the MX host's name,
  from a trusted CA; ``dane``: TLS with a certificate matching the host's TLSA records.
- A level configured for the domain (``tls_policy = example.test:verify``) wins.
- Else DANE: when a MX host has TLSA records (``_25._tcp.HOST``) that the resolver
  validated (the AD bit, from a validating resolver such as a local unbound), TLS is
  required for the domain and each such host's certificate chain must match its records
  (``dane``: DANE-EE, usage 3, the leaf's key; DANE-TA, usage 2, a CA the chain leads to,
  and the MX name in the certificate); a host with only other usages gets TLS without a
  check (RFC 7672 2.2, 3.1.3). A TLSA look-up that fails (SERVFAIL: bogus) defers the domain.
  Records are kept for their TTL (an hour at most), then asked for again.
- Else MTA-STS: a ``_mta-sts`` TXT record with ``v=STSv1`` makes us fetch
  ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` (its certificate checked; no
  redirects), cached in memory and on disk until ``max_age`` and refetched when the TXT
  id changes. ``enforce``: only MX hosts the policy names are used, with ``verify``;
  ``testing`` and ``none``: as without a policy. A fetch that fails keeps a cached
  policy, else delivers as if there were none (RFC 8461 5.1).
- Static routes (a smarthost) take only the configured level.
- With TLS-RPT on (``reports``, see ``tlsrpt``), each TLS session to a domain's servers
  is counted under the policy in force: after the handshake (``tls_check``: a success, or
  the DANE check's failure), or when STARTTLS fails (``tls_failed``: the certificate
  check's error, or STARTTLS required and not offered).

REQUIRETLS messages (RFC 8689) take ``verify``, or ``dane`` through
``dane_verified_check`` (the runner's choice, in ``delivery``).
"""

from __future__ import annotations

import _ssl
import contextvars
import dataclasses
import functools
import json
import logging
import os
import re
import smtplib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.flags
import dns.rdatatype
import dns.resolver
import dns.exception

from . import dane
from . import dns as qdns
from . import https_client
from ..core.tlsrpt import NO_POLICY, Policy, result_of_verify_code
from .dane import spki
from .tlsrpt import TlsReports
from .relay_routes import Hop, Route
from .smtp_downstream import ClientOptions

__all__ = ["LEVELS", "StsPolicy", "TlsPolicies", "parse_levels", "parse_sts", "spki"]

log = logging.getLogger("qpgevent.tls_policy")

LEVELS = ("none", "may", "encrypt", "verify", "dane")
MAX_POLICY_BYTES = 64 * 1024  #: RFC 8461 3.3 suggests 64 KiB
STS_FETCH_TIMEOUT = 60.0  #: RFC 8461 3.3: "a timeout of one minute"
TLSA_CACHE_MAX = 3600.0  #: seconds TLSA records are kept at most, however long their TTL
TLSA_CACHE_NONE = 60.0  #: seconds "no validated TLSA records" is kept before asking again


#: The policy a delivery greenlet works under, for TLS-RPT: (domain, sts|tlsa|no-policy-found,
#: the STS policy). None: nothing to report (a static route).
_IN_FORCE: contextvars.ContextVar[tuple[str, str, StsPolicy | None] | None] = \
    contextvars.ContextVar("tls_policy_in_force", default=None)


class StsFetchError(Exception):
    """The MTA-STS policy could not be fetched: ``result_type`` as TLS-RPT reports it."""

    def __init__(self, result_type: str, reason: str) -> None:
        super().__init__(reason)
        self.result_type, self.reason = result_type, reason


class TlsPolicyError(Exception):
    """A policy cannot be learned now (a TLSA look-up failed): defer the domain."""


class MxNotAuthenticated(Exception):
    """A REQUIRETLS message's MX hosts are not authenticated (RFC 8689 4.2.1): fail, do not retry."""


@dataclass(frozen=True)
class StsPolicy:
    id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched: float

    def lines(self) -> tuple[str, ...]:
        """The policy as RFC 8460 4.3 reports it (policy-string): its fields, one a line."""
        return ("version: STSv1", f"mode: {self.mode}", *(f"mx: {mx}" for mx in self.mx), f"max_age: {self.max_age}")

    def matches(self, host: str) -> bool:
        """RFC 8461 4.1: an exact name, or ``*.`` standing for one leftmost label."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                if host.partition(".")[2] == pattern[2:] and "." in host:
                    return True
            elif host == pattern:
                return True
        return False


def parse_levels(items: list[str]) -> dict[str, str]:
    levels = {}
    for item in (i.strip() for i in items if i.strip()):
        domain, _, level = item.rpartition(":")
        if not domain or level not in LEVELS[:4]:
            raise ValueError(f"tls_policy {item!r}: DOMAIN:none|may|encrypt|verify")
        levels[domain.lower()] = level
    return levels


def parse_sts(text: str, policy_id: str, now: float) -> StsPolicy | None:
    """The policy file (RFC 8461 3.2), or None if it is not a valid STSv1 policy."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    mode = (fields.get("mode") or [""])[0]
    try:
        max_age = int((fields.get("max_age") or [""])[0])
    except ValueError:
        return None
    if fields.get("version") != ["STSv1"] or mode not in ("enforce", "testing", "none"):
        return None
    mx = tuple(m.lower().rstrip(".") for m in fields.get("mx", []))
    if mode != "none" and not mx:
        return None
    return StsPolicy(policy_id, mode, mx, min(max_age, 31557600), now)


# -- the decision ------------------------------------------------------------------------
class TlsPolicies:
    """Per-domain TLS for the runner: ``prepare(domain, route)`` -> (route, options)."""

    def __init__(self, client: ClientOptions, levels: dict[str, str], default: str, *, mta_sts: bool,
                 dane: bool, ca_file: str = "", cache_dir: str = "",
                 fetch: Callable[[str, str], str] | None = None, reports: TlsReports | None = None) -> None:
        self.client, self.levels, self.default = client, levels, default
        self.reports = reports  #: TLS-RPT (RFC 8460): every TLS session counted, when on
        self.use_mta_sts, self.use_dane = mta_sts, dane
        self.ca_file, self.cache_dir = ca_file, cache_dir
        self.fetch = fetch or self._fetch_https
        self.sts: dict[str, StsPolicy] = {}
        #: host -> its validated records, and until when (monotonic) they hold: their TTL
        self.tlsa: dict[str, tuple[list[tuple[int, int, int, bytes]], float]] = {}
        self.variants = {level: self._options(level) for level in LEVELS}

    def _options(self, level: str) -> ClientOptions:
        starttls = {"none": "off", "may": "auto"}.get(level, "required")
        context = ssl.create_default_context(cafile=self.ca_file or None)
        if level != "verify":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return dataclasses.replace(self.client, starttls=starttls, tls_context=context,
                                   tls_check=functools.partial(self._after_tls, level), tls_failed=self._tls_failed)

    def prepare(self, domain: str, route: Route, static: bool) -> tuple[Route, str]:
        """The route to use (MTA-STS may drop MX hosts) and the TLS level for it."""
        domain = domain.lower()
        _IN_FORCE.set(None if static else (domain, NO_POLICY, None))
        if domain in self.levels:
            return route, self.levels[domain]
        if static:
            return route, self.default
        if self.use_dane:
            secured = []
            for hop in route.hops:
                try:
                    if self._tlsa(hop):
                        secured.append(hop)
                except TlsPolicyError as error:
                    self._count(hop, "dnssec-invalid", str(error), Policy(domain, "tlsa", (), (hop.name,)))
                    raise
            if secured:
                _IN_FORCE.set((domain, "tlsa", None))
                return route, "dane"
        if self.use_mta_sts:
            policy = self._sts_policy(domain)
            if policy is not None and policy.mode != "none":
                _IN_FORCE.set((domain, "sts", policy))
            if policy is not None and policy.mode == "enforce":
                hops = tuple(hop for hop in route.hops if policy.matches(hop.name or hop.host))
                if not hops:
                    self._count(route.hops[0] if route.hops else None, "validation-failure",
                                "no MX host matches the MTA-STS policy")
                    raise TlsPolicyError(f"4.7.5 no MX host of {domain} matches its MTA-STS policy")
                return Route(route.domain, hops), "verify"
            if policy is not None and policy.mode == "testing":
                log.info("%s: MTA-STS policy in testing mode: not enforced", domain)
        return route, self.default

    # TLS-RPT ----------------------------------------------------------------------------
    def _policy(self, hop: Hop | None) -> Policy | None:
        """The policy in force for a session to ``hop``, as TLS-RPT names it."""
        state = _IN_FORCE.get()
        if state is None or self.reports is None:
            return None
        domain, kind, sts = state
        if kind == "sts" and sts is not None:
            return Policy(domain, "sts", sts.lines(), sts.mx)
        records = self.tlsa.get(hop.name, ([], 0.0))[0] if kind == "tlsa" and hop is not None else None
        if records:
            assert hop is not None
            return Policy(domain, "tlsa", tuple(f"{u} {s} {m} {d.hex()}" for u, s, m, d in records), (hop.name,))
        return Policy(domain)

    def _count(self, hop: Hop | None, result: str, reason: str = "", policy: Policy | None = None) -> None:
        policy = policy or self._policy(hop)
        if policy is not None and self.reports is not None:
            self.reports.count(policy, result, hop.name if hop else "", hop.host if hop else "", reason)

    def _after_tls(self, level: str, hop: Hop, sock: ssl.SSLSocket) -> str | None:
        """After the handshake: the DANE check (level ``dane``); the session counted."""
        failure = self._dane_check(hop, sock) if level == "dane" else None
        if failure is None:
            self._count(hop, "success")
            return None
        self._count(hop, failure.result_type, failure.reason)
        return f"4.7.5 certificate of {hop.name} does not match its TLSA records (DANE): {failure.reason}"

    def _tls_failed(self, hop: Hop, error: Exception | None) -> None:
        if isinstance(error, ssl.SSLCertVerificationError):
            self._count(hop, result_of_verify_code(error.verify_code), error.verify_message or str(error))
        elif error is None or isinstance(error, smtplib.SMTPResponseException):  # not offered, or refused
            self._count(hop, "starttls-not-supported", str(error or "STARTTLS not offered"))
        else:
            self._count(hop, "validation-failure", str(error))

    # DANE -------------------------------------------------------------------------------
    def _tlsa(self, hop: Hop) -> list[tuple[int, int, int, bytes]]:
        if not hop.name:
            return []
        cached = self.tlsa.get(hop.name)
        if cached is None or time.monotonic() >= cached[1]:
            # Asked again once their TTL is over: a key rollover is seen without a restart.
            records, ttl = _validated_tlsa(f"_{hop.port}._tcp.{hop.name}")
            cached = self.tlsa[hop.name] = (records, time.monotonic() + min(ttl, TLSA_CACHE_MAX))
        return cached[0]

    def _dane_check(self, hop: Hop, sock: ssl.SSLSocket) -> dane.Failure | None:
        records = dane.usable(self._tlsa(hop))
        if not records:
            return None  # this host publishes no usable record: TLS is all we can require (RFC 7672 2.2)
        return dane.check(chain_as_sent(sock), records, hop.name)

    def dane_verified_check(self, hop: Hop, sock: ssl.SSLSocket) -> str | None:
        """The ``dane`` check for REQUIRETLS (RFC 8689 4.2.1): the certificate must be
        authenticated by a DANE-EE or DANE-TA record; a host without one gets no pass for TLS alone."""
        if not dane.usable(self._tlsa(hop)):
            return f"5.7.10 {hop.name} has no DANE-EE or DANE-TA record to verify its certificate against"
        return self._after_tls("dane", hop, sock)

    def requiretls_route(self, domain: str, route: Route) -> Route:
        """The MX hosts a REQUIRETLS message may go to (RFC 8689 4.2.1): all of them when the
        MX answer was DNSSEC-validated, else those an MTA-STS policy (enforce or testing)
        names; none: MxNotAuthenticated. A look-up that fails now: TlsPolicyError (defer)."""
        if _validated_mx(domain):
            return route
        policy = self._sts_policy(domain.lower()) if self.use_mta_sts else None
        if policy is not None and policy.mode != "none":
            hops = tuple(hop for hop in route.hops if policy.matches(hop.name or hop.host))
            if hops:
                return Route(route.domain, hops)
        raise MxNotAuthenticated(f"5.7.10 the MX hosts of {domain} are neither DNSSEC-validated nor named "
                                 f"by an MTA-STS policy (REQUIRETLS, RFC 8689 4.2.1)")

    # MTA-STS ----------------------------------------------------------------------------
    def _sts_policy(self, domain: str) -> StsPolicy | None:
        now = time.time()
        cached = self.sts.get(domain) or self._read_cache(domain)
        if cached is not None and now - cached.fetched > cached.max_age:
            cached = None
        try:
            records = [t for t in qdns.txt(f"_mta-sts.{domain}") if t.startswith("v=STSv1")]
        except qdns.TemporaryFailure:
            return cached
        if len(records) != 1:
            return cached
        match = re.search(r"(?:^|;)\s*id=([A-Za-z0-9]{1,32})\s*(?:;|$)", records[0])
        if match is None:
            return cached
        if cached is not None and cached.id == match.group(1):
            return cached
        try:
            policy = parse_sts(self.fetch(domain, self.ca_file), match.group(1), now)
        except StsFetchError as error:
            log.warning("MTA-STS %s: %s: no new policy", domain, error.reason)
            self._count(None, error.result_type, error.reason, Policy(domain, "sts"))
            return cached
        if policy is None:
            log.warning("MTA-STS %s: the policy fetched is not a valid STSv1 policy", domain)
            self._count(None, "sts-policy-invalid", "not a valid STSv1 policy", Policy(domain, "sts"))
            return cached
        self.sts[domain] = policy
        self._write_cache(domain, policy)
        log.info("%s: MTA-STS policy %s, mode %s, mx %s", domain, policy.id, policy.mode, ", ".join(policy.mx))
        return policy

    def _read_cache(self, domain: str) -> StsPolicy | None:
        if not self.cache_dir:
            return None
        try:
            with open(os.path.join(self.cache_dir, domain + ".json"), encoding="utf-8") as handle:
                data = json.load(handle)
            policy = StsPolicy(**dict(data, mx=tuple(data["mx"])))
        except (OSError, ValueError, TypeError):
            return None
        self.sts[domain] = policy
        return policy

    def _write_cache(self, domain: str, policy: StsPolicy) -> None:
        if not self.cache_dir:
            return
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            path = os.path.join(self.cache_dir, domain + ".json")
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                json.dump(dataclasses.asdict(policy), handle)
            os.replace(path + ".tmp", path)
        except OSError as error:
            log.warning("cannot cache the MTA-STS policy of %s: %s", domain, error)

    @staticmethod
    def _fetch_https(domain: str, ca_file: str) -> str:
        """GET the policy over HTTPS (RFC 8461 3.3): a valid certificate, 200, text/plain."""
        host = f"mta-sts.{domain}"
        try:
            response = https_client.request("GET", host, 443, "/.well-known/mta-sts.txt", ca_file=ca_file,
                                            timeout=STS_FETCH_TIMEOUT, limit=MAX_POLICY_BYTES)
        except https_client.HttpsError as error:
            raise StsFetchError("sts-webpki-invalid" if error.certificate else "sts-policy-fetch-error",
                                str(error)) from None
        if response.status != 200 or response.content_type != "text/plain":
            raise StsFetchError("sts-policy-fetch-error", f"{host}: {response.status} {response.reason}, "
                                f"{response.content_type or 'no content type'}")
        return response.body.decode("utf-8", "replace")


def chain_as_sent(sock: ssl.SSLSocket) -> list[bytes]:
    """The server's certificates in the order it sent them (DER), the leaf first, unverified.

    DANE-TA needs the chain as sent (RFC 7672 3.1.2), which ``ssl`` makes public only from
    Python 3.13 (``get_unverified_chain``); before, the same call exists on the private
    ``_sslobj`` (CPython 3.10+), whose certificates say ``public_bytes``."""
    sslobj: object = getattr(sock, "_sslobj", None)
    public = getattr(sock, "get_unverified_chain", None) or getattr(sslobj, "get_unverified_chain", None)
    if public is None:
        leaf = sock.getpeercert(binary_form=True)
        return [leaf] if leaf else []
    return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in public() or []]


def _validated_tlsa(name: str) -> tuple[list[tuple[int, int, int, bytes]], float]:
    """The TLSA records of ``name`` if the resolver validated them (AD), else [], and their TTL."""
    resolver = _validating_resolver()
    try:
        answer = resolver.resolve(name, dns.rdatatype.TLSA, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return [], TLSA_CACHE_NONE
    except dns.exception.DNSException as error:
        raise TlsPolicyError(f"4.7.5 TLSA look-up of {name} failed: {error}") from None
    if not answer.response.flags & dns.flags.AD:
        return [], TLSA_CACHE_NONE  # not validated: not DANE (RFC 7672 2.2)
    return [(r.usage, r.selector, r.mtype, r.cert) for r in answer], float(answer.rrset.ttl if answer.rrset else 0)


def _validated_mx(domain: str) -> bool:
    """Whether the resolver validated the MX answer of ``domain`` (DNSSEC: the AD bit), an
    answer without MX records included (the implicit MX). A failed look-up: TlsPolicyError."""
    try:
        answer = _validating_resolver().resolve(domain, dns.rdatatype.MX, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return False
    except dns.exception.DNSException as error:
        raise TlsPolicyError(f"4.4.3 MX look-up of {domain} failed: {error}") from None
    return bool(answer.response.flags & dns.flags.AD)


def _validating_resolver() -> dns.resolver.Resolver:
    """A resolver on ``[dns]``'s servers that asks for the AD bit (RFC 6840 5.7) and caches nothing."""
    default = qdns.default()
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = list(default.nameservers), default.port
    resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.lifetime = default.timeout
    return resolver
