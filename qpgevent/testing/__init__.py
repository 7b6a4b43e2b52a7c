"""Test helpers on the real objects: write an ini, run a real server, talk to it.

Used by this project's tests and meant for plugin authors too. Nothing here is a fake:
``InProcessServer`` is the real ``SmtpServer`` with the real loader and hook runner on a
loopback port; ``ServerProcess`` is the real ``qpgevent`` command in a child process;
``PluginHarness`` loads plugins through the real config reader and loader and runs one
hook, or a scripted session through the real conversation in memory (``qpgevent.server.dryrun``), with the
embedded state store and, if given, a ``LoopbackDns`` as the resolver. ``RawClient`` and
``wait_until`` are the socket client and the deadline poll the tests share.
The pytest fixtures over all this are in ``qpgevent.testing.pytest_plugin``.
Runtime code never imports this module.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gevent
import gevent.event

from .. import config as config_module
from ..core.address import Address
from ..core.codes import Verdict
from ..connection import Connection
from ..server.dryrun import ClientReply, Transcript, run_script
from ..engine.hooks import HOOKS, HookRunner
from ..engine.loader import load_plugins
from ..plugin import Plugin
from ..core.reply import Reply, answer
from ..server.server import SmtpServer
from ..backends.services import Services
from ..engine.conversation import Conversation
from ..engine.session import Session
from ..server.driver import surroundings

_SECTIONS = {
    "server": ("me", "listen", "banner", "spool_dir", "plugin_dirs", "size_threshold", "shutdown_timeout", "drain_delay", "hung_worker_timeout",
               "workers", "user", "group", "allow_root", "pidfile"),
    "limits": ("max_connections", "max_message_size", "max_recipients", "max_command_line",
               "max_text_line", "max_header_size", "command_timeout", "data_timeout", "park_after", "plugin_timeout",
               "session_timeout", "min_data_rate", "max_junk_commands", "stress_at", "stress_command_timeout",
               "max_bad_commands", "max_received"),
    "smtp": ("allow_bare_lf", "nul_bytes"),
    "tls": ("certificate", "key", "sni", "min_version", "handshake_timeout", "reload_check"),
    "auth": ("tls_before_auth", "max_failures_ip", "max_failures_user", "failure_window", "failure_delay",
             "max_delay", "senders"),
    "proxy": ("trusted", "timeout"),
    "dns": ("nameservers", "port", "timeout", "session_budget", "cache_size", "reverse_lookup"),
    "ident": ("enabled", "timeout", "port"),
    "logging": ("level", "file", "format", "syslog", "syslog_facility", "syslog_address", "trace",
                "trace_clients"),
    "admin": ("listen", "token", "run_dir", "refresh", "max_connections", "timeout"),  # [admin] listen: write admin_listen=
    "store": ("backend", "path", "url", "sentinels", "sentinel_master", "prefix", "timeout", "fail", "retry",
              "lease_ttl", "pool_size"),
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

    Its services are its own, as a server's are (``services``: the resolver of its ``[dns]``,
    the store of its ``[store]``): two servers in one process each ask their own
    nameservers. A test's DNS is named in the ini (``dns_nameservers="127.0.0.1",
    dns_port=nsd.port``); without nameservers the resolver is the system's, which a test
    server never asks (``write_ini`` turns ``reverse_lookup`` off).
    """

    def __init__(self, ini: str | os.PathLike[str]) -> None:
        self.settings = config_module.load(str(ini))
        self.services = Services.from_settings(self.settings)
        os.makedirs(self.settings.spool_dir, exist_ok=True)
        with self.services.active():  # the plugins' setup and post_fork use them too
            self.server = SmtpServer(self.settings, load_plugins(self.settings), services=self.services)
            self.server.runner.notify("post_fork", None)  # as in a worker of the master
        self.server.start()
        self.host, self.port = self.server.addresses[0]

    def smtp(self, **kwargs: Any) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, local_hostname="client.example.test", **kwargs)

    def stop(self, timeout: float = 1.0) -> None:
        self.server.stop(timeout)
        self.services.close()


class ServerProcess:
    """``python -m qpgevent -c INI`` in a child process; its port read from its log.

    ``python`` is the interpreter to run (another venv's, to test an installed plugin);
    ``prefix`` comes before it (``ip netns exec NS``: the server in a lab host).
    """

    LISTENING = re.compile(r"listening on (\S+):(\d+)")
    ADMIN = re.compile(r"admin pages on (http://[^/\s]+)/status")

    def __init__(self, ini: str | os.PathLike[str], *extra_args: str, ready_timeout: float = 20.0,
                 python: str = sys.executable, prefix: Sequence[str] = ()) -> None:
        self.ini = str(ini)
        self.log_path = Path(self.ini).with_name("server.log")
        self._log = open(self.log_path, "w+b")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [*prefix, python, "-m", "qpgevent", "-c", self.ini, *extra_args],
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


def peak_memory_kib(pid: int) -> int:
    """VmHWM, the peak resident set size of ``pid`` so far, in KiB, from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def strip_trace(message: bytes) -> bytes:
    """The message as the client sent it: drop our Return-Path and Received header."""
    lines = message.split(b"\r\n")
    assert lines[0].startswith(b"Return-Path:"), lines[0]
    assert lines[1].startswith(b"Received:"), lines[1]
    i = 2
    while lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str, step: float = 0.05) -> T:
    """Poll ``condition`` until it is truthy; its value, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        gevent.sleep(step)


class RawClient:
    """A bare SMTP client: it can talk out of turn, read replies smtplib would turn into
    exceptions (421 at connect), and check that the server hung up."""

    def __init__(self, server: Any, source: str | None = None) -> None:
        self.sock = socket.create_connection((getattr(server, "host", "127.0.0.1"), server.port), timeout=10,
                                             source_address=(source, 0) if source else None)
        self._buffer = b""

    def reply(self) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise EOFError(f"connection closed after {lines!r}")
                self._buffer += chunk
                continue
            line, self._buffer = self._buffer[:end].decode(), self._buffer[end + 2:]
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    def command(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def is_closed_by_server(self) -> bool:
        """True once the server has closed; a server that keeps it open times out.

        A server that closes while our unread input is in its buffer makes its kernel
        send an RST rather than a FIN: that is a close too.
        """
        if self._buffer:
            return False
        try:
            return self.sock.recv(4096) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class HookResult:
    """One hook run by the harness: the chain's verdict and the reply it makes (None: silent)."""

    verdict: Verdict
    reply: Reply | None

    @property
    def code(self) -> str:
        return self.verdict.code.name


def plugin_section(name: str, **options: Any) -> str:
    """``[[name]]`` with ``options`` as ini text (a list becomes a comma list)."""
    lines = [f"[[{name}]]"]
    for key, value in options.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(_ini_word(str(v)) for v in value) + ("," if len(value) == 1 else "")
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        else:
            value = _ini_word(str(value))
        lines.append(f"  {key} = {value}")
    return "\n".join(lines) + "\n"


def _ini_word(text: str) -> str:
    """``text`` as one configobj value: quoted when a comma, a '#' or edge spaces would split it."""
    if not any(c in text for c in ',#"\'') and text == text.strip():
        return text
    return f"'{text}'" if '"' in text else f'"{text}"'


class PluginHarness:
    """Plugins loaded as the server loads them, run without a network client.

    ``PluginHarness(tmp_path, "dnsbl", zones=["zen.test"])`` loads one plugin by name (a
    file of the plugin folders, a dotted module, an entry point of ``qpgevent.plugins``)
    or from a file path, its options validated by its configspec; ``after`` is ini text
    for plugins that run after it (``[[rcpt_ok]]`` to accept what it lets through).
    ``dns`` is a ``LoopbackDns`` to resolve with; ``settings`` go to ``write_ini``. The
    state store is the embedded one, in ``directory``. The resolver and the store are per
    process, as in a worker: the last harness (or server) made wins.
    """

    def __init__(self, directory: str | os.PathLike[str], plugin: str | os.PathLike[str] | None = None, *,
                 after: str = "", dns: Any = None, settings: dict[str, Any] | None = None,
                 **options: Any) -> None:
        self.directory = Path(directory)
        settings = dict(settings or {})
        settings.setdefault("store_backend", "embedded")
        settings.setdefault("store_path", str(self.directory / "store.sqlite"))
        settings.setdefault("spool_dir", str(self.directory / "spool"))
        if dns is not None:
            settings.setdefault("dns_nameservers", "127.0.0.1")
            settings.setdefault("dns_port", dns.port)
        plugins = ""
        if plugin is not None:
            name = str(plugin)
            if name.endswith(".py"):
                path = Path(name).resolve()
                dirs = settings.get("plugin_dirs") or []
                dirs = [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
                settings["plugin_dirs"] = [*dirs, str(path.parent)]
                name = path.stem
            plugins = plugin_section(name, **options)
        elif options:
            raise TypeError("plugin options without a plugin")
        plugins += textwrap.dedent(after)
        self.ini = write_ini(self.directory, plugins or "", **settings)
        self.settings = config_module.load(str(self.ini))
        #: Its own resolver ([dns]: ``dns`` if given) and store, as a server has.
        self.services = Services.from_settings(self.settings)
        os.makedirs(self.settings.spool_dir, exist_ok=True)
        with self.services.active():
            self.plugins: list[Plugin] = load_plugins(self.settings)
            self.runner = HookRunner(self.plugins, self.settings.plugin_timeout, timeout=gevent.Timeout)
            self._conversations: list[Conversation] = []
            self.runner.notify("post_fork", None)

    @property
    def plugin(self) -> Plugin:
        """The first plugin (the one under test)."""
        return self.plugins[0]

    def run_session(self, script: Iterable[str | bytes], ip: str = "192.0.2.1",
                    timeout: float = 30.0) -> Transcript:
        """Play SMTP lines through a real Session; see ``qpgevent.server.dryrun.run_script``."""
        with self.services.active():  # the session's greenlet starts with a copy of this context
            return run_script(self.runner, self.settings, script, remote_ip=ip, timeout=timeout)

    def session(self, ip: str = "192.0.2.1", helo: str | None = None) -> Session:
        """A real Session for ``run_hook``, of a conversation not started (no socket, nothing said)."""
        connection = Connection(ip, 40000, "127.0.0.1", 25, hello="ehlo" if helo else None, hello_host=helo)
        conversation = Conversation(connection, self.runner, self.settings, surroundings=surroundings(self.settings))
        self._conversations.append(conversation)  # the session holds it weakly: keep it for the test
        return conversation.session

    def run_hook(self, hook: str, *args: Any, session: Session | None = None, ip: str = "192.0.2.1",
                 helo: str | None = None) -> HookResult:
        """Run ``hook`` through the real runner and reply table, as the session would.

        The sender of ``mail`` and the recipient of ``rcpt`` may be given as text
        ("<a@example.test>"); their params default to ``{}``.
        """
        spec = HOOKS[hook]
        arguments = list(args)
        if hook in ("mail", "rcpt"):
            if arguments and isinstance(arguments[0], str):
                text = arguments[0]
                arguments[0] = Address.parse(text if text.startswith("<") else f"<{text}>")
            if len(arguments) == 1:
                arguments.append({})
        if hook in ("mail_pre", "rcpt_pre") and len(arguments) == 1:
            arguments.append({})
        if len(arguments) != len(spec.args):
            raise TypeError(f"hook {hook} takes ({', '.join(spec.args)}); got {len(arguments)} arguments")
        session = session or self.session(ip, helo)
        with self.services.active():
            verdict = self.runner.run(hook, session if spec.session else None, *arguments)
        fields = {"me": self.settings.me}
        if arguments and isinstance(arguments[0], Address):
            fields["address"] = arguments[0].format()
        return HookResult(verdict, answer(hook, verdict, **fields).reply)


__all__ = ["write_ini", "InProcessServer", "ServerProcess", "child_pids", "maildir_messages", "strip_trace",
           "peak_memory_kib",
           "wait_until", "RawClient", "PluginHarness", "HookResult", "plugin_section", "ClientReply",
           "Transcript", "DEFAULT_PLUGINS"]
