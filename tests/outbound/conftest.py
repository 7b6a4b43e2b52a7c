"""Fixtures of the outbound queue tests: the lab "internet" and a qpgevent MTA inside it.

The internet (module-wide, ~2 s to build): hosts ``client`` (198.18.0.2), ``mta``
(198.18.0.10, where qpgevent runs), ``dns`` (NSD, 198.18.0.53), ``mx1``..``mx4``
(198.18.0.21-24), ``web`` (198.18.0.80: MTA-STS policies over HTTPS). Postfix listens on
``mx1`` and ``mx2`` (IPv4 and IPv6), both with STARTTLS and DSN: mx1's certificate is valid
for mx1.lab.test, mx2's names another host, and mx1 logs the commands qpgevent sends it; ``mx3`` has nothing on port 25 (connections
refused); ``mx4`` is for Postfix instances a test starts itself (one that comes back, a
slow one). The DNS is a validating unbound in front of NSD; ``dane.test`` is signed.

On loopback, no lab: ``postfix`` (a private Postfix) and ``mta`` (qpgevent with
queue/outbound and the admin pages, late.test routed to a port where nothing listens).
"""

from __future__ import annotations

import hashlib
import stat
import sys
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from outbound_helpers import loopback_ini
from qpgevent.testing.mta import Postfix, free_port
from qpgevent.testing.outbound_lab import LabDns, LabPostfix, NetLab, PolicyServer, sweep
from qpgevent.tls_policy import spki
from qpgevent.testing import ServerProcess, plugin_section, write_ini

HOSTS = {name: (f"198.18.0.{n}", f"2001:db8::{n}") for name, n in
         (("client", 2), ("mta", 10), ("dns", 53), ("mx1", 21), ("mx2", 22), ("mx3", 23), ("mx4", 24),
                              ("web", 80))}

ZONES = {
    "lab.test": {f"mx{i}": [("A", f"198.18.0.2{i}")] for i in range(1, 5)}
    | {"mx2v6": [("AAAA", "2001:db8::22")], "ns": [("A", "198.18.0.53")]},
    "pref.test": {"@": [("MX", "10 mx1.lab.test."), ("MX", "20 mx2.lab.test.")]},
    "fallback.test": {"@": [("MX", "10 mx3.lab.test."), ("MX", "20 mx2.lab.test.")]},
    "six.test": {"@": [("MX", "10 mx2v6.lab.test.")]},
    "implicit.test": {"@": [("A", "198.18.0.22")]},
    "sender.test": {"@": [("MX", "10 mx1.lab.test.")]},
    "nullmx.test": {"@": [("MX", "0 .")]},
    # late.test: an MTA-STS policy in testing mode (nothing enforced) that names mx4, so that
    # REQUIRETLS may use that MX (RFC 8689 4.2.1); unauth.test: the same MX, no policy.
    "late.test": {"@": [("MX", "10 mx4.lab.test.")], "_mta-sts": [("TXT", '"v=STSv1; id=1;"')],
                  "mta-sts": [("A", "198.18.0.80")]},
    "unauth.test": {"@": [("MX", "10 mx4.lab.test.")]},
    # fallback.test with a testing policy: its first MX cannot be reached, its second shows a
    # certificate for another name.
    "stsfallback.test": {"@": [("MX", "10 mx3.lab.test."), ("MX", "20 mx2.lab.test.")],
                         "_mta-sts": [("TXT", '"v=STSv1; id=1;"')], "mta-sts": [("A", "198.18.0.80")]},
    "slow.test": {"@": [("MX", "10 mx4.lab.test.")]},
    # MTA-STS: policies served by the "web" host; mx2's certificate names another host.
    "sts.test": {"@": [("MX", "10 mx2.lab.test.")], "_mta-sts": [("TXT", '"v=STSv1; id=1;"')],
                 "mta-sts": [("A", "198.18.0.80")]},
    "stsok.test": {"@": [("MX", "10 mx1.lab.test.")], "_mta-sts": [("TXT", '"v=STSv1; id=1;"')],
                   "mta-sts": [("A", "198.18.0.80")]},
    # TLS-RPT: an enforce policy; its first MX (mx2) fails the certificate check, the second
    # (mx1) passes; reports go to a mailbox on mx1 and to the web host.
    "stsrpt.test": {"@": [("MX", "10 mx2.lab.test."), ("MX", "20 mx1.lab.test.")],
                    "_mta-sts": [("TXT", '"v=STSv1; id=1;"')], "mta-sts": [("A", "198.18.0.80")],
                    "_smtp._tls": [("TXT", '"v=TLSRPTv1; rua=mailto:tlsrpt@sender.test,https://mta-sts.stsrpt.test/tlsrpt"')]},
    # TLS-RPT: an MTA-STS policy host whose certificate does not name it (sts-webpki-invalid).
    "stsweb.test": {"@": [("MX", "10 mx1.lab.test.")], "_mta-sts": [("TXT", '"v=STSv1; id=1;"')],
                    "mta-sts": [("A", "198.18.0.80")], "_smtp._tls": [("TXT", '"v=TLSRPTv1; rua=mailto:tlsrpt@sender.test"')]},
}
STS_POLICIES = {"sts.test": "version: STSv1\r\nmode: enforce\r\nmx: mx2.lab.test\r\nmax_age: 86400\r\n",
                "stsok.test": "version: STSv1\r\nmode: enforce\r\nmx: *.lab.test\r\nmax_age: 86400\r\n",
                "stsrpt.test": "version: STSv1\r\nmode: enforce\r\nmx: *.lab.test\r\nmax_age: 86400\r\n",
                "late.test": "version: STSv1\r\nmode: testing\r\nmx: mx4.lab.test\r\nmax_age: 86400\r\n",
                "stsfallback.test": "version: STSv1\r\nmode: testing\r\nmx: *.lab.test\r\nmax_age: 86400\r\n"}


def dane_zone(spki_sha256: str, ca_sha256: str, ca_spki_sha256: str, other_ca_sha256: str) -> dict:
    """A signed zone whose MX hosts are all mx1 under other names: good.dane.test's MX
    publishes mx1's key (DANE-EE), bad.dane.test's another key; ta and taspki name the lab
    CA as trust anchor (DANE-TA, by certificate and by key; mx1's certificate names their MX
    hosts), tabad another CA, and taname the lab CA for a MX name mx1's certificate lacks."""
    zone = {"good": [("MX", "10 mx1.dane.test.")], "_25._tcp.mx1": [("TLSA", f"3 1 1 {spki_sha256}")],
            "bad": [("MX", "10 mxbad.dane.test.")], "_25._tcp.mxbad": [("TLSA", "3 1 1 " + "00" * 32)],
            "plain": [("MX", "10 mx1.lab.test.")],
            # A key rollover: the test sets mxroll's TLSA record (LabDns.set_records).
            "roll": [("MX", "10 mxroll.dane.test.")], "_25._tcp.mxroll": [("TLSA", "3 1 1 " + "00" * 32)],
            "_smtp._tls.bad": [("TXT", '"v=TLSRPTv1; rua=mailto:tlsrpt@sender.test"')]}
    for name, tlsa in (("ta", f"2 0 1 {ca_sha256}"), ("taspki", f"2 1 1 {ca_spki_sha256}"),
                       ("tabad", f"2 0 1 {other_ca_sha256}"), ("taname", f"2 0 1 {ca_sha256}")):
        zone |= {name: [("MX", f"10 mx{name}.dane.test.")], f"_25._tcp.mx{name}": [("TLSA", tlsa)]}
    return zone | {f"mx{name}": [("A", "198.18.0.21")] for name in ("1", "bad", "ta", "taspki", "tabad", "taname",
                                                                    "roll")}


#: The DANE-TA MX names mx1's certificate carries beside its own (not mxtaname.dane.test).
DANE_TA_NAMES = ("mxta.dane.test", "mxtaspki.dane.test", "mxtabad.dane.test")


class Internet:
    def __init__(self, lab: NetLab, dns: LabDns, mx1: LabPostfix, mx2: LabPostfix, ca: trustme.CA,
                 folder: Path, web: PolicyServer, mx1_spki_sha256: str) -> None:
        self.lab, self.dns, self.mx1, self.mx2, self.ca, self.folder = lab, dns, mx1, mx2, ca, folder
        self.ca_file = folder / "ca.pem"
        self.web = web
        self.mx1_spki_sha256 = mx1_spki_sha256  #: for a TLSA 3 1 1 record naming mx1's key

    def certificate(self, name: str) -> tuple[Path, Path]:
        """(chain, key) for ``name`` from the lab's CA."""
        return _certificate(self.ca, self.folder, name)[:2]


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _certificate(ca: trustme.CA, folder: Path, *names: str) -> tuple[Path, Path, bytes]:
    """(chain, key, DER certificate) for ``names``, from the lab's CA; the chain file holds
    the certificate and the CA's, as a server sends them (DANE-TA needs the anchor sent)."""
    issued = ca.issue_cert(*names)
    chain, key = folder / f"{names[0]}.pem", folder / f"{names[0]}.key"
    chain.write_bytes(issued.cert_chain_pems[0].bytes() + ca.cert_pem.bytes())
    issued.private_key_pem.write_to_path(str(key))
    for path in (chain, key):
        path.chmod(0o644)
    return chain, key, _der(issued.cert_chain_pems[0].bytes())


@pytest.fixture(scope="module")
def internet(tmp_path_factory):
    sweep()
    folder = tmp_path_factory.mktemp("lab-tls")
    folder.chmod(0o755)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    mx1_cert = _certificate(ca, folder, "mx1.lab.test", *DANE_TA_NAMES)
    mx2_cert = _certificate(ca, folder, "elsewhere.lab.test")  # not mx2's name: MTA-STS must refuse it
    web_cert = _certificate(ca, folder, *(f"mta-sts.{domain}" for domain in STS_POLICIES))
    ca_der = _der(ca.cert_pem.bytes())
    sha256 = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    zone = dane_zone(sha256(spki(mx1_cert[2])), sha256(ca_der), sha256(spki(ca_der)),
                     sha256(_der(trustme.CA().cert_pem.bytes())))
    lab = NetLab(HOSTS)
    started = []
    try:
        dns = LabDns(lab, "dns", "198.18.0.53", {**ZONES, "dane.test": zone}, signed=("dane.test",))
        started.append(dns)
        started.append(PolicyServer(lab, "web", "198.18.0.80", web_cert[0], web_cert[1], STS_POLICIES))
        mx1 = LabPostfix(lab, "mx1", "198.18.0.21", ["a@pref.test", "b@pref.test", "sender@sender.test",
                                                     "s@stsok.test", "x@good.dane.test", "y@bad.dane.test",
                                                     "z@plain.dane.test", "t@ta.dane.test", "u@taspki.dane.test",
                                                     "v@tabad.dane.test", "w@taname.dane.test", "r@stsrpt.test",
                                                     "r@stsweb.test", "tlsrpt@sender.test",
                                                     "k@roll.dane.test"], tls=mx1_cert[:2],
                         main={"debug_peer_list": "198.18.0.10"})  # the commands qpgevent sends, logged
        started.append(mx1)
        mx1.start()
        mx2 = LabPostfix(lab, "mx2", "198.18.0.22", interfaces="198.18.0.22, 2001:db8::22", mailboxes=
                         ["a@pref.test", "b@pref.test", "c@fallback.test", "d@six.test", "e@implicit.test",
                          "s@sts.test"], tls=mx2_cert[:2],
                         main={"inet_protocols": "all", "mynetworks": "198.18.0.0/24, [2001:db8::]/64"})
        started.append(mx2)
        mx2.start()
        yield Internet(lab, dns, mx1, mx2, ca, folder, started[1], sha256(spki(mx1_cert[2])))
    finally:
        for thing in reversed(started):
            if isinstance(thing, LabPostfix):
                thing.cleanup()
            else:
                thing.stop()
        lab.close()


@pytest.fixture
def start_lab_server(internet, tmp_path):
    """``start_lab_server(host, plugins, **ini_settings)``: qpgevent on port 25 of a lab host,
    its files in ``tmp_path/host``; stopped at the end of the test."""
    servers = []

    def start(host, plugins, **settings):
        folder = tmp_path / host
        folder.mkdir(exist_ok=True)
        wrapper = folder / "lab-python"
        # The server's interpreter, run inside the lab host (ip netns exec execs it: same pid).
        wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {internet.lab.ns(host)} {sys.executable} \"$@\"\n")
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        address = HOSTS[host][0]
        ini = write_ini(folder, plugins=plugins, **{"me": f"{host}.lab.test", "listen": f"{address}:25",
                                                    "workers": 1, "dns_nameservers": "198.18.0.53",
                                                    "dns_port": 53, **settings})
        server = ServerProcess(ini, python=str(wrapper))
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.terminate()


@pytest.fixture
def start_mta(internet, tmp_path, start_lab_server):
    """``start_mta(tls=False, **outbound_options)``: qpgevent in host ``mta``, port 25,
    queue/outbound (queue in ``tmp_path/queue``); ``tls``: STARTTLS offered (mta.lab.test)."""

    def start(tls=False, **options):
        options = {"queue_dir": str(tmp_path / "queue"), "minimal_backoff": 1, "maximal_backoff": 2,
                   "tls_ca_file": str(internet.ca_file),
                   "scan_interval": 0.5, "connect_timeout": 5, "command_timeout": 30, **options}
        plugins = "[[relay]]\n  clients = 198.18.0.0/24\n[[rcpt_ok]]\n" + plugin_section("queue/outbound", **options)
        settings = {}
        if tls:
            chain, key = internet.certificate("mta.lab.test")
            settings = {"tls_certificate": str(chain), "tls_key": str(key)}
        return start_lab_server("mta", plugins, **settings)

    return start


@pytest.fixture
def postfix():
    server = Postfix(["sender@sender.test", "late@late.test"]).start()
    yield server
    server.cleanup()


@pytest.fixture
def mta(tmp_path, postfix):
    """late.test goes to a port where nothing listens yet; the rest to Postfix. Long backoff."""
    late_port = free_port()
    server = ServerProcess(loopback_ini(tmp_path, routes=[f"late.test:127.0.0.1:{late_port}",
                                                          f"*:127.0.0.1:{postfix.port}"]))
    server.late_port = late_port
    yield server
    server.terminate()
