"""sender_permitted_from, dkim, dmarc and the one Authentication-Results header, through
the real server and smtplib, against a real NSD on loopback holding SPF, DKIM and DMARC
records; messages are signed in the test with dkimpy (a key made with openssl), and
tampered copies are sent too."""

from __future__ import annotations

import base64
import re
import smtplib
import subprocess
import sys
from pathlib import Path

import dkim as dkimpy
import pytest

from qpgevent import dns
from qpgevent.core.headers import Headers
from qpgevent.testing import maildir_messages
from qpgevent.testing.dns import LoopbackDns


def make_key(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dkim")
    private = directory / "private.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024",
                    "-out", str(private)], check=True, capture_output=True)
    public = subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-outform", "DER"],
                            check=True, capture_output=True).stdout
    return private.read_bytes(), base64.b64encode(public).decode()


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return make_key(tmp_path_factory)


def txt(text):
    """A TXT record in zone-file syntax: quoted strings of at most 255 octets (a DKIM key is longer)."""
    return ("TXT", " ".join(f'"{text[i:i + 200]}"' for i in range(0, len(text), 200)))


@pytest.fixture(scope="module")
def nsd(key):
    _, public = key
    lookups = {f"a{i}": [("A", f"192.0.2.{i}")] for i in range(1, 12)}
    many = " ".join(f"a:a{i}.loop.test" for i in range(1, 12))
    zones = {
        "sender.test": {"@": [txt("v=spf1 ip4:127.0.0.1 -all")],
                        "sel._domainkey": [txt(f"v=DKIM1; k=rsa; p={public}")],
                        "_dmarc": [txt("v=DMARC1; p=reject; sp=quarantine")]},
        "other.test": {"@": [txt("v=spf1 ip4:192.0.2.1 -all")]},
        "soft.test": {"@": [txt("v=spf1 ~all")]},
        "quarantine.test": {"@": [txt("v=spf1 -all")], "_dmarc": [txt("v=DMARC1; p=quarantine")]},
        "loop.test": {"@": [txt(f"v=spf1 {many} -all")], **lookups},
        "nopolicy.test": {"@": [txt("v=spf1 ip4:127.0.0.1 -all")]},
        "explained.test": {"@": [txt("v=spf1 -all exp=why.explained.test")],
                           "why": [txt("%{i} is not one of %{d}'s servers")]},
    }
    with LoopbackDns(zones, servfail_zones=("broken.test",)) as server:
        yield server


@pytest.fixture
def start(make_server, nsd):
    def start_server(spf="reject_on = fail", dkim="", dmarc="", only=("spf", "dkim", "dmarc")):
        parts = {"spf": f"[[sender_permitted_from]]\n  {spf}", "dkim": f"[[dkim]]\n  {dkim}",
                 "dmarc": f"[[dmarc]]\n  {dmarc}"}
        plugins = "\n".join(parts[name] for name in only) + """
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
"""
        return make_server(plugins=plugins, dns_nameservers="127.0.0.1", dns_port=nsd.port, dns_timeout=2)

    return start_server


def message(from_header="Alice <alice@sender.test>", body="lunch at noon?", extra=""):
    return (f"From: {from_header}\r\nTo: bob@example.test\r\nSubject: lunch\r\n"
            f"Date: Tue, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n{extra}"
            f"\r\n{body}\r\n").encode()


def signed(key, data, domain=b"sender.test", selector=b"sel"):
    private, _ = key
    signature = dkimpy.sign(data, selector, domain, private, include_headers=[b"from", b"to", b"subject", b"date"])
    return signature.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") + data


def send(server, sender, data):
    with server.smtp(timeout=30) as client:
        client.ehlo()
        code, text = client.mail(sender)
        if code != 250:
            return code, text.decode()
        client.rcpt("bob@example.test")
        code, text = client.data(data)
    return code, text.decode()


def delivered_header(server):
    [mail] = maildir_messages(server.maildir).values()
    return mail.split(b"\r\n\r\n", 1)[0].decode()


def auth_results(head):
    """The Authentication-Results fields, unfolded, runs of white space as one space."""
    fields = Headers.parse(head.encode() + b"\r\n").get_all("Authentication-Results")
    return [re.sub(r"\s+", " ", field) for field in fields]


# -- SPF ---------------------------------------------------------------------------------

def test_spf_pass_is_recorded_in_received_spf_and_authentication_results(start):
    server = start(only=("spf",))
    assert send(server, "alice@sender.test", message())[0] == 250
    head = delivered_header(server)
    assert head.startswith("Return-Path: <alice@sender.test>\r\n"
                           "Authentication-Results: mx.example.test;\r\n\tspf=pass smtp.mailfrom=alice@sender.test\r\n")
    assert "Received-SPF: pass (mx.example.test:" in head and "client-ip=127.0.0.1;" in head


def test_spf_fail_is_refused_at_mail(start):
    server = start(only=("spf",))
    code, text = send(server, "mallory@other.test", message())
    assert (code, text) == (550, "5.7.1 SPF fail: 127.0.0.1 is not allowed to send mail for other.test")


def test_spf_fail_gives_the_domain_explanation_with_macros_expanded(start):
    server = start(only=("spf",))
    assert send(server, "a@explained.test", message()) == (
        550, "5.7.1 SPF fail: 127.0.0.1 is not allowed to send mail for explained.test: "
             "127.0.0.1 is not one of explained.test's servers")


def test_spf_softfail_passes_by_default_and_refuses_when_configured(start):
    server = start(only=("spf",))
    assert send(server, "a@soft.test", message())[0] == 250
    assert "spf=softfail" in delivered_header(server)
    strict = start(spf="reject_on = fail, softfail", only=("spf",))
    assert send(strict, "a@soft.test", message())[0] == 550


def test_spf_more_than_ten_dns_lookups_is_a_permerror(start):
    server = start(spf="reject_on = permerror", only=("spf",))
    code, text = send(server, "a@loop.test", message())
    assert code == 550 and "SPF permerror" in text and "loop.test" in text, text


def test_spf_dns_failure_defers(start):
    server = start(only=("spf",))
    code, text = send(server, "a@broken.test", message())
    assert (code, text) == (450, "4.7.1 SPF check of broken.test failed temporarily, try again later")


def test_null_sender_is_checked_against_the_helo_name(start):
    server = start(only=("spf",))
    with smtplib.SMTP(server.host, server.port, local_hostname="sender.test", timeout=30) as client:
        client.sendmail("<>", ["bob@example.test"], message())
    assert auth_results(delivered_header(server)) == ["mx.example.test; spf=pass smtp.helo=sender.test"]
    with smtplib.SMTP(server.host, server.port, local_hostname="other.test", timeout=30) as client:
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail("<>", ["bob@example.test"], message())


# -- DKIM --------------------------------------------------------------------------------

def test_dkim_signed_message_passes(start, key):
    server = start(only=("dkim",))
    data = signed(key, message())
    assert send(server, "alice@sender.test", data)[0] == 250
    [results] = auth_results(delivered_header(server))
    assert results.startswith("mx.example.test; dkim=pass header.d=sender.test header.s=sel header.b=")


def test_dkim_signed_message_sent_by_bdat_passes(start, key):
    # The same signature checks out whichever way the message came: BDAT's octets as sent
    # (here cut mid-header and mid-body, lines with leading dots included) make the same
    # Transaction as DATA's unstuffed ones (RFC 3030).
    server = start(only=("dkim",))
    data = signed(key, message(body="lunch at noon?\r\n.see you\r\n..there"))
    cuts = [0, 40, len(data) - 20, len(data)]
    with server.smtp(timeout=30) as client:
        client.ehlo()
        assert client.mail("alice@sender.test", ["BODY=BINARYMIME"])[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        for start_at, end in zip(cuts, cuts[1:]):
            last = b" LAST" if end == len(data) else b""
            client.send(b"BDAT %d%s\r\n" % (end - start_at, last) + data[start_at:end])
            assert client.getreply()[0] == 250
    [results] = auth_results(delivered_header(server))
    assert results.startswith("mx.example.test; dkim=pass header.d=sender.test header.s=sel header.b=")


def test_dkim_tampered_body_and_header_fail(start, key):
    server = start(only=("dkim",))
    data = signed(key, message())
    assert send(server, "alice@sender.test", data.replace(b"lunch at noon?", b"send me the money"))[0] == 250
    assert send(server, "alice@sender.test", data.replace(b"Subject: lunch", b"Subject: money"))[0] == 250
    reasons = set()
    for mail in maildir_messages(server.maildir).values():
        [results] = auth_results(mail.split(b"\r\n\r\n", 1)[0].decode())
        assert results.startswith("mx.example.test; dkim=fail reason=")
        reasons.add(results.split('"')[1])
    assert reasons == {"body hash mismatch", "signature does not verify"}


def test_dkim_unknown_selector_is_a_permerror(start, key):
    server = start(only=("dkim",))
    assert send(server, "alice@sender.test", signed(key, message(), selector=b"gone"))[0] == 250
    assert 'dkim=permerror reason="no key published"' in delivered_header(server)


def test_unsigned_message_is_dkim_none(start):
    server = start(only=("dkim",))
    assert send(server, "alice@sender.test", message())[0] == 250
    assert auth_results(delivered_header(server)) == ["mx.example.test; dkim=none"]


def test_dkim_reject_on_fail_refuses(start, key):
    server = start(dkim="reject_on = fail", only=("dkim",))
    data = signed(key, message()).replace(b"lunch at noon?", b"tampered")
    code, text = send(server, "alice@sender.test", data)
    assert code == 554 and "DKIM fail for sender.test" in text, text


def test_the_dkim_refusal_follows_reject_and_reject_type(start, key):
    data = signed(key, message()).replace(b"lunch at noon?", b"tampered")
    assert send(start(dkim="reject_on = fail\n  reject = 0", only=("dkim",)), "alice@sender.test", data)[0] == 250
    code, text = send(start(dkim="reject_on = fail\n  reject_type = temp", only=("dkim",)), "alice@sender.test", data)
    assert code == 451 and "DKIM fail for sender.test" in text, text


# -- DMARC and the one header ------------------------------------------------------------

def test_dmarc_pass_through_spf_alignment_and_one_header_for_all(start, key):
    server = start()
    forged = ("Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=x@y.test\r\n"
              "Authentication-Results: MX.EXAMPLE.TEST (forged); dmarc=pass\r\n"
              "Authentication-Results: upstream.test; spf=pass smtp.mailfrom=alice@sender.test\r\n")
    assert send(server, "alice@sender.test", signed(key, message(extra=forged)))[0] == 250
    head = delivered_header(server)
    fields = auth_results(head)
    assert len(fields) == 2, fields
    assert fields[0].startswith("mx.example.test; spf=pass smtp.mailfrom=alice@sender.test; dkim=pass")
    assert fields[0].endswith("dmarc=pass header.from=sender.test policy.dmarc=reject")
    assert fields[1] == "upstream.test; spf=pass smtp.mailfrom=alice@sender.test"


def test_dmarc_fail_with_p_reject_is_refused(start):
    server = start(spf="reject_on =")
    code, text = send(server, "bounce@other.test", message())
    assert (code, text) == (554, "5.7.1 DMARC policy of sender.test rejects this message")


def test_the_dmarc_refusal_follows_reject_and_reject_type(start):
    assert send(start(spf="reject_on =", dmarc="reject = 0"), "bounce@other.test", message())[0] == 250
    code, text = send(start(spf="reject_on =", dmarc="reject_type = temp"), "bounce@other.test", message())
    assert code == 451 and text.endswith("DMARC policy of sender.test rejects this message"), text


def test_dmarc_pass_through_dkim_alignment_rescues_an_spf_fail(start, key):
    server = start(spf="reject_on =")
    assert send(server, "bounce@other.test", signed(key, message()))[0] == 250
    fields = auth_results(delivered_header(server))
    assert "spf=fail" in fields[0] and "dkim=pass" in fields[0] and "dmarc=pass" in fields[0]


def test_dmarc_tampered_signed_message_is_refused(start, key):
    server = start(spf="reject_on =")
    data = signed(key, message()).replace(b"lunch at noon?", b"wire the money")
    assert send(server, "bounce@other.test", data)[0] == 554


def test_dmarc_quarantine_and_subdomain_policy(start):
    server = start(spf="reject_on =")
    assert send(server, "a@quarantine.test", message("a@quarantine.test"))[0] == 250
    assert "X-DMARC-Quarantine: quarantine.test policy=quarantine" in delivered_header(server)


def test_dmarc_subdomain_without_record_gets_the_organizational_sp_policy(start):
    server = start(spf="reject_on =")
    assert send(server, "bounce@other.test", message("news@news.sender.test"))[0] == 250  # sp=quarantine
    assert "X-DMARC-Quarantine: news.sender.test policy=quarantine" in delivered_header(server)


def test_dmarc_reject_policy_configured_to_none_only_records(start):
    server = start(spf="reject_on =", dmarc="on_reject = none")
    assert send(server, "bounce@other.test", message())[0] == 250
    assert "dmarc=fail header.from=sender.test policy.dmarc=reject" in " ".join(auth_results(delivered_header(server)))


def test_dmarc_without_record_is_none_and_temperror_defers_when_configured(start):
    server = start()
    assert send(server, "a@nopolicy.test", message("a@nopolicy.test"))[0] == 250
    assert "dmarc=none header.from=nopolicy.test" in delivered_header(server)
    strict = start(spf="reject_on =\n  defer_on =", dmarc="defer_on_temperror = yes")
    code, text = send(strict, "a@sender.test", message("a@broken.test"))
    assert code == 451 and "DMARC policy of broken.test cannot be fetched now" in text, text


# -- DKIM signing ------------------------------------------------------------------------

def test_mail_from_a_relay_client_is_signed_and_the_signature_verifies(make_server, nsd, key, tmp_path):
    private, _ = key
    pem = tmp_path / "sender.test.pem"
    pem.write_bytes(private)
    server = make_server(plugins=f"""
[[relay]]
  clients = 127.0.0.1
[[dkim]]
  sign_keys = sender.test:sel:{pem}
  sign_relay_clients = yes
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
""", dns_nameservers="127.0.0.1", dns_port=nsd.port, dns_timeout=2)
    assert send(server, "alice@sender.test", message())[0] == 250
    [mail] = maildir_messages(server.maildir).values()
    lines = mail.split(b"\r\n")
    assert lines[0].startswith(b"Return-Path:")
    assert lines[1].startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=sender.test;")
    resolver = dns.Resolver(["127.0.0.1"], port=nsd.port)

    def txt_record(name, timeout=5):
        return " ".join(resolver.txt(name.decode().rstrip("."))).encode()

    assert dkimpy.verify(mail, dnsfunc=txt_record)
    assert not dkimpy.verify(mail.replace(b"lunch at noon?", b"lunch at one?"), dnsfunc=txt_record)


def test_mail_from_an_authenticated_user_is_signed(make_server, nsd, key, tmp_path):
    """Real AUTH (auth/flat_file over a plaintext-AUTH listener), no relay plugin: signed."""
    private, _ = key
    pem = tmp_path / "sender.test.pem"
    pem.write_bytes(private)
    tool = Path(__file__).resolve().parents[2] / "tools" / "qpgevent-adduser"
    added = subprocess.run([sys.executable, str(tool), "--stdin", str(tmp_path / "users.auth"), "alice@sender.test"],
                           input="secret\n", text=True, capture_output=True, timeout=30)
    assert added.returncode == 0, added.stderr
    server = make_server(plugins=f"""
[[auth/flat_file]]
  users = users.auth
[[dkim]]
  sign_keys = sender.test:sel:{pem}
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
""", listen="127.0.0.1:0/plainauth", auth_failure_delay=0,
                         dns_nameservers="127.0.0.1", dns_port=nsd.port, dns_timeout=2)
    assert send(server, "alice@sender.test", message())[0] == 250  # not authenticated
    with server.smtp(timeout=10) as client:
        client.ehlo()
        assert client.login("alice@sender.test", "secret")[0] == 235
        assert client.sendmail("alice@sender.test", ["bob@example.test"], message()) == {}
    mails = list(maildir_messages(server.maildir).values())
    [signed] = [mail for mail in mails if b"DKIM-Signature:" in mail]  # one of the two
    assert len(mails) == 2 and b"with ESMTPA" in signed  # and it is the authenticated one
    assert signed.split(b"\r\n")[1].startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=sender.test;")
    resolver = dns.Resolver(["127.0.0.1"], port=nsd.port)

    def txt_record(name, timeout=5):
        return " ".join(resolver.txt(name.decode().rstrip("."))).encode()

    assert dkimpy.verify(signed, dnsfunc=txt_record)


def test_unreadable_signing_key_stops_the_server_at_start(make_server, tmp_path):
    from qpgevent.core.errors import PluginLoadError
    with pytest.raises(PluginLoadError, match="setup failed"):
        make_server(plugins=f"[[dkim]]\n  sign_keys = sender.test:sel:{tmp_path}/missing.pem\n[[queue/discard]]")


# -- DKIM: the body hash computed from the spool, chunk by chunk -----------------------------

def load_dkim_plugin_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "plugins" / "dkim.py"
    spec = importlib.util.spec_from_file_location("qpgevent_test_dkim_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BODIES = [b"", b"\r\n", b"\r\n\r\n\r\n", b"a\r\n", b"a\r\n\r\n\r\n", b"\r\n\r\nb \t c  \r\n \t\r\n\r\n",
          b"line  with\t\ttabs \t \r\n\r\nnext\r\n  \r\n", b"x" * 100 + b"\r\n" + b" " * 7 + b"\r\ny\r\n"]


@pytest.mark.parametrize("canonicalization", ["simple", "relaxed"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 16])
def test_streamed_body_hash_equals_dkimpy_s_canonicalisation(canonicalization, chunk):
    import hashlib
    from dkim.canonicalization import CanonicalizationPolicy
    module = load_dkim_plugin_module()
    policy = CanonicalizationPolicy.from_c_value(f"relaxed/{canonicalization}".encode())
    for body in BODIES:
        pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]
        canonical = policy.canonicalize_body(body)
        assert module.body_hash(pieces, canonicalization, "sha256") == hashlib.sha256(canonical).digest(), body
        assert module.body_hash(pieces, canonicalization, "sha256", 5) == hashlib.sha256(canonical[:5]).digest()


@pytest.mark.parametrize("canonicalize", [(b"relaxed", b"simple"), (b"simple", b"relaxed")])
def test_a_big_signed_message_is_verified_from_the_spool(start, key, canonicalize):
    """A 3.5 MiB body (spooled to disk past 1 MiB), signed in the test; verified, then tampered."""
    private, _ = key
    server = start(only=("dkim",))
    data = message(body=("word  \t word \r\n" * 4 + "\r\n") * 60000 + "the end")
    header = dkimpy.sign(data, b"sel", b"sender.test", private, canonicalize=canonicalize,
                         include_headers=[b"from", b"to", b"subject"])
    signed_data = header.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + data
    assert len(signed_data) > 3_500_000
    assert send(server, "alice@sender.test", signed_data)[0] == 250
    assert send(server, "alice@sender.test", signed_data.replace(b"the end", b"the End"))[0] == 250
    results = sorted(auth_results(mail.split(b"\r\n\r\n", 1)[0].decode())[0].split(";")[1].split()[0]
                     for mail in maildir_messages(server.maildir).values())
    assert results == ["dkim=fail", "dkim=pass"]
