"""dmarc: apply the From domain's DMARC policy (RFC 7489) from the SPF and DKIM results.

After the message is received (data_post; put it after sender_permitted_from and dkim,
which record their results in ``transaction.results``), for the domain of the From
header:

1. the policy record: TXT ``_dmarc.<from domain>``, else ``_dmarc.<organizational
   domain>`` (RFC 7489 6.6.3; the organizational domain is found with the Public Suffix
   List, ``public_suffix_list``); no record: ``dmarc=none``, nothing else happens;
2. alignment (3.1): SPF aligns when it passed for a domain equal to the From domain
   (``aspf=s``) or with the same organizational domain (``aspf=r``, the default); DKIM
   aligns when a signature passed for such a ``d=`` (``adkim``). Either one aligned is
   ``dmarc=pass``; neither is ``dmarc=fail``;
3. on fail, the policy (``p``, or ``sp`` for a subdomain that has no record of its own),
   applied to ``pct`` percent of the failing mail, is honoured as configured:
   ``on_reject`` and ``on_quarantine`` say what each policy does here:
     reject      refuse: ``550 5.7.1 DMARC policy of <domain> rejects this message``
                 (``reject`` / ``reject_type`` apply)
     quarantine  accept with ``X-DMARC-Quarantine: <domain> policy=<p>``, and
                 ``transaction.notes["quarantine"]`` set, for the delivery agent
     none        only record the result

A DNS failure looking up the record is ``dmarc=temperror``: deferred with 451 when
``defer_on_temperror`` (default no: accepted and recorded). A From header with no
domain, or several From addresses, is ``dmarc=permerror`` and accepted (RFC 7489 6.6.1
leaves it to us; other plugins, ``headers``, can refuse it).

Recorded: ``transaction.results.get("dmarc")`` (outcome pass, fail, err for the errors,
skip for none; evidence ``result``, ``domain``, ``policy``, ``applied``)
and ``dmarc=<result> header.from=<domain> policy.dmarc=<p>`` in the message's one
Authentication-Results header. Relay clients are not checked.

Options:
  on_reject             reject, quarantine or none (default reject)
  on_quarantine         reject, quarantine or none (default quarantine)
  defer_on_temperror    451 when the record cannot be fetched (default no)
  public_suffix_list    default /usr/share/publicsuffix/public_suffix_list.dat (Debian's
                        ``publicsuffix`` package); missing: the last two labels
  plus the standard reject, reject_type, loglevel, timeout

Example::

    [[dmarc]]
      on_quarantine = none
      defer_on_temperror = yes
"""

import email.utils
import os
import random

from qpgevent import authresults, dns
from qpgevent.plugin import DECLINED, DENYSOFT, Plugin
from qpgevent.results import AUTH_OUTCOMES

ACTIONS = 'option("reject", "quarantine", "none", default="%s")'


class PublicSuffixes:
    """The Public Suffix List's rules (exact, ``*.`` wildcard, ``!`` exception) in sets."""

    def __init__(self, path):
        self.rules, self.wildcards, self.exceptions = set(), set(), set()
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                rule = line.split("//", 1)[0].strip().lower()
                if not rule:
                    continue
                kind = "!" if rule.startswith("!") else "*" if rule.startswith("*.") else ""
                name = dns.ascii_name(rule.lstrip("!").removeprefix("*."))
                if name is not None:
                    {"!": self.exceptions, "*": self.wildcards, "": self.rules}[kind].add(name)

    def organizational_domain(self, domain):
        """RFC 7489 3.2: the public suffix plus one label (``mail.sender.co.uk`` -> ``sender.co.uk``)."""
        labels = domain.lower().split(".")
        suffix_length = 1
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if candidate in self.exceptions:
                suffix_length = len(labels) - i - 1
                break
            if candidate in self.rules:
                suffix_length = len(labels) - i
                break
            if i + 1 < len(labels) and ".".join(labels[i + 1:]) in self.wildcards:
                suffix_length = len(labels) - i
                break
        keep = min(len(labels), suffix_length + 1)
        return ".".join(labels[-keep:])


def parse_record(text):
    """``v=DMARC1; p=reject; ...`` -> tags, or None when it is not a DMARC record."""
    tags = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = value.strip()
    if tags.get("v") != "DMARC1" or not text.strip().startswith("v"):
        return None
    return tags


class Dmarc(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = [
        "on_reject = " + ACTIONS % "reject",
        "on_quarantine = " + ACTIONS % "quarantine",
        "defer_on_temperror = boolean(default=no)",
        'public_suffix_list = string(default="/usr/share/publicsuffix/public_suffix_list.dat")',
    ]

    def setup(self):
        self.suffixes = PublicSuffixes(self.config["public_suffix_list"])

    def hook_data_post(self, session):
        transaction = session.transaction
        if session.connection.relay_client:
            return DECLINED
        addresses = email.utils.getaddresses(transaction.headers.get_all("From"))
        domains = {address.rpartition("@")[2].lower() for _, address in addresses if "@" in address}
        if len(addresses) != 1 or len(domains) != 1:
            return self._done(transaction, "permerror", None, None, False, "no single From domain")
        domain = dns.ascii_name(domains.pop())
        if domain is None:
            return self._done(transaction, "permerror", None, None, False, "From domain is not a DNS name")
        organizational = self.suffixes.organizational_domain(domain)
        try:
            record, policy_key = self._record(domain), "p"
            if record is None and organizational != domain:
                record, policy_key = self._record(organizational), "sp"
        except dns.TemporaryFailure as error:
            self.log.info("dmarc=temperror for %s: %s", domain, error)
            self._done(transaction, "temperror", domain, None, False, None)
            if self.config["defer_on_temperror"]:
                return DENYSOFT, f"DMARC policy of {domain} cannot be fetched now, try again later"
            return DECLINED
        if record is None:
            return self._done(transaction, "none", domain, None, False, None)
        policy = (record.get(policy_key) or record.get("p") or "none").lower()
        if self._aligned(transaction, domain, organizational, record):
            return self._done(transaction, "pass", domain, policy, False, None)
        try:
            percent = int(record.get("pct", "100"))
        except ValueError:
            percent = 100
        applied = policy in ("reject", "quarantine") and random.randrange(100) < percent
        self._done(transaction, "fail", domain, policy, applied, None)
        if not applied:
            return DECLINED
        action = self.config["on_reject" if policy == "reject" else "on_quarantine"]
        self.log.info("dmarc=fail domain=%s policy=%s action=%s", domain, policy, action)
        if action == "reject":
            return self.reject(f"DMARC policy of {domain} rejects this message", session)
        if action == "quarantine":
            transaction.notes["quarantine"] = f"DMARC policy of {domain}"
            transaction.headers.add("X-DMARC-Quarantine", f"{domain} policy={policy}")
        return DECLINED

    def _record(self, domain):
        records = [tags for tags in map(parse_record, dns.txt(f"_dmarc.{domain}")) if tags is not None]
        return records[0] if len(records) == 1 else None  # RFC 7489 6.6.3: several is none

    def _aligned(self, transaction, domain, organizational, record):
        def aligned(other, mode):
            other = (other or "").lower()
            if mode == "s":
                return other == domain
            return other == domain or self.suffixes.organizational_domain(other) == organizational

        spf = transaction.results.get("sender_permitted_from")
        spf = spf.evidence if spf is not None else {}
        # The SPF-authenticated domain: MAIL FROM's, or HELO's for the null sender (RFC 7208 2.4).
        if spf.get("result") == "pass" and aligned(spf.get("domain"), record.get("aspf", "r")):
            return True
        return any(signature["result"] == "pass" and aligned(signature["domain"], record.get("adkim", "r"))
                   for signature in _evidence(transaction, "dkim", "signatures"))

    def _done(self, transaction, result, domain, policy, applied, reason):
        transaction.results.record(self, AUTH_OUTCOMES[result], "dmarc", result=result, domain=domain,
                                   policy=policy, applied=applied)
        authresults.record(transaction, "dmarc", result, reason, header_from=domain, policy_dmarc=policy)
        return DECLINED


def _evidence(transaction, plugin, key):
    """What ``plugin`` recorded under ``key`` for this message (nothing: an empty list)."""
    found = transaction.results.get(plugin)
    return found.get(key, []) if found is not None else []
