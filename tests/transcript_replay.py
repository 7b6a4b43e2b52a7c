"""Read SMTP transcripts (``tests/transcripts/*.smtp``) and replay them at two levels.

The format is described in ``tests/transcripts/README.md``. There is one parser and one
replay loop; what differs is the peer the client lines go to:

- ``CorePeer``: the sans-I/O ``SmtpProtocol`` alone, answered the way the session answers
  when the plugins agree with the reply table's defaults (unit level, no socket);
- ``SocketPeer``: the real server over a loopback socket (e2e level).

Test modules import this file as ``transcript_replay``: pytest puts ``tests/`` on
``sys.path`` because ``tests/conftest.py`` lives there and ``tests/`` has no ``__init__.py``.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from qpgevent import __version__, config
from qpgevent.address import Address
from qpgevent.codes import ReturnCode, Verdict
from qpgevent.connection import Connection
from qpgevent.engine.hooks import HookRunner
from qpgevent.core.protocol import (CONNECTION_CLOSED, NEED_DATA, Data, Ehlo, Helo, Help, Mail,
                               MessageData, MessageEnd, Noop, Quit, Rcpt, Rejected, Rset,
                               SmtpProtocol, State, Unknown, Vrfy)
from qpgevent.core.reply import REPLY_TABLE, Canned, Outcome, Reply, answer, reply
from qpgevent.server.session import Session
from qpgevent.testing import write_ini

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
    """``SmtpProtocol`` with no socket and no plugins, answered as the session would.

    Each command gets the reply the session sends when its hook's plugins agree with
    the reply table (the ``PROCEED`` cell, DECLINED where that proceeds, else OK); the
    HELO/EHLO and greeting words are the session's. Everything the protocol decides by
    itself (``Rejected``, limits, message problems, state) is the real thing.
    """

    def __init__(self, settings: config.Settings) -> None:
        # A Session built without a socket, only to take its real Limits (from the
        # settings) and its real EHLO keywords; it never runs.
        session = Session(None, Connection("127.0.0.1", 0), HookRunner([]), settings)  # type: ignore[arg-type]
        self.me = settings.me
        self.extensions = session.extensions()
        self.protocol = SmtpProtocol(session.protocol.limits)
        self.delivered: list[bytes] = []
        self._message = bytearray()
        self._out = bytearray(self.protocol.greeting(
            reply(220, None, f"{self.me} ESMTP qpgevent {__version__} ready")))

    def send(self, data: bytes, where: str = "") -> None:
        if self._out:
            raise AssertionError(f"{where}: the server said {bytes(self._out)!r} first, "
                                 "which the transcript does not list")
        if self.protocol.state is State.CLOSED:
            raise AssertionError(f"{where}: the client writes after the server closed")
        self.protocol.receive_data(data)
        while True:
            event = self.protocol.next_event()
            if event is NEED_DATA or event is CONNECTION_CLOSED:
                return
            answer_reply = self._answer(event)
            if answer_reply is not None:
                self._out += self.protocol.send(answer_reply)

    def read_line(self) -> str | None:
        if not self._out:
            if self.protocol.state is State.CLOSED:
                return None
            raise NoReply
        end = self._out.index(b"\r\n")
        line = bytes(self._out[:end])
        del self._out[:end + 2]
        return line.decode("utf-8")

    def _answer(self, event: object) -> Reply | None:
        if isinstance(event, Rejected):
            return event.reply
        if isinstance(event, MessageData):
            self._message += event.data
            return None
        if isinstance(event, MessageEnd):
            message, self._message = bytes(self._message), bytearray()
            if event.problem is not None:
                return event.problem
            self.delivered.append(message)
            return self._default("queue")
        if isinstance(event, Helo):
            return reply(250, None, f"{self.me} Hi there [127.0.0.1]; I am so happy to meet you.")
        if isinstance(event, Ehlo):
            return reply(250, None, f"{self.me} Hi there [127.0.0.1]", *self.extensions)
        if isinstance(event, Mail):
            sender = self._address(event.path, "SMTPUTF8" in event.params, sender=True)
            return self._default("mail", address=sender.format())
        if isinstance(event, Rcpt):
            recipient = self._address(event.path, self.protocol.smtputf8, sender=False)
            return self._default("rcpt", address=recipient.format())
        if isinstance(event, Rset):
            return Canned.OK
        hooks = {Data: "data", Noop: "noop", Vrfy: "vrfy", Help: "help", Quit: "quit",
                 Unknown: "unrecognized_command"}
        return self._default(hooks[type(event)])

    def _default(self, hook: str, **fields: str) -> Reply | None:
        rules = REPLY_TABLE[hook]
        code = ReturnCode.DECLINED
        if rules[code].outcome is not Outcome.PROCEED and rules[ReturnCode.OK].outcome is Outcome.PROCEED:
            code = ReturnCode.OK
        return answer(hook, Verdict(code), me=self.me, **fields).reply

    @staticmethod
    def _address(path: str, smtputf8: bool, sender: bool) -> Address:
        # The session refuses paths the Address parser refuses; a core transcript is
        # about the protocol's own decisions, so such a path means a misfiled transcript.
        try:
            return Address.parse(path, smtputf8=smtputf8, allow_null=sender,
                                 allow_postmaster=not sender)
        except ValueError as error:
            raise TranscriptError(f"{path!r} is refused by the session ({error}): "
                                  "mark this transcript '# level: e2e'") from None


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
