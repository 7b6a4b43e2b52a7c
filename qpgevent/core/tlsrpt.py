"""SMTP TLS Reporting (RFC 8460) as values: the tally, the ``_smtp._tls`` record, the report and its mail.

Owns what TLS-RPT *is*, without I/O: a ``Tally`` of TLS sessions per policy (the
successes and the failures by result type, host and address), which ``backends.tlsrpt``
keeps on disk as JSON; the parsing of a domain's ``v=TLSRPTv1; rua=...`` record (RFC
8460 3); the aggregate report (RFC 8460 4: organization-name, date-range, contact-info,
report-id, policies with their summary and failure-details); the gzipped file name
(5.1); and the report as a mail (5.3: ``multipart/report; report-type="tlsrpt"``, the
``TLS-Report-Domain`` and ``TLS-Report-Submitter`` headers, the subject RFC 8460 shows).
"""

from __future__ import annotations

import gzip
import json
import re
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone
from typing import Any

__all__ = ["NO_POLICY", "Policy", "Tally", "filename", "parse_record", "report", "report_mail",
           "result_of_verify_code"]

NO_POLICY = "no-policy-found"
#: OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) -> RFC 8460 4.3.2.1.
_VERIFY_RESULTS = {62: "certificate-host-mismatch", 10: "certificate-expired", 9: "certificate-expired",
                   2: "certificate-not-trusted", 18: "certificate-not-trusted", 19: "certificate-not-trusted",
                   20: "certificate-not-trusted", 21: "certificate-not-trusted"}


def result_of_verify_code(code: int | None) -> str:
    """The result type of a certificate the TLS library refused."""
    return _VERIFY_RESULTS.get(code or 0, "validation-failure")


@dataclass(frozen=True)
class Policy:
    """The policy in force for a TLS session (RFC 8460 4.3: policy-type, -string, -domain, mx-host)."""

    domain: str
    type: str = NO_POLICY  #: sts, tlsa or no-policy-found
    strings: tuple[str, ...] = ()  #: the STS policy's lines, or the TLSA records as text
    mx: tuple[str, ...] = ()  #: the STS policy's mx patterns, or the MX host of the TLSA records

    @property
    def key(self) -> str:
        return json.dumps([self.domain, self.type, self.strings, self.mx])

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"policy-type": self.type, "policy-domain": self.domain}
        if self.type != NO_POLICY:
            data |= {"policy-string": list(self.strings), "mx-host": list(self.mx)}
        return data


@dataclass
class Tally:
    """TLS sessions counted since ``start``, per policy: {policy key: entry}."""

    start: float
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def count(self, policy: Policy, result: str, mx: str = "", ip: str = "", reason: str = "",
              limit: int = 0) -> bool:
        """One session: ``result`` is "success" or an RFC 8460 result type. False (not counted)
        when it would be a new policy beyond ``limit`` policies (0: no limit)."""
        entry = self.policies.get(policy.key)
        if entry is None:
            if limit and len(self.policies) >= limit:
                return False
            entry = self.policies[policy.key] = {"policy": policy.as_json(), "success": 0, "failures": {}}
        if result == "success":
            entry["success"] += 1
            return True
        detail = json.dumps([result, mx, ip, reason[:200]])
        entry["failures"][detail] = entry["failures"].get(detail, 0) + 1
        return True

    def domains(self) -> list[str]:
        return sorted({entry["policy"]["policy-domain"] for entry in self.policies.values()})

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "policies": self.policies}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        return cls(float(data["start"]), dict(data["policies"]))


def parse_record(texts: list[str]) -> list[str]:
    """The rua URIs of a domain's ``_smtp._tls`` TXT records; [] unless exactly one is TLSRPTv1."""
    records = [t for t in texts if re.match(r"v=TLSRPTv1\s*(;|$)", t)]
    if len(records) != 1:
        return []  # RFC 8460 3: none, or several: no reporting
    for part in records[0].split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip() == "rua":
            return [uri.strip() for uri in value.split(",")
                    if uri.strip().startswith(("mailto:", "https:"))]
    return []


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def report(tally: Tally, end: float, domain: str, organization: str, contact: str, report_id: str) -> dict[str, Any]:
    """The aggregate report (RFC 8460 4.4) about ``domain`` for the sessions of ``tally``."""
    policies = []
    for entry in tally.policies.values():
        if entry["policy"]["policy-domain"] != domain:
            continue
        details = []
        for detail, count in sorted(entry["failures"].items()):
            result, mx, ip, reason = json.loads(detail)
            item: dict[str, Any] = {"result-type": result}
            item |= {"receiving-mx-hostname": mx} if mx else {}
            item |= {"receiving-ip": ip} if ip else {}
            item |= {"failure-reason-code": reason} if reason else {}
            details.append(item | {"failed-session-count": count})
        policies.append({"policy": entry["policy"],
                         "summary": {"total-successful-session-count": entry["success"],
                                     "total-failure-session-count": sum(entry["failures"].values())},
                         "failure-details": details})
    return {"organization-name": organization,
            "date-range": {"start-datetime": _utc(tally.start), "end-datetime": _utc(end)},
            "contact-info": contact, "report-id": report_id, "policies": policies}


def filename(submitter: str, domain: str, start: float, end: float, unique: str) -> str:
    """RFC 8460 5.1: ``submitter!policy-domain!begin!end!unique-id.json.gz``."""
    return f"{submitter}!{domain}!{int(start)}!{int(end)}!{unique}.json.gz"


def gzipped(data: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(data, indent=1).encode(), mtime=0)


def report_mail(data: dict[str, Any], domain: str, submitter: str, sender: str, to: str, name: str,
                now: float | None = None) -> bytes:
    """The report as a message (RFC 8460 5.3), the gzipped JSON attached as application/tlsrpt+gzip."""
    message = EmailMessage(policy=SMTP)
    message["From"] = sender
    message["To"] = to
    message["Date"] = format_datetime(datetime.fromtimestamp(now or time.time(), timezone.utc))
    message["Message-ID"] = make_msgid(domain=submitter)
    message["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{data['report-id']}>"
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    message.set_content(f"This is an aggregate TLS report (RFC 8460) from {submitter} about mail to {domain}, "
                        f"{data['date-range']['start-datetime']} to {data['date-range']['end-datetime']}.\n")
    message.add_attachment(gzipped(data), maintype="application", subtype="tlsrpt+gzip", filename=name)
    message.set_type("multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes()
