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

_SECTIONS = {
    "server": ("me", "listen", "banner", "spool_dir", "plugin_dirs", "size_threshold", "shutdown_timeout"),
    "limits": ("max_connections", "max_message_size", "max_recipients", "max_command_line",
               "max_text_line", "command_timeout", "data_timeout", "plugin_timeout", "max_bad_commands"),
    "smtp": ("allow_bare_lf",),
    "logging": ("level", "file"),
}

DEFAULT_PLUGINS = """
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
"""


def write_ini(directory: str | os.PathLike[str], plugins: str = DEFAULT_PLUGINS, **settings: Any) -> Path:
    """Write ``qpsmtpd.ini`` into ``directory``: settings by key name, plugins as ini text."""
    settings.setdefault("me", "mx.example.test")
    settings.setdefault("listen", "127.0.0.1:0")
    lines = []
    for section, keys in _SECTIONS.items():
        lines.append(f"[{section}]")
        for key in keys:
            if key in settings:
                value = settings.pop(key)
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
    """The real server in this process (greenlets), on a loopback port the OS picked."""

    def __init__(self, ini: str | os.PathLike[str]) -> None:
        self.settings = config_module.load(str(ini))
        os.makedirs(self.settings.spool_dir, exist_ok=True)
        self.server = SmtpServer(self.settings, load_plugins(self.settings))
        self.server.start()
        self.host, self.port = self.server.addresses[0]

    def smtp(self, **kwargs: Any) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, local_hostname="client.example.test", **kwargs)

    def stop(self, timeout: float = 1.0) -> None:
        self.server.stop(timeout)


class ServerProcess:
    """``python -m qpgevent -c INI`` in a child process; its port read from its log."""

    LISTENING = re.compile(r"listening on (\S+):(\d+)")

    def __init__(self, ini: str | os.PathLike[str], *extra_args: str, ready_timeout: float = 20.0) -> None:
        self.ini = str(ini)
        self.log_path = Path(self.ini).with_name("server.log")
        self._log = open(self.log_path, "w+b")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qpgevent", "-c", self.ini, *extra_args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.PIPE, env=env)
        self.ports: list[int] = []
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
            if b"ready (pid" in line:
                self._ready.set()
        self._ready.set()  # the process ended: let the waiter look at the log

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def smtp(self, **kwargs: Any) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example.test", **kwargs)

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
