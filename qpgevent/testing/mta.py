"""Real next hops for tests and benchmarks: a private Postfix, a private Dovecot LMTP, TLS files.

Owns ``Postfix`` (Debian's postfix, started as ``postfix -c DIR start-fg`` from a config
folder of its own, listening on a loopback port, delivering into Maildirs through its
``virtual`` agent), ``Dovecot`` (Debian's dovecot-lmtpd, run entirely as ``nobody`` with
a config of its own: LMTP on a loopback port and a unix socket, plus its auth service on a
loopback port for Postfix's SASL) and ``make_certificates`` (a CA and a server certificate
for ``localhost`` / 127.0.0.1, made with the openssl command). Nothing here is a fake,
and nothing touches the system's own Postfix or Dovecot configuration.

Postfix needs root (its master drops privileges itself); the folders are made under
/tmp with mode 0755 because Postfix's and Dovecot's unprivileged processes must reach
them. Runtime code never imports this module.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
UNPRIVILEGED = "nobody"
READY_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def private_folder(prefix: str) -> Path:
    """A fresh folder under /tmp that unprivileged daemons can traverse."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o755)
    return folder


def wait_until(condition, timeout: float, what: str, interval: float = 0.02):
    """Poll ``condition`` (another process's work we cannot be told about) until truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout}s")
        time.sleep(interval)


def greeting(host: str, port: int) -> bytes | None:
    try:
        with socket.create_connection((host, port), timeout=5) as connection:
            line = connection.makefile("rb").readline(512)
            connection.sendall(b"QUIT\r\n")
            return line
    except OSError:
        return None


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a CA, and a certificate it signed for localhost."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / "server.ext"
    ext.write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\nextendedKeyUsage = serverAuth\n")
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=qpgevent test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    for path in (ca, cert, key):
        path.chmod(0o644)
    return ca, cert, key


class Postfix:
    """A private Postfix: ``virtual`` delivery to ``<root>/mail/<domain>/<user>/`` Maildirs.

    ``mailboxes`` are the addresses it knows (others: 550 5.1.1 User unknown); ``access``
    maps an address to a refusal of its own (``"450 4.2.1 busy"``), checked at RCPT.
    ``submission_port`` adds a second listener that takes mail only after AUTH (over
    STARTTLS), checked by the Dovecot auth service at ``sasl``.
    """

    def __init__(self, mailboxes: list[str], port: int | None = None, access: dict[str, str] | None = None,
                 tls: tuple[Path, Path] | None = None, submission_port: int | None = None,
                 sasl: tuple[str, int] | None = None, main: dict[str, str] | None = None) -> None:
        self.root = private_folder("qpg-postfix-")
        self.port = port or free_port()
        self.submission_port = submission_port
        self.conf, self.mail = self.root / "conf", self.root / "mail"
        self.maillog = self.root / "maillog"
        for folder in (self.conf, self.root / "queue", self.root / "data", self.mail):
            folder.mkdir()
        postfix_user = pwd.getpwnam("postfix")
        nobody = pwd.getpwnam(UNPRIVILEGED)
        os.chown(self.root / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        # The queue's folders, made as postfix-files says: without them, start-fg runs
        # post-install to make them, which takes seconds.
        postdrop = grp.getgrnam("postdrop").gr_gid
        for name, group, mode in _QUEUE_FOLDERS:
            folder = self.root / "queue" / name
            folder.mkdir()
            os.chown(folder, 0 if name == "pid" else postfix_user.pw_uid,
                     {"postdrop": postdrop, "root": 0}.get(group, postfix_user.pw_gid))
            folder.chmod(mode)
        os.chown(self.mail, nobody.pw_uid, nobody.pw_gid)
        domains = sorted({m.rsplit("@", 1)[1] for m in mailboxes})
        (self.conf / "vmailbox").write_text("".join(f"{m} {m.rsplit('@', 1)[1]}/{m.rsplit('@', 1)[0]}/\n"
                                                    for m in mailboxes))
        (self.conf / "access").write_text("".join(f"{a} {r}\n" for a, r in (access or {}).items()))
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": f"{self.root}/queue", "data_directory": f"{self.root}/data",
            "mail_owner": "postfix", "setgid_group": "postdrop",
            "myhostname": "downstream.test", "mydomain": "downstream.test", "myorigin": "downstream.test",
            "mydestination": "", "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8", "alias_maps": "", "alias_database": "",
            "maillog_file": str(self.maillog), "maillog_file_prefixes": str(self.root),
            "virtual_mailbox_domains": ", ".join(domains), "virtual_mailbox_base": str(self.mail),
            "virtual_mailbox_maps": f"texthash:{self.conf}/vmailbox",
            "virtual_uid_maps": f"static:{nobody.pw_uid}", "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "smtpd_recipient_restrictions": f"check_recipient_access texthash:{self.conf}/access",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8", "smtpd_authorized_xforward_hosts": "127.0.0.0/8",
            # Connections come and go fast in the tests: no rate limits, no DNS waits.
            "smtpd_client_connection_rate_limit": "0", "smtpd_peername_lookup": "no",
            "smtpd_client_restrictions": "", "disable_dns_lookups": "yes",
            "default_process_limit": "200", "smtpd_timeout": "300s", "smtpd_error_sleep_time": "0",
        }
        if tls:
            settings.update({"smtpd_tls_cert_file": str(tls[0]), "smtpd_tls_key_file": str(tls[1]),
                             "smtpd_tls_security_level": "may", "smtpd_tls_received_header": "yes"})
        if sasl:
            settings.update({"smtpd_sasl_type": "dovecot", "smtpd_sasl_path": f"inet:{sasl[0]}:{sasl[1]}"})
        settings.update(main or {})
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        services = [f"127.0.0.1:{self.port} inet n - n - - smtpd"]
        if submission_port:
            services.append(f"127.0.0.1:{submission_port} inet n - n - - smtpd\n"
                            "  -o smtpd_tls_security_level=encrypt\n  -o smtpd_sasl_auth_enable=yes\n"
                            "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject")
        (self.conf / "master.cf").write_text("\n".join(services) + "\n" + _MASTER_SERVICES)
        # Postfix waits (300 ms at a time) while a table or main.cf looks freshly written,
        # in case an editor is still at it: date our files a minute back.
        minute_ago = time.time() - 60
        for path in self.conf.iterdir():
            os.utime(path, (minute_ago, minute_ago))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Postfix:
        self._output = open(self.root / "start-fg.out", "ab")
        self.process = subprocess.Popen(self.command("start-fg"), stdin=subprocess.DEVNULL,
                                        stdout=self._output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postfix did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """``postfix stop``: the master ends its services; queued mail stays in the queue."""
        if self.process is None:
            return
        if self.process.poll() is None:
            subprocess.run(self.command("stop"), capture_output=True, timeout=60)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._output.close()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def command(self, *args: str) -> list[str]:
        """The argv of ``postfix -c <our config> ARGS`` (a subclass may run it elsewhere)."""
        return [POSTFIX, "-c", str(self.conf), *args]

    def answers(self) -> bool:
        """Whether it greets on its port with a 220."""
        line = greeting("127.0.0.1", self.port)
        return bool(line and line.startswith(b"220 "))

    def sendmail(self) -> list[str]:
        """The argv start of this instance's sendmail (``-C`` names its config)."""
        return [shutil.which("sendmail") or "/usr/sbin/sendmail", "-C", str(self.conf)]

    def messages(self, address: str) -> list[bytes]:
        """Delivered messages, oldest first."""
        return _delivered(self.mail, address)

    def wait_for_messages(self, address: str, count: int, timeout: float = 30.0) -> list[bytes]:
        """Postfix delivers after its 250, in the background: wait for ``count`` messages."""
        return wait_until(lambda: len(found := self.messages(address)) >= count and found, timeout,
                          f"{count} message(s) for {address} in {self.mail}")

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else "(no maillog yet)"


def _delivered(mail: Path, address: str) -> list[bytes]:
    """The messages in ``mail/<domain>/<user>/new``, in the order they were delivered.

    By modification time, not by name: a Maildir name starts with the second, and within
    a second Postfix and Dovecot order by inode or counter, not by time.
    """
    user, domain = address.rsplit("@", 1)
    new = mail / domain / user / "new"
    if not new.is_dir():
        return []
    files = sorted(new.iterdir(), key=lambda path: (path.stat().st_mtime_ns, path.name))
    return [path.read_bytes() for path in files]


_QUEUE_FOLDERS = [
    ("active", "", 0o700), ("bounce", "", 0o700), ("corrupt", "", 0o700), ("defer", "", 0o700),
    ("deferred", "", 0o700), ("flush", "", 0o700), ("hold", "", 0o700), ("incoming", "", 0o700),
    ("private", "", 0o700), ("saved", "", 0o700), ("trace", "", 0o700),
    ("maildrop", "postdrop", 0o730), ("public", "postdrop", 0o710), ("pid", "root", 0o755),
]

_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
lmtp      unix  -       -       n       -       -       lmtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Dovecot:
    """A private Dovecot, every process as ``nobody``: LMTP (TCP and a unix socket) and auth.

    ``users`` maps an address to its password; ``quota`` an address to a quota rule
    (``storage=1K``: a tiny one makes a real "mailbox full" after DATA). Mail goes to
    ``<root>/mail/<domain>/<user>/`` Maildirs.
    """

    def __init__(self, users: dict[str, str], quota: dict[str, str] | None = None,
                 rcpt_check_quota: bool = False) -> None:
        self.root = private_folder("qpg-dovecot-")
        self.lmtp_port, self.auth_port = free_port(), free_port()
        self.mail, self.run_dir = self.root / "mail", self.root / "run"
        self.lmtp_socket = self.run_dir / "lmtp"
        for folder in (self.mail, self.run_dir, self.root / "state"):
            folder.mkdir()
        lines = []
        for address, password in users.items():
            extra = f"userdb_quota_rule=*:{quota[address]}" if quota and address in quota else ""
            lines.append(f"{address}:{{PLAIN}}{password}::::::{extra}\n")
        (self.root / "users").write_text("".join(lines))
        (self.root / "dovecot.conf").write_text(_DOVECOT_CONF.format(
            root=self.root, lmtp_port=self.lmtp_port, auth_port=self.auth_port, user=UNPRIVILEGED,
            check_quota="yes" if rcpt_check_quota else "no"))
        nobody = pwd.getpwnam(UNPRIVILEGED)
        for path in [self.root, *self.root.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Dovecot:
        nobody = pwd.getpwnam(UNPRIVILEGED)
        self._output = open(self.root / "foreground.out", "ab")
        self.process = subprocess.Popen([DOVECOT, "-F", "-c", str(self.root / "dovecot.conf")],
                                        stdin=subprocess.DEVNULL, stdout=self._output,
                                        stderr=subprocess.STDOUT, user=nobody.pw_uid,
                                        group=nobody.pw_gid, extra_groups=[])
        deadline = time.monotonic() + READY_TIMEOUT
        while (line := greeting("127.0.0.1", self.lmtp_port)) is None or not line.startswith(b"220 "):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot did not start:\n{self.log()}")
            time.sleep(0.05)
        wait_until(self.lmtp_socket.exists, READY_TIMEOUT, "dovecot's LMTP socket")
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._output.close()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def messages(self, address: str) -> list[bytes]:
        """Delivered messages, oldest first (LMTP has said 250 for each: no waiting needed)."""
        return _delivered(self.mail, address)

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else "(no log yet)"


_DOVECOT_CONF = """\
protocols = lmtp
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
ssl = no
default_internal_user = {user}
default_internal_group = nogroup
default_login_user = {user}
mail_location = maildir:{root}/mail/%d/%n
mail_plugins = quota
lmtp_rcpt_check_quota = {check_quota}
auth_mechanisms = plain login
auth_failure_delay = 0
disable_plaintext_auth = no
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
  default_fields = uid={user} gid=nogroup home={root}/mail/%d/%n
}}
plugin {{
  quota = maildir:User quota
  quota_rule = *:storage=100M
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service auth {{
  inet_listener {{
    address = 127.0.0.1
    port = {auth_port}
  }}
  user = $default_internal_user
}}
service auth-worker {{
  user = $default_internal_user
}}
service anvil {{
  chroot =
}}
"""

__all__ = ["Dovecot", "Postfix", "free_port", "greeting", "make_certificates", "private_folder", "wait_until"]
