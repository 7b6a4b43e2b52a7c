"""DANE (RFC 6698, 7671, 7672): does a server's certificate chain match its TLSA records?

Owns the check the outbound queue makes after STARTTLS to a MX host whose TLSA records
the resolver validated (``tls_policy`` finds the records; this module judges a chain):

- DANE-EE (usage 3): the leaf certificate (selector 0) or its public key (selector 1)
  matches the record's data, whole (matching type 0) or as its SHA-256 (1) or SHA-512
  (2) digest. Nothing else is checked: with DANE-EE the DNS vouches for the key, names
  and dates do not matter (RFC 7672 3.1.1).
- DANE-TA (usage 2): a certificate of the chain *as the server sent it*, other than the
  leaf, matches the record (the trust anchor), and the leaf chains up to it: each
  certificate on the way is signed by the next one, found among those the server sent,
  which is a CA (basicConstraints); every certificate below the anchor is within its
  dates (the anchor's own dates are the DNS's business, as with DANE-EE); and the leaf
  names the MX host (RFC 7672 3.2.2), in its DNS subjectAltNames (its common name only
  when it has none), where ``*`` may stand for the whole leftmost label (RFC 6125
  6.4.3). A ``2 1 0`` record (the anchor's whole public key) needs no certificate in
  the chain: the last certificate of the path must be signed by that key (RFC 7671 5.2.2).
- PKIX-TA and PKIX-EE (usages 0 and 1), unknown selectors and matching types are not
  usable for SMTP (RFC 7672 3.1.3): ``usable`` leaves them out, and a host with only
  such records gets TLS without a certificate check.

``check`` answers ``None`` (authenticated) or a ``Failure`` whose ``result_type`` is the
RFC 8460 name that TLS-RPT reports it under. Needs the ``cryptography`` package for DANE-TA
only (the ``outbound`` extra); without it a DANE-TA host is deferred, never trusted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

__all__ = ["Failure", "Record", "check", "name_matches", "spki", "usable"]

Record = tuple[int, int, int, bytes]  #: (usage, selector, matching type, data) of one TLSA record
MAX_DEPTH = 8  #: certificates between the leaf and its anchor, at most: a chain is short


@dataclass(frozen=True)
class Failure:
    result_type: str  #: the RFC 8460 4.3.2 result type: tlsa-invalid, certificate-host-mismatch, ...
    reason: str


def _der_element(data: bytes, offset: int) -> tuple[int, int, int]:
    """(start of content, end of element, tag) of the DER element at ``offset``."""
    tag = data[offset]
    length = data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[start:start + count], "big")
        start += count
    return start, start + length, tag


def spki(certificate: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a DER certificate (RFC 5280 4.1), as DER."""
    tbs_start, _, _ = _der_element(certificate, 0)  # Certificate ::= SEQUENCE {
    position, _, _ = _der_element(certificate, tbs_start)  # tbsCertificate ::= SEQUENCE {
    if certificate[position] == 0xA0:  # [0] EXPLICIT version
        position = _der_element(certificate, position)[1]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        position = _der_element(certificate, position)[1]
    _, end, _ = _der_element(certificate, position)
    return certificate[position:end]


def usable(records: list[Record]) -> list[Record]:
    """The records an SMTP client may use: DANE-TA or DANE-EE, known selector and matching type."""
    return [r for r in records if r[0] in (2, 3) and r[1] in (0, 1) and r[2] in (0, 1, 2)]


def _matches(certificate: bytes, record: Record) -> bool:
    _, selector, mtype, data = record
    try:
        selected = certificate if selector == 0 else spki(certificate)
    except IndexError:
        return False  # not DER at all: matches nothing
    if mtype == 1:
        selected = hashlib.sha256(selected).digest()
    elif mtype == 2:
        selected = hashlib.sha512(selected).digest()
    return selected == data


def name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 6.4.3 as RFC 7672 allows it: exact, or ``*`` as the whole leftmost label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and "." in pattern[2:] and rest == pattern[2:]
    return "*" not in pattern and pattern == host


def check(chain: list[bytes], records: list[Record], host: str, now: datetime | None = None) -> Failure | None:
    """None if ``chain`` (DER, the leaf first, as sent) is authenticated by ``records`` for MX ``host``."""
    records = usable(records)
    if not chain:
        return Failure("validation-failure", "the server sent no certificate")
    if any(_matches(chain[0], r) for r in records if r[0] == 3):
        return None
    anchors = [r for r in records if r[0] == 2]
    if not anchors:
        return Failure("tlsa-invalid", "the certificate matches no TLSA record")
    try:
        return _dane_ta(chain, anchors, host, now or datetime.now(timezone.utc))
    except ImportError:
        return Failure("validation-failure", "DANE-TA needs the cryptography package (pip install qpgevent[outbound])")


def _dane_ta(chain: list[bytes], anchors: list[Record], host: str, now: datetime) -> Failure | None:
    from cryptography import x509

    try:
        certificates = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as error:
        return Failure("validation-failure", f"a certificate of the chain cannot be read: {error}")
    path: list[Any] = [certificates[0]]  #: the leaf and the certificates up to the anchor, excluded
    anchor_sent: bool | None = None  #: None: no anchor reached; False: a "2 1 0" key, not sent
    for _ in range(MAX_DEPTH):
        current = path[-1]
        if any(r[1:3] == (1, 0) and _signed_by_key(current, r[3]) for r in anchors):
            anchor_sent = False  # RFC 7671 5.2.2: the anchor's key itself, which need not be sent
            break
        issuer = next((c for c in certificates[1:] if c not in path and _issued(current, c)), None)
        if issuer is None or not _is_ca(issuer):
            break
        if any(_matches(chain[certificates.index(issuer)], r) for r in anchors):
            anchor_sent = True
            break
        path.append(issuer)
    if anchor_sent is None:
        if not any(_matches(der, r) for der in chain[1:] for r in anchors):
            return Failure("tlsa-invalid", "no certificate of the chain matches a TLSA trust anchor record")
        return Failure("validation-failure", "the certificate does not chain to its TLSA trust anchor")
    for certificate in path:  # the anchor's own dates are not checked: the DNS vouches for it
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            return Failure("certificate-expired", f"{certificate.subject.rfc4514_string()} is valid only from "
                           f"{certificate.not_valid_before_utc:%Y-%m-%d} to {certificate.not_valid_after_utc:%Y-%m-%d}")
    names = _names(certificates[0])
    if not any(name_matches(name, host) for name in names):
        return Failure("certificate-host-mismatch", f"the certificate names {', '.join(names) or 'nothing'}, "
                       f"not {host}")
    return None


def _issued(child: Any, parent: Any) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(certificate: Any) -> bool:
    from cryptography import x509

    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by_key(certificate: Any, key_der: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    try:
        key = load_der_public_key(key_der)
        signature, data, digest = (certificate.signature, certificate.tbs_certificate_bytes,
                                   certificate.signature_hash_algorithm)
        if isinstance(key, rsa.RSAPublicKey) and digest is not None:
            key.verify(signature, data, padding.PKCS1v15(), digest)
        elif isinstance(key, ec.EllipticCurvePublicKey) and digest is not None:
            key.verify(signature, data, ec.ECDSA(digest))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(signature, data)
        else:
            return False
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _names(certificate: Any) -> list[str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        return list(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                    .value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:  # RFC 6125 6.4.4: the CN only when there are no DNS names
        return [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
