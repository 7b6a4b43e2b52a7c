"""The real Debian milters on loopback for the milter tests: OpenDKIM, clamav-milter (over a
real clamd with a test signature), OpenDMARC (with NSD answering its DNS) and rspamd's milter
proxy. Each starts on a free port, returns once it answers option negotiation, and stops with
its process group. How they are set up and why: shared/recipes/*-milter.md and rspamd.md."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import tempfile
import urllib.request

from qpgevent.testing.scanners import LoopbackClamd, _Daemon, free_tcp_port

HOST = "127.0.0.1"


def negotiates(port: int) -> bool:
    """Whether a milter answers SMFIC_OPTNEG on ``port`` with version 6 (the readiness probe)."""
    with socket.create_connection((HOST, port), timeout=1) as sock:
        sock.sendall(struct.pack("!IBIII", 13, ord("O"), 6, 0x1FF, 0x1FFFFF))
        head = sock.recv(5)
        return len(head) == 5 and head[4:5] == b"O" and struct.unpack("!I", sock.recv(4))[0] == 6


class _Milter(_Daemon):
    """A milter daemon on a free loopback port; killed at the end (libmilter honours SIGTERM
    only every 5 s), and ``kill()`` is also how a test makes it die mid-session."""

    def __init__(self) -> None:
        super().__init__()
        self.workdir = tempfile.mkdtemp(prefix=f"qpg-{self.name}-")
        os.chmod(self.workdir, 0o755)
        self.port = free_tcp_port()

    @property
    def address(self) -> str:
        return f"inet:{HOST}:{self.port}"

    def kill(self) -> None:
        """Kill it now (SIGKILL to the group): a milter that dies mid-session."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(10)

    def stop(self) -> None:
        self.kill()
        super().stop()


class OpenDkim(_Milter):
    """opendkim signing ``domain`` (selector qpg) for 127.0.0.1, verifying the rest."""

    name = "opendkim"

    def __init__(self, timeout: float = 30.0, domain: str = "example.test") -> None:
        super().__init__()
        d, self.domain = self.workdir, domain
        subprocess.run(["opendkim-genkey", "-D", d, "-d", domain, "-s", "qpg"], check=True)
        with open(f"{d}/qpg.txt") as handle:
            self.txt = "".join(re.findall(r'"([^"]*)"', handle.read()))
        with open(f"{d}/dns.data", "w") as handle:
            handle.write(f"qpg._domainkey.{domain} {self.txt}\n")
        with open(f"{d}/opendkim.conf", "w") as handle:
            handle.write(f"Background no\nSyslog no\nMode sv\nDomain {domain}\nSelector qpg\n"
                         f"KeyFile {d}/qpg.private\nRequireSafeKeys no\nSocket inet:{self.port}@{HOST}\n"
                         f"PidFile {d}/opendkim.pid\nTemporaryDirectory {d}\n"
                         f"Canonicalization relaxed/simple\nInternalHosts 127.0.0.1\n"
                         f"TestDNSData file:{d}/dns.data\n")
        self._start(["opendkim", "-x", f"{d}/opendkim.conf"], lambda: negotiates(self.port), timeout)

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes:
        """dkimpy's DNS lookup, answered from the test key."""
        return self.txt.encode() if name == f"qpg._domainkey.{self.domain}.".encode() else b""


class ClamavMilter(_Milter):
    """clamav-milter in front of ``clamd`` (a LoopbackClamd): rejects EICAR with its name."""

    name = "clamav-milter"

    def __init__(self, clamd: LoopbackClamd, timeout: float = 30.0) -> None:
        super().__init__()
        d = self.workdir
        os.mkdir(f"{d}/tmp")
        with open(f"{d}/clamav-milter.conf", "w") as handle:
            handle.write(f"MilterSocket inet:{self.port}@{HOST}\nClamdSocket tcp:{HOST}:{clamd.port}\n"
                         f"Foreground yes\nPidFile {d}/clamav-milter.pid\nTemporaryDirectory {d}/tmp\n"
                         f"LogFile {d}/clamav-milter.log\nLogInfected Basic\nOnClean Accept\n"
                         f"OnInfected Reject\nRejectMsg Virus found: %v\nOnFail Defer\nAddHeader Replace\n"
                         f"ReportHostname mx.example.test\nMaxFileSize 25M\n")
        self._start(["clamav-milter", f"--config-file={d}/clamav-milter.conf"], lambda: negotiates(self.port),
                    timeout)


class Rspamd(_Milter):
    """rspamd offline with its milter proxy; Subject QPG-SPAM scores 8 (add header), GTUBE rejects."""

    name = "rspamd"
    MODULES_OFF = ("rbl surbl whitelist phishing multimap mime_types mid fuzzy_check asn spf dkim dmarc arc "
                   "hfilter emails rspamd_update url_redirector reputation neural ratelimit greylist replies "
                   "history_redis").split()

    def __init__(self, timeout: float = 60.0) -> None:
        super().__init__()
        d = self.workdir
        for sub in ("etc/local.d", "etc/override.d", "db", "run", "log", "tmp"):
            os.makedirs(f"{d}/{sub}")
        self.http_port, dead_dns = free_tcp_port(), free_tcp_port()
        files = {
            "tld.dat": "test\nexample\ncom\norg\nnet\n",
            "etc/local.d/options.inc": (f'dns {{ nameserver = ["{HOST}:{dead_dns}"]; timeout = 0.5s; '
                                        f'retransmits = 1; }}\nurl_tld = "{d}/tld.dat";\ntempdir = "{d}/tmp";\n'),
            "etc/local.d/logging.inc": 'type = "console";\nlevel = "notice";\n',
            "etc/override.d/worker-normal.inc": f'bind_socket = "{HOST}:{self.http_port}";\ncount = 1;\n',
            "etc/override.d/worker-controller.inc": "enabled = false;\n",
            "etc/override.d/worker-proxy.inc": (f'bind_socket = "{HOST}:{self.port}";\nmilter = yes;\n'
                                                'timeout = 120s;\nupstream "local" { default = yes; '
                                                'self_scan = yes; }\ncount = 1;\n'),
            "etc/rspamd.local.lua": ("rspamd_config.QPG_TEST_ADDHEADER = {\n  callback = function(task) return "
                                     "(task:get_subject() or ''):find('QPG-SPAM', 1, true) ~= nil end,\n"
                                     "  score = 8.0, description = 'test: Subject contains QPG-SPAM',\n}\n"),
        }
        files.update({f"etc/local.d/{m}.conf": "enabled = false;\n" for m in self.MODULES_OFF})
        for path, text in files.items():
            with open(f"{d}/{path}", "w") as handle:
                handle.write(text)
        argv = ["rspamd", "-f", "-i", "-c", "/etc/rspamd/rspamd.conf", f"--var=LOCAL_CONFDIR={d}/etc",
                f"--var=DBDIR={d}/db", f"--var=RUNDIR={d}/run", f"--var=LOGDIR={d}/log"]
        self._start(argv, self._ready, timeout)

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/ping", timeout=1) as answer:
            return answer.read().startswith(b"pong") and negotiates(self.port)


class _Nsd(_Daemon):
    """NSD on ``address``:53 serving example.test (SPF passes 192.0.2.0/24, DMARC p=reject):
    OpenDMARC can only ask port 53."""

    name = "nsd"
    ZONES = {"example.test": "v=spf1 ip4:192.0.2.0/24 -all"}

    def __init__(self, workdir: str, address: str, timeout: float = 20.0) -> None:
        super().__init__()
        self.workdir, self.address = workdir, address
        conf = (f'server:\n  ip-address: {address}@53\n  do-ip6: no\n  username: ""\n  chroot: ""\n'
                f'  zonesdir: "{workdir}"\n  database: ""\n  pidfile: "{workdir}/nsd.pid"\n'
                f'  xfrdfile: "{workdir}/xfrd.state"\n  zonelistfile: "{workdir}/zone.list"\n'
                f'  logfile: "{workdir}/nsd.log"\n  server-count: 1\nremote-control:\n  control-enable: no\n')
        for zone, spf in self.ZONES.items():
            with open(f"{workdir}/{zone}.zone", "w") as handle:
                handle.write(f"$ORIGIN {zone}.\n$TTL 300\n@ IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 300\n"
                             f"@ IN NS ns.{zone}.\nns IN A {address}\n@ IN TXT \"{spf}\"\n"
                             f"_dmarc IN TXT \"v=DMARC1; p=reject; adkim=r; aspf=r\"\n")
            conf += f"zone:\n  name: {zone}\n  zonefile: {zone}.zone\n"
        with open(f"{workdir}/nsd.conf", "w") as handle:
            handle.write(conf)
        self._start(["nsd", "-d", "-c", f"{workdir}/nsd.conf"], self._answers, timeout)

    def _answers(self) -> bool:
        query = struct.pack("!HHHHHH", 7, 0, 1, 0, 0, 0) + b"\x07example\x04test\x00\x00\x10\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            sock.sendto(query, (self.address, 53))
            return sock.recv(512)[:2] == b"\x00\x07"

    def close(self) -> None:
        self.stop()  # the directory is OpenDmarc's


class OpenDmarc(_Milter):
    """opendmarc (RejectFailures) in its own mount namespace whose resolv.conf names a test NSD."""

    name = "opendmarc"

    def __init__(self, timeout: float = 30.0) -> None:
        super().__init__()
        d = self.workdir
        # An unusual loopback address of our own: port 53 there is free of anything else.
        self.nsd = _Nsd(d, f"127.0.{os.getpid() % 200 + 20}.53")
        with open(f"{d}/resolv.conf", "w") as handle:
            handle.write(f"nameserver {self.nsd.address}\n")
        with open(f"{d}/ignore", "w") as handle:  # the default is 127.0.0.1, our client; an empty
            handle.write("198.51.100.1\n")  # file does not replace it, another address does
        with open(f"{d}/opendmarc.conf", "w") as handle:
            handle.write(f"Socket inet:{self.port}@{HOST}\nPidFile {d}/opendmarc.pid\nBackground false\n"
                         f"Syslog false\nAuthservID mx.example.test\nTrustedAuthservIDs mx.example.test\n"
                         f"SPFSelfValidate true\nRejectFailures true\nRequiredHeaders false\n"
                         f"FailureReports false\nIgnoreHosts {d}/ignore\nDNSTimeout 2\n"
                         f"PublicSuffixList /usr/share/publicsuffix/public_suffix_list.dat\n")
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                'mount --bind "$1/resolv.conf" /etc/resolv.conf && exec opendmarc -c "$1/opendmarc.conf"', "sh", d]
        try:
            self._start(argv, lambda: negotiates(self.port), timeout)
        except BaseException:
            self.nsd.stop()
            raise

    def stop(self) -> None:
        super().stop()
        self.nsd.stop()
