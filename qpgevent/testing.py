"""Test helpers on the real objects: write an ini, run a real server, talk to it.

Used by this project's tests and meant for plugin authors too. Nothing here is a fake:
``InProcessServer`` is the real ``SmtpServer`` with the real loader and hook runner on a
loopback port; ``ServerProcess`` is the real ``qpgevent`` command in a child process.
Runtime code never imports this module.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import gevent
import gevent.event

from . import config as config_module
from .loader import load_plugins
from .server import SmtpServer
from .services import configure_services, configure_store

_SECTIONS = {
    "server": ("me", "listen", "banner", "spool_dir", "plugin_dirs", "size_threshold", "shutdown_timeout",
               "workers", "user", "group", "allow_root", "pidfile"),
    "limits": ("max_connections", "max_message_size", "max_recipients", "max_command_line",
               "max_text_line", "command_timeout", "data_timeout", "plugin_timeout", "max_bad_commands"),
    "smtp": ("allow_bare_lf",),
    "proxy": ("trusted", "timeout"),
    "dns": ("nameservers", "port", "timeout", "session_budget", "cache_size", "reverse_lookup"),
    "ident": ("enabled", "timeout", "port"),
    "logging": ("level", "file", "format", "syslog", "syslog_facility", "syslog_address"),
    "admin": ("listen", "token", "run_dir", "refresh"),  # [admin] listen: write admin_listen=
    "store": ("backend", "path", "url", "prefix", "timeout", "fail", "retry", "lease_ttl", "pool_size"),
}

DEFAULT_PLUGINS = """
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
"""


def write_ini(directory: str | os.PathLike[str], plugins: str = DEFAULT_PLUGINS, **settings: Any) -> Path:
    """Write ``qpsmtpd.ini`` into ``directory``: settings by key name, plugins as ini text.

    A key may be qualified by its section, ``proxy_timeout=3`` for ``[proxy] timeout``;
    that is how to name a key whose bare name is vague or used by two sections.

    ``[dns] reverse_lookup`` is off unless given: a test server must never ask the
    system's resolver (it is not on loopback). Tests of DNS name their own nameserver
    (``dns_nameservers="127.0.0.1", dns_port=nsd.port``) and turn it on.
    """
    settings.setdefault("me", "mx.example.test")
    settings.setdefault("listen", "127.0.0.1:0")
    # Test folders are private to the user running the tests, often root in a container:
    # the server must be able to serve as that user (pass allow_root="no" to test the refusal).
    settings.setdefault("allow_root", "yes")
    if "reverse_lookup" not in settings and "dns_reverse_lookup" not in settings:
        settings["reverse_lookup"] = "no"
    lines = []
    for section, keys in _SECTIONS.items():
        lines.append(f"[{section}]")
        for key in keys:
            name = f"{section}_{key}" if f"{section}_{key}" in settings else key
            if name in settings:
                value = settings.pop(name)
                if isinstance(value, (list, tuple)):
                    value = ", ".join(str(v) for v in value)
                lines.append(f"  {key} = {value}")
    if settings:
        raise TypeError(f"unknown settings: {', '.join(settings)}")
    lines.append("[plugins]")
    lines.append(textwrap.indent(textwrap.dedent(plugins).strip(), "  "))
    path = Path(directory) / "qpsmtpd.ini"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class InProcessServer:
    """The real server in this process (greenlets), on a loopback port the OS picked.

    When the ini names ``[dns] nameservers``, the process's default resolver is set from
    ``[dns]`` (``configure_services``, as the CLI does at start); otherwise it is left as
    the test set it (``dns.configure`` / ``dns.set_default``), and the system's resolver is
    never configured here. The resolver is per process: the last server started wins.
    """

    def __init__(self, ini: str | os.PathLike[str]) -> None:
        self.settings = config_module.load(str(ini))
        if self.settings.dns_nameservers:
            configure_services(self.settings)
        configure_store(self.settings)  # the ini's [store] (or its defaults): the last server started wins
        os.makedirs(self.settings.spool_dir, exist_ok=True)
        self.server = SmtpServer(self.settings, load_plugins(self.settings))
        self.server.runner.notify("post_fork", None)  # as in a worker of the master
        self.server.start()
        self.host, self.port = self.server.addresses[0]

    def smtp(self, **kwargs: Any) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, local_hostname="client.example.test", **kwargs)

    def stop(self, timeout: float = 1.0) -> None:
        self.server.stop(timeout)


class ServerProcess:
    """``python -m qpgevent -c INI`` in a child process; its port read from its log."""

    LISTENING = re.compile(r"listening on (\S+):(\d+)")
    ADMIN = re.compile(r"admin pages on (http://[^/\s]+)/status")

    def __init__(self, ini: str | os.PathLike[str], *extra_args: str, ready_timeout: float = 20.0) -> None:
        self.ini = str(ini)
        self.log_path = Path(self.ini).with_name("server.log")
        self._log = open(self.log_path, "w+b")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qpgevent", "-c", self.ini, *extra_args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.PIPE, env=env)
        self.ports: list[int] = []
        self.admin_url: str | None = None  #: "http://127.0.0.1:PORT" when [admin] listen is set
        self._ready = gevent.event.Event()
        self._reader = gevent.spawn(self._read_log)
        if not self._ready.wait(ready_timeout):
            self.kill()
            raise RuntimeError(f"server not ready in {ready_timeout}s:\n{self.log()}")
        self.port = self.ports[0]

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._log.write(line)
            self._log.flush()
            match = self.LISTENING.search(line.decode("utf-8", "replace"))
            if match:
                self.ports.append(int(match.group(2)))
            admin = self.ADMIN.search(line.decode("utf-8", "replace"))
            if admin:
                self.admin_url = admin.group(1)
            if b"ready (pid" in line:
                self._ready.set()
        self._ready.set()  # the process ended: let the waiter look at the log

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def smtp(self, **kwargs: Any) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example.test", **kwargs)

    def worker_pids(self) -> list[int]:
        """The master's child processes now: its workers (Linux, from /proc)."""
        return child_pids(self.process.pid)

    def terminate(self, timeout: float = 30.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        self.process.kill()
        return self.wait(10)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code


def child_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` (from /proc/PID/task/*/children, Linux)."""
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                children += [int(word) for word in handle.read().split()]
        except OSError:
            continue
    return sorted(children)


def maildir_messages(maildir: str | os.PathLike[str]) -> dict[str, bytes]:
    """File name -> content, for every message delivered into ``maildir/new``."""
    new = Path(maildir) / "new"
    return {p.name: p.read_bytes() for p in sorted(new.iterdir())} if new.is_dir() else {}


def strip_trace(message: bytes) -> bytes:
    """The message as the client sent it: drop our Return-Path and Received header."""
    lines = message.split(b"\r\n")
    assert lines[0].startswith(b"Return-Path:"), lines[0]
    assert lines[1].startswith(b"Received:"), lines[1]
    i = 2
    while lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])
