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

from qpgevent.testing_scanners import LoopbackClamd, _Daemon, free_tcp_port

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
    """opendkim signing example.test (selector qpg) for 127.0.0.1, verifying the rest."""

    name = "opendkim"

    def __init__(self, timeout: float = 30.0) -> None:
        super().__init__()
        d = self.workdir
        subprocess.run(["opendkim-genkey", "-D", d, "-d", "example.test", "-s", "qpg"], check=True)
        with open(f"{d}/qpg.txt") as handle:
            self.txt = "".join(re.findall(r'"([^"]*)"', handle.read()))
        with open(f"{d}/dns.data", "w") as handle:
            handle.write(f"qpg._domainkey.example.test {self.txt}\n")
        with open(f"{d}/opendkim.conf", "w") as handle:
            handle.write(f"Background no\nSyslog no\nMode sv\nDomain example.test\nSelector qpg\n"
                         f"KeyFile {d}/qpg.private\nRequireSafeKeys no\nSocket inet:{self.port}@{HOST}\n"
                         f"PidFile {d}/opendkim.pid\nTemporaryDirectory {d}\n"
                         f"Canonicalization relaxed/simple\nInternalHosts 127.0.0.1\n"
                         f"TestDNSData file:{d}/dns.data\n")
        self._start(["opendkim", "-x", f"{d}/opendkim.conf"], lambda: negotiates(self.port), timeout)

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes:
        """dkimpy's DNS lookup, answered from the test key."""
        return self.txt.encode() if name == b"qpg._domainkey.example.test." else b""


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
