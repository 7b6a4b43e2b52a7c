"""DANE chain checks on their own (qpgevent.backends.dane): real certificates from test CAs.

DANE-TA (usage 2): the anchor must be among the certificates sent (or be a bare ``2 1 0``
key), the leaf must chain to it, be within its dates and name the MX host; DANE-EE
(usage 3) matches the leaf's key whatever its name. The lab tests (test_lab_tls.py) check
the same over STARTTLS to Postfix.
"""

from __future__ import annotations

import datetime
import hashlib
import sys

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qpgevent.backends.dane import check, name_matches, spki, usable

MX = "mx.dane.test"


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def chain_of(leaf: trustme.LeafCert, *cas: trustme.CA) -> list[bytes]:
    """The chain a server configured with ``leaf`` (and its intermediates) plus ``cas`` sends."""
    return [der(blob.bytes()) for blob in leaf.cert_chain_pems] + [der(ca.cert_pem.bytes()) for ca in cas]


def record(usage: int, selector: int, mtype: int, certificate: bytes) -> tuple[int, int, int, bytes]:
    selected = certificate if selector == 0 else spki(certificate)
    digest = {0: lambda b: b, 1: lambda b: hashlib.sha256(b).digest(), 2: lambda b: hashlib.sha512(b).digest()}
    return usage, selector, mtype, digest[mtype](selected)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.mark.parametrize("selector, mtype", [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_a_leaf_chaining_to_the_anchor_sent_with_it_and_naming_the_mx_is_authenticated(ca, selector, mtype):
    leaf = ca.issue_cert(MX)
    assert check(chain_of(leaf, ca), [record(2, selector, mtype, der(ca.cert_pem.bytes()))], MX) is None


def test_the_anchor_may_be_an_intermediate_or_the_root_above_it(ca):
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert(MX)
    sent = chain_of(leaf, ca)  # trustme's chain holds the intermediate already
    assert len(sent) == 3
    assert check(sent, [record(2, 1, 1, der(intermediate.cert_pem.bytes()))], MX) is None
    assert check(sent, [record(2, 1, 1, der(ca.cert_pem.bytes()))], MX) is None
    # The intermediate left out: the leaf no longer reaches the root it names.
    failure = check([sent[0], sent[2]], [record(2, 1, 1, der(ca.cert_pem.bytes()))], MX)
    assert failure is not None and failure.result_type == "validation-failure"


def test_an_anchor_not_in_the_chain_is_tlsa_invalid(ca):
    leaf = ca.issue_cert(MX)
    other = trustme.CA()
    failure = check(chain_of(leaf, ca), [record(2, 0, 1, der(other.cert_pem.bytes()))], MX)
    assert failure is not None and failure.result_type == "tlsa-invalid"
    # Only the leaf sent: nothing can be the anchor.
    failure = check(chain_of(leaf), [record(2, 0, 1, der(ca.cert_pem.bytes()))], MX)
    assert failure is not None and failure.result_type == "tlsa-invalid"


def test_a_leaf_from_another_ca_sent_beside_the_anchor_does_not_chain_to_it(ca):
    stranger = trustme.CA().issue_cert(MX)
    failure = check(chain_of(stranger, ca), [record(2, 1, 1, der(ca.cert_pem.bytes()))], MX)
    assert failure is not None and failure.result_type == "validation-failure"


def test_the_leaf_cannot_be_its_own_trust_anchor(ca):
    leaf = ca.issue_cert(MX)
    sent = chain_of(leaf, ca)
    failure = check(sent, [record(2, 1, 1, sent[0])], MX)
    assert failure is not None and failure.result_type == "tlsa-invalid"


def test_the_leaf_must_name_the_mx_host(ca):
    sent = chain_of(ca.issue_cert("elsewhere.dane.test"), ca)
    failure = check(sent, [record(2, 0, 1, der(ca.cert_pem.bytes()))], MX)
    assert failure is not None and failure.result_type == "certificate-host-mismatch"
    assert "elsewhere.dane.test" in failure.reason and MX in failure.reason
    # A wildcard for the leftmost label names it.
    sent = chain_of(ca.issue_cert("*.dane.test"), ca)
    assert check(sent, [record(2, 0, 1, der(ca.cert_pem.bytes()))], MX) is None
    assert check(sent, [record(2, 0, 1, der(ca.cert_pem.bytes()))], "a.mx.dane.test").result_type == \
        "certificate-host-mismatch"


def test_names_match_exactly_or_by_one_whole_leftmost_wildcard_label():
    assert name_matches("MX.Dane.Test.", "mx.dane.test")
    assert name_matches("*.dane.test", "mx.dane.test")
    assert not name_matches("*.dane.test", "dane.test")
    assert not name_matches("*.dane.test", "a.mx.dane.test")
    assert not name_matches("m*.dane.test", "mx.dane.test")  # partial wildcards: not for DANE
    assert not name_matches("*.test", "dane.test")  # not a wildcard for a whole top-level domain


def test_an_expired_leaf_is_refused_even_under_its_anchor(ca):
    now = datetime.datetime.now(datetime.timezone.utc)
    old = ca.issue_cert(MX, not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
    failure = check(chain_of(old, ca), [record(2, 1, 1, der(ca.cert_pem.bytes()))], MX)
    assert failure is not None and failure.result_type == "certificate-expired"


def test_a_bare_public_key_anchor_needs_no_certificate_in_the_chain(ca):
    leaf = ca.issue_cert(MX)
    anchor_key = spki(der(ca.cert_pem.bytes()))
    assert check(chain_of(leaf), [(2, 1, 0, anchor_key)], MX) is None
    other_key = spki(der(trustme.CA().cert_pem.bytes()))
    assert check(chain_of(leaf), [(2, 1, 0, other_key)], MX).result_type == "tlsa-invalid"


def test_dane_ee_matches_the_leaf_key_whatever_its_name(ca):
    sent = chain_of(ca.issue_cert("elsewhere.dane.test"))
    assert check(sent, [record(3, 1, 1, sent[0])], MX) is None
    failure = check(sent, [record(3, 1, 1, der(ca.cert_pem.bytes()))], MX)
    assert failure is not None and failure.result_type == "tlsa-invalid"


def test_pkix_usages_and_unknown_parameters_are_not_usable_for_smtp(ca):
    sent = chain_of(ca.issue_cert(MX), ca)
    root = der(ca.cert_pem.bytes())
    unusable = [record(0, 0, 1, root), record(1, 0, 1, sent[0]), (3, 2, 1, b"x"), (2, 0, 3, b"x")]
    assert usable(unusable) == []
    assert check(sent, unusable, MX).result_type == "tlsa-invalid"
    assert usable([*unusable, record(2, 0, 1, root)]) == [record(2, 0, 1, root)]


def test_garbage_instead_of_a_chain_is_a_validation_failure(ca):
    failure = check([b"\x30\x03\x02\x01\x00", b"not a certificate"], [record(2, 0, 1, der(ca.cert_pem.bytes()))], MX)
    assert failure is not None and failure.result_type in ("validation-failure", "tlsa-invalid")
    assert check([], [record(2, 0, 1, der(ca.cert_pem.bytes()))], MX).result_type == "validation-failure"


def test_without_the_cryptography_package_a_dane_ta_host_fails_closed(ca, monkeypatch):
    sent = chain_of(ca.issue_cert(MX), ca)
    monkeypatch.setitem(sys.modules, "cryptography", None)  # as if it were not installed
    failure = check(sent, [record(2, 0, 1, der(ca.cert_pem.bytes()))], MX)
    assert failure is not None and "cryptography" in failure.reason
    assert check(sent, [record(3, 1, 1, sent[0])], MX) is None  # DANE-EE needs no cryptography
