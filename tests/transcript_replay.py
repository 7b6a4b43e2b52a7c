"""Read SMTP transcripts (``tests/transcripts/*.smtp``) and replay them at two levels.

The format is described in ``tests/transcripts/README.md``. There is one parser and one
replay loop; what differs is the peer the client lines go to:

- ``CorePeer``: the real conversation and plugins, in memory (unit level, no socket);
- ``SocketPeer``: the real server over a loopback socket (e2e level).

Test modules import this file as ``transcript_replay``: pytest puts ``tests/`` on
``sys.path`` because ``tests/conftest.py`` lives there and ``tests/`` has no ``__init__.py``.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import gevent

from qpgevent import config
from qpgevent.connection import Connection
from qpgevent.engine.conversation import Conversation
from qpgevent.engine.hooks import HookRunner
from qpgevent.engine.loader import load_plugins
from qpgevent.engine.memory import InMemory
from qpgevent.server.driver import surroundings
from qpgevent.testing import maildir_messages, strip_trace, write_ini

TRANSCRIPTS = Path(__file__).parent / "transcripts"
CLOSED_MARK = "<connection closed>"
LEVELS = ("core", "e2e")
#: The test configuration each plugin a transcript names gets (ini text under its section).
PLUGIN_OPTIONS = {
    "rcpt_ok": "domains = example.test",
    "queue/maildir": "path = Maildir",
    "queue/discard": "",
    "count_unrecognized_commands": "",
}
_HEADER = re.compile(r"#\s*([a-z_]+):\s*(.*?)\s*$")


class TranscriptError(Exception):
    """The transcript file itself is malformed (not a failure of the server)."""


class NoReply(Exception):
    """The peer has nothing more to say and has not closed: it is waiting for input."""


@dataclass(frozen=True)
class Send:
    data: bytes
    line: int


@dataclass(frozen=True)
class Expect:
    text: str
    line: int

    def matches(self, got: str) -> bool:
        if self.text.endswith("..."):
            return got.startswith(self.text[:-3])
        return got == self.text


@dataclass(frozen=True)
class Closed:
    line: int


Step = Send | Expect | Closed


@dataclass(frozen=True)
class Transcript:
    name: str
    level: str
    plugins: tuple[str, ...]
    settings: dict[str, str]
    steps: tuple[Step, ...]
    messages: tuple[bytes, ...] = field(default=())

    @property
    def core(self) -> bool:
        return self.level == "core"

    @property
    def delivers_to_maildir(self) -> bool:
        return "queue/maildir" in self.plugins

    def plugins_ini(self) -> str:
        sections = []
        for name in self.plugins:
            sections.append(f"[[{name}]]")
            if PLUGIN_OPTIONS[name]:
                sections.append("  " + PLUGIN_OPTIONS[name])
        return "\n".join(sections)

    def write_ini(self, directory: Path) -> Path:
        return write_ini(directory, self.plugins_ini(), **self.settings)


def all_transcripts() -> list[Path]:
    return sorted(TRANSCRIPTS.glob("*.smtp"))


def load(path: Path) -> Transcript:
    return parse(path.read_text(encoding="utf-8"), path.name)


def parse(text: str, name: str = "<text>") -> Transcript:
    headers: dict[str, str] = {}
    steps: list[Step] = []
    messages: list[bytes] = []
    message: list[str] | None = None  # the M: group being read

    def error(number: int, problem: str) -> TranscriptError:
        return TranscriptError(f"{name}:{number}: {problem}")

    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        tag, rest = raw[:2], raw[3:] if raw[2:3] == " " else raw[2:]
        if tag != "M:" and message is not None:
            messages.append("".join(line + "\r\n" for line in message).encode("utf-8"))
            message = None
        if raw.startswith("#"):
            header = _HEADER.match(raw)
            if header and not steps:
                headers[header.group(1)] = header.group(2)
            continue
        if steps and isinstance(steps[-1], Closed):
            raise error(number, f"nothing may follow {CLOSED_MARK!r}")
        if tag == "C:":
            steps.append(Send((rest + "\r\n").encode("utf-8"), number))
        elif tag == "C+":
            if not steps or not isinstance(steps[-1], Send):
                raise error(number, "C+ continues the write of the C: line just above it")
            steps[-1] = Send(steps[-1].data + (rest + "\r\n").encode("utf-8"), steps[-1].line)
        elif tag == "S:":
            steps.append(Closed(number) if rest == CLOSED_MARK else Expect(rest, number))
        elif tag == "M:":
            message = (message or []) + [rest]
        else:
            raise error(number, f"not a transcript line: {raw!r}")
    if message is not None:
        messages.append("".join(line + "\r\n" for line in message).encode("utf-8"))

    level = headers.pop("level", "")
    if level not in LEVELS:
        raise error(1, f"'# level:' must be one of {', '.join(LEVELS)}")
    plugins = tuple(p.strip() for p in headers.pop("plugins", "").split(",") if p.strip())
    unknown = [p for p in plugins if p not in PLUGIN_OPTIONS]
    if not plugins or unknown:
        raise error(1, f"'# plugins:' must list plugins among {', '.join(PLUGIN_OPTIONS)}")
    if not steps or not isinstance(steps[0], Expect) or not steps[0].text.startswith("220"):
        raise error(1, "the first line must be the 220 greeting")
    if not isinstance(steps[-1], Closed):
        raise error(len(text.splitlines()), f"the last line must be 'S: {CLOSED_MARK}'")
    if messages and "queue/maildir" not in plugins:
        raise error(1, "M: lines need queue/maildir to check the delivery")
    return Transcript(name, level, plugins, headers, tuple(steps), tuple(messages))


def replay(transcript: Transcript, peer: CorePeer | SocketPeer) -> None:
    """Play the client's part against ``peer``; raise AssertionError at the first difference."""
    for step in transcript.steps:
        where = f"{transcript.name}:{step.line}"
        if isinstance(step, Send):
            peer.send(step.data, where)
            continue
        try:
            got = peer.read_line()
        except NoReply:
            raise AssertionError(f"{where}: waited for a reply, none came") from None
        if isinstance(step, Closed):
            if got is not None:
                raise AssertionError(f"{where}: expected the connection closed, got {got!r}")
        elif got is None:
            raise AssertionError(f"{where}: expected {step.text!r}, the connection was closed")
        elif not step.matches(got):
            raise AssertionError(f"{where}: expected {step.text!r}, got {got!r}")


def settings_for(transcript: Transcript, directory: Path) -> config.Settings:
    """The real, validated settings the transcript's header describes."""
    return config.load(str(transcript.write_ini(directory)))


class CorePeer:
    """The real conversation of the real plugins, in memory: no socket, no server.

    The plugins and settings are the transcript's (the same ini the e2e level gives the
    server), loaded by the real loader; the conversation (``qpgevent.engine``) is the one
    the server drives, here fed byte for byte by ``qpgevent.engine.memory``. So this level
    checks every decision of the session, not a copy of it; only the socket is missing.
    """

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        runner = HookRunner(load_plugins(settings), settings.plugin_timeout, timeout=gevent.Timeout)
        runner.notify("post_fork", None)
        conversation = Conversation(Connection("127.0.0.1", 40000, "127.0.0.1", 25), runner, settings,
                                    surroundings=surroundings(settings))
        self.peer = InMemory(conversation)
        self.peer.open()
        self._out = bytearray(self.peer.read())

    @property
    def delivered(self) -> list[bytes]:
        """The messages in the transcript's Maildir, as the client sent them."""
        maildir = Path(self.settings.base_dir) / "Maildir"
        return sorted(strip_trace(message) for message in maildir_messages(maildir).values())

    def send(self, data: bytes, where: str = "") -> None:
        if self._out:
            raise AssertionError(f"{where}: the server said {bytes(self._out)!r} first, "
                                 "which the transcript does not list")
        if self.peer.closed:
            raise AssertionError(f"{where}: the client writes after the server closed")
        self.peer.send(data)
        self._out += self.peer.read()

    def read_line(self) -> str | None:
        if not self._out:
            if self.peer.closed:
                return None
            raise NoReply
        end = self._out.index(b"\r\n")
        line = bytes(self._out[:end])
        del self._out[:end + 2]
        return line.decode("utf-8")


class SocketPeer:
    """A raw client socket to the real server (exact bytes out, reply lines in)."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._reader = self.sock.makefile("rb")

    def send(self, data: bytes, where: str = "") -> None:
        self.sock.sendall(data)

    def read_line(self) -> str | None:
        try:
            raw = self._reader.readline(4096)
        except TimeoutError:
            raise NoReply from None
        if not raw:
            return None
        if not raw.endswith(b"\r\n"):
            raise AssertionError(f"reply line not ended by CRLF: {raw!r}")
        return raw[:-2].decode("utf-8")

    def close(self) -> None:
        self._reader.close()
        self.sock.close()
