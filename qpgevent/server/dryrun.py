"""Scripted sessions without a network client: the real conversation, in memory.

``run_script`` plays SMTP command lines against the real conversation (real protocol
core, real hook runner, real reply table; ``qpgevent.engine.memory``, no socket), and
returns what a client would have read, with every decision the plugins made on the way.
It serves ``qpgevent plugin test`` (the dry run, ``add_test_command`` and ``run_test`` here) and the plugin
harness of ``qpgevent.testing``; the server never uses it.

A script is a list of command lines. The element after a command answered 354 (DATA) is
the message: a str or bytes, its line endings made CRLF, dot-stuffed and ended with
``.`` here; after a refused DATA the message is skipped (no reply). The first reply of a
transcript is the greeting; then one reply a sent element. A session the server closes
ends the script there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import gevent

from .. import config as config_module
from ..backends.services import configure_services
from ..config import PluginSpec, Settings
from ..connection import Connection
from ..core.codes import OK, Verdict
from ..core.errors import ConfigError
from ..engine.conversation import Conversation
from ..engine.hooks import HookRunner
from ..engine.loader import load_plugin, plugin_dirs
from ..engine.memory import InMemory
from ..plugin import Plugin
from ..results import Results
from .driver import surroundings


class ClientReply(NamedTuple):
    """One reply as the client reads it: the code and the text lines joined by newlines."""

    code: int
    text: str

    def __str__(self) -> str:
        lines = self.text.split("\n")
        return "\n".join(f"{self.code}{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines))


@dataclass(frozen=True)
class Decision:
    """What one plugin said at one hook (DECLINED included)."""

    hook: str
    plugin: str
    code: str  #: the return code's name: "OK", "DENY", "DECLINED"...
    message: tuple[str, ...]
    internal_error: bool = False

    def __str__(self) -> str:
        error = " (internal error)" if self.internal_error else ""
        words = f" {' / '.join(self.message)!r}" if self.message else ""
        return f"{self.hook}: {self.plugin} -> {self.code}{error}{words}"


@dataclass(frozen=True)
class Step:
    """One element of the script (None: the greeting), the reply to it, the decisions it caused."""

    sent: str | None
    reply: ClientReply
    decisions: tuple[Decision, ...]


@dataclass
class Transcript:
    replies: list[ClientReply] = field(default_factory=list)  #: the greeting first
    decisions: list[Decision] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    closed: bool = False  #: the server closed the connection
    notes: dict[str, Any] = field(default_factory=dict)  #: the connection's notes at the end
    #: The connection's results at the end (what each check concluded about the client).
    results: Results = field(default_factory=Results)

    @property
    def codes(self) -> list[int]:
        return [reply.code for reply in self.replies]

    def add(self, sent: str | None, reply: ClientReply, decided_before: int) -> None:
        self.replies.append(reply)
        self.steps.append(Step(sent, reply, tuple(self.decisions[decided_before:])))

    def format(self) -> str:
        """The conversation as C:/S: lines, each plugin decision indented under its command."""
        out = []
        for step in self.steps:
            if step.sent is not None:
                first, *more = step.sent.splitlines() or [""]
                out.append(f"C: {first}" + (f"  [... {len(more)} more lines]" if more else ""))
            out += [f"     {decision}" for decision in step.decisions]
            out += [f"S: {line}" for line in str(step.reply).split("\n")]
        if self.closed:
            out.append("(connection closed by the server)")
        return "\n".join(out)


class _Recorder:
    """A hook-runner observer that keeps the decisions made for one session."""

    def __init__(self, session: Any, decisions: list[Decision]) -> None:
        self.session, self.decisions = session, decisions

    def hook_started(self, hook: str, plugin: str, session: Any) -> None:
        pass

    def hook_finished(self, hook: str, plugin: str, session: Any, verdict: Verdict, seconds: float) -> None:
        if session is self.session:
            self.decisions.append(Decision(hook, plugin, verdict.code.name, verdict.message,
                                           verdict.internal_error))


class _Client:
    """Reads whole replies out of what the in-memory conversation said."""

    def __init__(self, peer: InMemory) -> None:
        self.peer = peer
        self.buffer = b""

    def reply(self) -> ClientReply | None:
        """The next whole reply, or None when the server closed first."""
        self.buffer += self.peer.read()
        lines: list[str] = []
        while True:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return None  # it said all it had: it closed (or waits, which a script never lets it)
            line, self.buffer = self.buffer[:end].decode("utf-8", "replace"), self.buffer[end + 2:]
            lines.append(line[4:])
            if line[3:4] != "-":
                return ClientReply(int(line[:3]), "\n".join(lines))

    def send(self, data: bytes) -> bool:
        if self.peer.closed:
            return False
        self.peer.send(data)
        return True


def message_bytes(message: str | bytes) -> bytes:
    """``message`` as DATA sends it: CRLF line endings, dot-stuffed, ended by ``.``."""
    raw = message.encode("utf-8") if isinstance(message, str) else message
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


def run_script(runner: HookRunner, settings: Settings, script: Iterable[str | bytes], *,
               remote_ip: str = "192.0.2.1", remote_port: int = 40000, timeout: float = 30.0) -> Transcript:
    """Play ``script`` against a real conversation of ``runner``'s plugins; the Transcript.

    ``timeout`` is kept for callers of the socket version; nothing waits in memory.
    """
    connection = Connection(remote_ip, remote_port, "127.0.0.1", 25)
    conversation = Conversation(connection, runner, settings, surroundings=surroundings(settings))
    transcript = Transcript()
    recorder = _Recorder(conversation.session, transcript.decisions)
    runner.observe(recorder)
    peer = InMemory(conversation)
    client = _Client(peer)
    try:
        peer.open()
        greeting = client.reply()
        if greeting is None:
            transcript.closed = True
            return transcript
        transcript.add(None, greeting, 0)
        in_data = skip_message = False
        for element in script:
            text = element if isinstance(element, str) else element.decode("utf-8", "replace")
            if skip_message:
                skip_message = False
                continue
            if in_data:
                data = message_bytes(element)
            else:
                data = (element.encode("utf-8") if isinstance(element, str) else element).rstrip(b"\r\n") + b"\r\n"
            decided = len(transcript.decisions)
            answered = client.reply() if client.send(data) else None
            if answered is None:
                transcript.closed = True
                break
            transcript.add(text, answered, decided)
            was_data = not in_data and text.strip().upper() == "DATA"
            in_data = not in_data and answered.code == 354
            skip_message = was_data and not in_data  # DATA refused: the message is not sent
            if answered.code in (221, 421):
                transcript.closed = client.reply() is None
                break
    finally:
        peer.close()
        runner.observers.remove(recorder)
        transcript.notes = dict(conversation.session.connection.notes)
        transcript.results = conversation.session.connection.results
    return transcript


# -- qpgevent plugin test ------------------------------------------------------

DEFAULT_MESSAGE = "From: <{sender}>\nTo: <{recipient}>\nSubject: qpgevent dry run\n\nA test message.\n"


class DryRunQueue(Plugin):
    """Stands in for the queue plugins in a dry run: nothing is delivered."""

    def hook_queue(self, session: Any) -> Any:
        return OK, "Queued (dry run: not delivered)"


def add_test_command(commands: Any) -> None:
    """``qpgevent plugin test``: its options, on the ``plugin`` command's sub-parsers."""
    parser = commands.add_parser(
        "test", help="a dry run: one synthetic SMTP session through a plugin or the config's chain",
        description="Dry run: one SMTP session from a synthetic client through a plugin, or the "
                    "whole chain of the config; prints each hook's decision and the replies. "
                    "Exit status 0 when the message was accepted, 1 when not, 2 on a config error.")
    parser.add_argument("name", nargs="?", metavar="NAME", help="a plugin label of the config, or a plugin name "
                        "(file, dotted module, entry point); default: every plugin of the config")
    parser.add_argument("-c", "--config", default="qpsmtpd.ini",
                        help="the ini file (default: %(default)s; optional when NAME is given)")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of NAME (repeatable), replacing the config's")
    parser.add_argument("--ip", default="192.0.2.1", help="the client's address (default: %(default)s)")
    parser.add_argument("--helo", default="client.example.test", help="EHLO argument (default: %(default)s)")
    parser.add_argument("--from", dest="sender", default="sender@example.org", type=_path, metavar="ADDRESS",
                        help="MAIL FROM address (default: %(default)s); '<>' or '' is the null "
                             "sender of a bounce")
    parser.add_argument("--to", dest="recipients", action="append", metavar="ADDRESS", type=_path,
                        help="RCPT TO address (repeatable; default: postmaster@ME)")
    parser.add_argument("--message", type=Path, metavar="FILE", help="the message to send (default: a short one)")
    parser.add_argument("--queue", action="store_true",
                        help="run the configured queue/* plugins (default: nothing is delivered)")
    parser.add_argument("--real-store", action="store_true",
                        help="use the config's [store] (default: a temporary embedded store)")
    parser.set_defaults(handler=lambda args: run_test(args, parser))


def _path(text: str) -> str:
    """An address as given on the command line: ``<a@b>`` and ``a@b`` alike; ``<>`` is empty."""
    text = text.strip()
    return text[1:-1] if text.startswith("<") and text.endswith(">") else text


def run_test(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``qpgevent plugin test ...``: 0 when the message was accepted, 1 when not, 2 on a config error."""
    for option in args.option:
        if "=" not in option:
            parser.error(f"--option {option!r}: expected KEY=VALUE")
    with tempfile.TemporaryDirectory(prefix="qpgevent-dry-run-") as scratch:
        try:
            settings, runner = _dry_run_chain(args, Path(scratch))
            message = args.message.read_bytes() if args.message else None
        except ConfigError as error:
            print(f"qpgevent: {' '.join(str(error).splitlines())}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"qpgevent: --message: {error}", file=sys.stderr)
            return 2
        recipients = args.recipients or [f"postmaster@{settings.me}"]
        if message is None:
            message = DEFAULT_MESSAGE.format(sender=args.sender or f"MAILER-DAEMON@{settings.me}",
                                             recipient=recipients[0]).encode()
        script: list[str | bytes] = [f"EHLO {args.helo}", f"MAIL FROM:<{args.sender}>"]
        script += [f"RCPT TO:<{recipient}>" for recipient in recipients]
        script += ["DATA", message, "QUIT"]
        print(f"plugins: {', '.join(p.name for p in runner.plugins)}")
        transcript = run_script(runner, settings, script, remote_ip=args.ip)
        print(transcript.format())
        if transcript.results:
            print(f"results: {transcript.results.summary()}")
    accepted = _accepted(transcript)
    print("result: " + ("accepted" if accepted else "not accepted"))
    return 0 if accepted else 1


def _accepted(transcript: Transcript) -> bool:
    """Whether the reply to the end of the message was 250."""
    for before, step in zip(transcript.steps, transcript.steps[1:]):
        if before.reply.code == 354:
            return step.reply.code == 250
    return False


def _dry_run_chain(args: argparse.Namespace, scratch: Path) -> tuple[Settings, HookRunner]:
    ini = Path(args.config)
    if not ini.exists() and args.name:
        ini = scratch / "qpsmtpd.ini"
        ini.write_text("[server]\n  me = mx.example.test\n[dns]\n  reverse_lookup = no\n[plugins]\n",
                       encoding="utf-8")
    settings = config_module.load(str(ini))
    options = dict(option.split("=", 1) for option in args.option)
    specs = list(settings.plugins)
    if args.name:
        chosen = [spec for spec in specs if spec.label == args.name]
        spec = chosen[0] if chosen else PluginSpec(args.name, {}, "plugin test", None)
        # Options given with -o are blamed on -o, not on a line of the ini, when they are wrong.
        specs = [dataclasses.replace(spec, options={**spec.options, **options},
                                     overrides=tuple(f"{key}={value}" for key, value in options.items()))]
    elif options:
        raise ConfigError("--option needs a plugin NAME")
    if not args.queue:
        specs = [spec for spec in specs if not spec.name.startswith("queue/")]
    store = settings.store if args.real_store else {"backend": "embedded", "path": str(scratch / "store.sqlite")}
    settings = dataclasses.replace(settings, spool_dir=str(scratch / "spool"), store=store, plugins=tuple(specs))
    os.makedirs(settings.spool_dir, exist_ok=True)
    configure_services(settings)
    dirs = plugin_dirs(settings)
    plugins = [load_plugin(spec, dirs, settings.base_dir) for spec in specs]
    if not args.queue:
        plugins.append(DryRunQueue("dry-run-queue", {}, __file__))
    runner = HookRunner(plugins, settings.plugin_timeout, timeout=gevent.Timeout)
    runner.notify("post_fork", None)
    return settings, runner


__all__ = ["ClientReply", "Decision", "Step", "Transcript", "message_bytes", "run_script", "add_test_command",
           "run_test"]
