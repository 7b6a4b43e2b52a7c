"""The real Debian daemons the service plugins talk to, started on loopback for the tests.

``LoopbackRspamd``: rspamd with a private config (recipe ``shared/recipes/rspamd.md``): no
network, no Redis, DNS pointed at a dead port, a tiny public-suffix list (0.6 s start), one
test rule (Subject ``QPG-SPAM`` scores 8: action ``add header``), the milter_headers module
adding ``X-Spam-Status`` (and removing the message's own), and a settings id
``qpg_relaxed`` that raises every action threshold (a message that would get a header gets
none). ``SpfPolicy``: Debian's policyd-spf, one per connection behind socat (as Postfix's
spawn(8) runs it), its resolver pointed at a test NSD (recipe ``postfix-policy.md``).
``Postfwd``: Debian's rule-based policy server, rules giving every action a test needs.
``Postgrey``: Debian's greylisting policy server on a loopback port.
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.request
from typing import Callable

from qpgevent.testing.scanners import _Daemon, free_tcp_port

HOST = "127.0.0.1"

class PortTaken(Exception):
    """Another process took the free port we picked before the daemon bound it."""


class _PortDaemon(_Daemon):
    """A daemon on a free loopback port, started again on another port (up to 3 times) when
    something else took the port first: on a busy machine the gap between picking a free port
    and the daemon binding it (5 s of rspamd start-up under load) is long enough."""

    def _start_on_a_free_port(self, argv_for_port: Callable[[int], list[str]], ready: Callable[[], bool],
                              timeout: float) -> None:
        for attempt in range(3):
            self.port = free_tcp_port()
            argv = argv_for_port(self.port)
            try:
                self._start(argv, lambda: self._port_free_for_us() and ready(), timeout)
                return
            except (PortTaken, RuntimeError) as error:  # RuntimeError: it exited, its log says why
                if isinstance(error, RuntimeError) and "Address already in use" not in str(error):
                    raise
                self.stop()
                if attempt == 2:
                    raise RuntimeError(f"{self.name}: three ports taken under us:\n{self.log()}") from None

    def _port_free_for_us(self) -> bool:
        if "Address already in use" in self.log():
            raise PortTaken(self.port)
        return True


RSPAMD_DISABLED = ("rbl surbl whitelist phishing multimap mime_types mid fuzzy_check asn spf dkim dmarc arc "
                   "hfilter emails rspamd_update url_redirector reputation neural ratelimit greylist replies "
                   "history_redis").split()

RSPAMD_TEST_RULE = """rspamd_config.QPG_TEST_ADDHEADER = {
  callback = function(task) return (task:get_subject() or ''):find('QPG-SPAM', 1, true) ~= nil end,
  score = 8.0, description = 'test: Subject contains QPG-SPAM',
}
rspamd_config.QPG_TEST_REWRITE = {
  callback = function(task) return (task:get_subject() or ''):find('QPG-REWRITE', 1, true) ~= nil end,
  score = 11.0, description = 'test: Subject contains QPG-REWRITE',
}
rspamd_config.QPG_TEST_GREY = {
  callback = function(task) return (task:get_subject() or ''):find('QPG-GREY', 1, true) ~= nil end,
  score = 0.1, description = 'test: Subject contains QPG-GREY',
}
rspamd_config.QPG_SAW_TLS = {
  callback = function(task) return task:get_request_header('TLS-Version') ~= nil end,
  score = 0.01, description = 'test: the MTA said the session was encrypted',
}
rspamd_config.QPG_SAW_USER = {
  callback = function(task) return task:get_user() ~= nil end,
  score = 0.01, description = 'test: the MTA sent the authenticated user',
}
rspamd_config.QPG_TEST_SOFT = {
  callback = function(task) return (task:get_subject() or ''):find('QPG-SOFT', 1, true) ~= nil end,
  score = 100.0, description = 'test: Subject contains QPG-SOFT',
}
"""

# actions: add header at 6, rewrite subject at 10, reject at 15 (as shipped), plus a soft
# reject for QPG-SOFT and a greylist for QPG-GREY through force_actions (the greylist module,
# which needs Redis, is off).
RSPAMD_LOCAL = {
    "local.d/actions.conf": 'rewrite_subject = 10;\nsubject = "***SPAM*** %s";\n',
    "local.d/milter_headers.conf": 'use = ["x-spam-status"];\nskip_local = false;\nskip_authenticated = false;\n',
    "local.d/force_actions.conf": """rules {
  QPG_SOFT { action = "soft reject"; expression = "QPG_TEST_SOFT"; message = "come back later (test)"; }
  QPG_GREY { action = "greylist"; expression = "QPG_TEST_GREY"; }
}
""",
    "local.d/settings.conf": """qpg_relaxed {
  id = "qpg_relaxed";
  apply { actions { reject = 500; "add header" = 400; "rewrite subject" = 450; greylist = 300; } }
}
""",
    "local.d/logging.inc": 'type = "console";\nlevel = "notice";\n',
    "override.d/worker-controller.inc": "enabled = false;\n",
}


class LoopbackRspamd(_PortDaemon):
    name = "rspamd"

    def __init__(self, timeout: float = 60.0) -> None:
        super().__init__()
        self.workdir = tempfile.mkdtemp(prefix="qpg-rspamd-")
        etc = os.path.join(self.workdir, "etc")
        for sub in ("etc/local.d", "etc/override.d", "db", "run", "log", "tmp"):
            os.makedirs(os.path.join(self.workdir, sub))
        tld = os.path.join(self.workdir, "tld.dat")
        _write(tld, "test\nexample\ncom\norg\nnet\n")
        files = dict(RSPAMD_LOCAL)
        files["local.d/options.inc"] = (
            'dns { nameserver = ["127.0.0.1:%d"]; timeout = 0.5s; retransmits = 1; }\n'
            'url_tld = "%s";\ntempdir = "%s/tmp";\n' % (free_tcp_port(), tld, self.workdir))
        for module in RSPAMD_DISABLED:
            files[f"local.d/{module}.conf"] = "enabled = false;\n"
        files["rspamd.local.lua"] = RSPAMD_TEST_RULE
        for name, text in files.items():
            _write(os.path.join(etc, name), text)

        def argv(port: int) -> list[str]:
            _write(os.path.join(etc, "override.d/worker-normal.inc"), f'bind_socket = "{HOST}:{port}";\ncount = 1;\n')
            _write(os.path.join(etc, "override.d/worker-proxy.inc"),
                   f'bind_socket = "{HOST}:{free_tcp_port()}";\ncount = 1;\n')
            return ["rspamd", "-f", "-i", "-c", "/etc/rspamd/rspamd.conf", f"--var=LOCAL_CONFDIR={etc}",
                    f"--var=DBDIR={self.workdir}/db", f"--var=RUNDIR={self.workdir}/run",
                    f"--var=LOGDIR={self.workdir}/log"]

        self._start_on_a_free_port(argv, self._pong, timeout)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _pong(self) -> bool:
        with urllib.request.urlopen(f"http://{self.address}/ping", timeout=1) as answer:
            return answer.read().strip() == b"pong"


SPF_CONF = """debugLevel = 1
TestOnly = 1
HELO_reject = Fail
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = False
skip_addresses = 127.0.0.0/8,::ffff:127.0.0.0/104,::1
Lookup_Time = 5
"""

# policyd-spf's resolver (pydns) reads /etc/resolv.conf when spf is imported: point it at
# the test NSD, then run the packaged main(). Runs under /usr/bin/python3 (Debian's modules).
SPF_WRAPPER = """import sys
import spf, DNS
DNS.defaults['server'] = [sys.argv[1]]
DNS.defaults['port'] = int(sys.argv[2])
sys.argv = ['policyd-spf'] + sys.argv[3:]
from spf_engine.policyd_spf import main
sys.exit(main())
"""

#: SPF zones: example.test allows 192.0.2.0/24; client.example.test only its own A (203.0.113.5).
SPF_ZONES = {
    "example.test": {"@": [("TXT", '"v=spf1 ip4:192.0.2.0/24 -all"')],
                     "client": [("A", "203.0.113.5"), ("TXT", '"v=spf1 a -all"')],
                     "mail": [("A", "192.0.2.25")]},
}


class SpawnedPolicy(_PortDaemon):
    """A policy program run once per connection, its stdin and stdout the socket, behind
    ``socat TCP-LISTEN:...,fork EXEC:...`` (what Postfix's spawn(8) does)."""

    def _spawn(self, command: str, timeout: float) -> None:
        self._start_on_a_free_port(
            lambda port: ["socat", f"TCP-LISTEN:{port},bind={HOST},reuseaddr,fork,backlog=512", f"EXEC:{command}"],
            self._answers, timeout)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _answers(self) -> bool:
        return ask_policy(self.port, {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                                      "client_address": "127.0.0.1", "helo_name": "localhost",
                                      "sender": "probe@example.test", "recipient": "probe@example.test",
                                      "instance": "ready.0"}).startswith("action=")


class SpfPolicy(SpawnedPolicy):
    """Debian's policyd-spf, its resolver pointed at the test NSD on ``dns_port``."""

    name = "policyd-spf"

    def __init__(self, dns_port: int, timeout: float = 30.0) -> None:
        super().__init__()
        self.workdir = tempfile.mkdtemp(prefix="qpg-spf-")
        conf, wrapper = os.path.join(self.workdir, "policyd-spf.conf"), os.path.join(self.workdir, "policyd-spf-testdns.py")
        _write(conf, SPF_CONF)
        _write(wrapper, SPF_WRAPPER)
        self._spawn(f"/usr/bin/python3 {wrapper} 127.0.0.1 {dns_port} {conf}", timeout)


#: postfwd rules: the recipient's local part names the action the test wants back.
POSTFWD_RULES = """id=R1; recipient==reject@example.test; action=REJECT refused by postfwd
id=R2; recipient==code@example.test; action=521 5.7.0 not here
id=R3; recipient==defer@example.test; action=DEFER busy now
id=R4; recipient==prepend@example.test; action=PREPEND X-Postfwd: seen $$client_address
id=R5; recipient==redirect@example.test; action=REDIRECT other@example.test
id=R6; recipient==bcc@example.test; action=BCC archive@example.test
id=R7; recipient==discard@example.test; action=DISCARD dropped by postfwd
id=R8; recipient==hold@example.test; action=HOLD held by postfwd
id=R9; recipient==filter@example.test; action=FILTER smtp:[127.0.0.1]:10025
id=R10; recipient==warn@example.test; action=WARN looked at by postfwd
id=R11; recipient==ok@example.test; action=OK
id=R12; recipient==garbage@example.test; action=FROBNICATE now
id=R13; client_address==192.0.2.66; protocol_state==CONNECT; action=REJECT no connections from you
id=R14; helo_name==bad.example.test; action=REJECT bad HELO
id=R15; sender==spammer@example.test; action=REJECT bad sender
id=R16; protocol_state==END-OF-MESSAGE; size>=100000; action=REJECT too big for postfwd
id=R17; recipient==ok@elsewhere.test; action=OK
id=R18; client_address==192.0.2.77; protocol_state==CONNECT; action=PREPEND X-Connect-Policy: seen at connect
id=R19; recipient==attrs@example.test; action=PREPEND X-Policy-Attributes: request=$$request state=$$protocol_state name=$$protocol_name helo=$$helo_name sender=$$sender recipient=$$recipient count=$$recipient_count client=$$client_address cname=$$client_name rname=$$reverse_client_name size=$$size context=$$policy_context
id=R20; protocol_state==END-OF-MESSAGE; sender==attrs@example.test; action=PREPEND X-Policy-End: state=$$protocol_state recipient=$$recipient count=$$recipient_count size=$$size queue=$$queue_id instance=$$instance
id=R21; recipient==tls@example.test; action=PREPEND X-Policy-TLS: protocol=$$encryption_protocol cipher=$$encryption_cipher
id=RD; action=DUNNO
"""


class Postfwd(SpawnedPolicy):
    """Debian's postfwd (postfwd1, the rule-based policy server) with ``POSTFWD_RULES``."""

    name = "postfwd"

    def __init__(self, timeout: float = 30.0) -> None:
        super().__init__()
        self.workdir = tempfile.mkdtemp(prefix="qpg-postfwd-")
        rules = os.path.join(self.workdir, "postfwd.cf")
        _write(rules, POSTFWD_RULES)
        self._spawn(f"/usr/sbin/postfwd1 -f {rules} --nodns --cache=0", timeout)


class Postgrey(_PortDaemon):
    """postgrey on a loopback port with its own database, greylisting for ``delay`` seconds
    every client but those of ``whitelist_clients``."""

    name = "postgrey"

    def __init__(self, delay: int = 3600, whitelist_clients: tuple[str, ...] | list[str] = (),
                 timeout: float = 30.0) -> None:
        super().__init__()
        self.workdir = tempfile.mkdtemp(prefix="qpg-postgrey-")
        empty, clients = os.path.join(self.workdir, "empty"), os.path.join(self.workdir, "clients")
        _write(empty, "")
        _write(clients, "".join(f"{client}\n" for client in whitelist_clients))
        self._start_on_a_free_port(
            lambda port: ["postgrey", f"--inet={HOST}:{port}", f"--dbdir={self.workdir}", "--user=root",
                          "--group=root", f"--delay={delay}", f"--whitelist-clients={clients}",
                          f"--whitelist-recipients={empty}", f"--pidfile={self.workdir}/pid", "--hostname=grey.test"],
            self._answers, timeout)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _answers(self) -> bool:
        return ask_policy(self.port, {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                                      "client_address": "198.51.100.1", "client_name": "probe.test",
                                      "sender": "probe@probe.test", "recipient": "probe@probe.test",
                                      "instance": "ready.0"}).startswith("action=")


def ask_policy(port: int, attributes: dict[str, str], timeout: float = 5) -> str:
    """One policy request on a new connection; the reply's first line (readiness probes)."""
    request = "".join(f"{name}={value}\n" for name, value in attributes.items()) + "\n"
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request.encode())
        answer = b""
        while b"\n\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    return answer.decode().split("\n", 1)[0]


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


