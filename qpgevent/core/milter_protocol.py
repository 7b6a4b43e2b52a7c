"""The milter protocol, MTA side, version 6: commands encoded to bytes, replies decoded from bytes.

Sans-I/O: no sockets here. ``encode_*`` build the packets an MTA sends to a filter;
``Decoder`` takes whatever bytes arrived (a packet may come in pieces, or several in one
read) and gives back typed replies. The client that moves the bytes is
``qpgevent.milter_client``.

Theory of operation (sendmail's libmilter ``mfdef.h`` and ``mfapi.h``, as Postfix speaks it):
every packet, both ways, is a 4-byte big-endian length (counting the command byte), one
command byte, then the data; strings are NUL-terminated. The MTA opens with SMFIC_OPTNEG
(version, the actions it allows, the protocol steps it can skip); the filter answers with the
subset it wants, and may add per-stage macro lists (SETSYMLIST). Then one command per SMTP
step; the steps whose SMFIP_NO* flag the filter set are not sent, and after a step whose
SMFIP_NR_* flag is set no reply is read. At end of message the filter sends its
modifications (add header, change recipients, replace the body...) before its final reply.

Anything that does not follow these rules is a ``ProtocolError``: a length of 0 or
over ``MAX_PACKET``, a reply code we do not know, a reply whose data is malformed.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

VERSION = 6
#: The largest packet accepted from a filter; libmilter's own limit (MILTER_MAX_DATA_SIZE
#: can be raised to 1 MiB at build time): anything longer is garbage, not a reply.
MAX_PACKET = 1 << 20
#: Body chunks sent to a filter are at most this long (MILTER_CHUNK_SIZE).
CHUNK_SIZE = 65535


class ProtocolError(Exception):
    """The filter sent something that is not the milter protocol."""


class Action(enum.IntFlag):
    """What a filter may do to the message at end of message (SMFIF_*)."""
    ADDHDRS = 0x1
    CHGBODY = 0x2
    ADDRCPT = 0x4
    DELRCPT = 0x8
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


ALL_ACTIONS = Action(0x1FF)


class Step(enum.IntFlag):
    """Protocol flags (SMFIP_*): steps the filter does not want (NO*), or answers not (NR_*)."""
    NOCONNECT = 0x1
    NOHELO = 0x2
    NOMAIL = 0x4
    NORCPT = 0x8
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000


#: What we offer: every step may be left out or left unanswered (we never send UNKNOWN,
#: and do not offer RCPT_REJ: refused recipients are not shown to filters).
OFFERED_STEPS = Step(0x1FFFFF) & ~Step.RCPT_REJ


class Command(bytes, enum.Enum):
    """Command bytes, MTA to filter (SMFIC_*)."""
    ABORT = b"A"
    BODY = b"B"
    CONNECT = b"C"
    MACRO = b"D"
    BODYEOB = b"E"
    HELO = b"H"
    HEADER = b"L"
    MAIL = b"M"
    EOH = b"N"
    OPTNEG = b"O"
    QUIT = b"Q"
    RCPT = b"R"
    DATA = b"T"


#: For each command: the flag that leaves it out, and the flag that leaves its reply out.
_SKIPPED_BY = {
    Command.CONNECT: (Step.NOCONNECT, Step.NR_CONN), Command.HELO: (Step.NOHELO, Step.NR_HELO),
    Command.MAIL: (Step.NOMAIL, Step.NR_MAIL), Command.RCPT: (Step.NORCPT, Step.NR_RCPT),
    Command.DATA: (Step.NODATA, Step.NR_DATA), Command.HEADER: (Step.NOHDRS, Step.NR_HDR),
    Command.EOH: (Step.NOEOH, Step.NR_EOH), Command.BODY: (Step.NOBODY, Step.NR_BODY),
}
#: SETSYMLIST stage numbers (SMFIM_*) -> the command whose macros they name.
_MACRO_STAGES = {0: Command.CONNECT, 1: Command.HELO, 2: Command.MAIL, 3: Command.RCPT,
                 4: Command.DATA, 5: Command.BODYEOB, 6: Command.EOH}


class Kind(enum.Enum):
    """What a reply says (SMFIR_*), by its byte."""
    CONTINUE = b"c"
    ACCEPT = b"a"
    REJECT = b"r"
    TEMPFAIL = b"t"
    DISCARD = b"d"
    REPLYCODE = b"y"
    SKIP = b"s"
    PROGRESS = b"p"
    QUARANTINE = b"q"
    CONNFAIL = b"f"
    SHUTDOWN = b"4"
    ADDHEADER = b"h"
    INSHEADER = b"i"
    CHGHEADER = b"m"
    CHGFROM = b"e"
    ADDRCPT = b"+"
    ADDRCPT_PAR = b"2"
    DELRCPT = b"-"
    REPLBODY = b"b"
    SETSYMLIST = b"l"
    OPTNEG = b"O"


#: Replies that change the message (only valid at end of message).
MODIFICATIONS = frozenset({Kind.ADDHEADER, Kind.INSHEADER, Kind.CHGHEADER, Kind.CHGFROM, Kind.ADDRCPT,
                           Kind.ADDRCPT_PAR, Kind.DELRCPT, Kind.REPLBODY, Kind.QUARANTINE})


@dataclass(frozen=True)
class Negotiated:
    """The filter's answer to OPTNEG: what it may do, which steps it wants, which macros."""
    version: int
    actions: Action
    steps: Step
    macros: dict[Command, tuple[bytes, ...]] = field(default_factory=dict)

    def sends(self, command: Command) -> bool:
        """Whether the filter wants ``command`` at all."""
        skip = _SKIPPED_BY.get(command)
        return skip is None or not self.steps & skip[0]

    def answers(self, command: Command) -> bool:
        """Whether the filter replies to ``command`` (ABORT and QUIT never have a reply)."""
        if command in (Command.ABORT, Command.QUIT, Command.MACRO):
            return False
        skip = _SKIPPED_BY.get(command)
        return skip is None or not self.steps & skip[1]


@dataclass(frozen=True)
class Reply:
    """One packet from the filter. ``text`` for REPLYCODE/QUARANTINE, ``name``/``value`` for
    header changes, ``address``/``args`` for envelope changes, ``data`` for REPLBODY."""
    kind: Kind
    index: int = 0
    name: bytes = b""
    value: bytes = b""
    text: str = ""
    address: bytes = b""
    args: bytes = b""
    data: bytes = b""

    @property
    def code(self) -> int:
        """The SMTP code of a REPLYCODE ("550 5.7.1 ..." -> 550)."""
        return int(self.text[:3])


def packet(command: Command, data: bytes = b"") -> bytes:
    return struct.pack("!IB", len(data) + 1, command.value[0]) + data


def _cstrings(*values: bytes | str) -> bytes:
    out = []
    for value in values:
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        if b"\0" in raw:
            raise ValueError(f"a milter string cannot hold NUL: {raw[:40]!r}")
        out.append(raw + b"\0")
    return b"".join(out)


def encode_optneg(actions: Action = ALL_ACTIONS, steps: Step = OFFERED_STEPS) -> bytes:
    return packet(Command.OPTNEG, struct.pack("!III", VERSION, actions, steps))


def encode_macros(command: Command, macros: dict[str, str]) -> bytes:
    return packet(Command.MACRO, command.value + b"".join(_cstrings(k, v) for k, v in macros.items()))


def encode_connect(hostname: str, address: str, port: int) -> bytes:
    """Family ``4``/``6`` for IP addresses, ``L`` for a unix socket path, ``U`` when unknown."""
    if not address:
        return packet(Command.CONNECT, _cstrings(hostname) + b"U")
    family = b"L" if address.startswith("/") else b"6" if ":" in address else b"4"
    return packet(Command.CONNECT, _cstrings(hostname) + family + struct.pack("!H", port) + _cstrings(address))


def encode_helo(name: str) -> bytes:
    return packet(Command.HELO, _cstrings(name))


def encode_envelope(command: Command, address: str, args: list[str]) -> bytes:
    """MAIL or RCPT: ``<address>`` then each ESMTP argument (``SIZE=100``)."""
    return packet(command, _cstrings(f"<{address}>", *args))


def encode_header(name: str, value: bytes) -> bytes:
    return packet(Command.HEADER, _cstrings(name, value))


def encode_body(chunk: bytes) -> bytes:
    if len(chunk) > CHUNK_SIZE:
        raise ValueError(f"a body chunk is at most {CHUNK_SIZE} octets")
    return packet(Command.BODY, chunk)


def encode(command: Command) -> bytes:
    """A command without data: DATA, EOH, end of message, ABORT, QUIT."""
    return packet(command)


class Decoder:
    """Bytes from a filter in, ``Reply`` objects out; ``ProtocolError`` for garbage."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies = []
        while len(self._buffer) >= 4:
            (length,) = struct.unpack_from("!I", self._buffer)
            if length == 0 or length > MAX_PACKET:
                raise ProtocolError(f"packet length {length} out of range")
            if len(self._buffer) < 4 + length:
                break
            code, data = bytes(self._buffer[4:5]), bytes(self._buffer[5:4 + length])
            del self._buffer[:4 + length]
            replies.append(decode_reply(code, data))
        return replies

    @property
    def pending(self) -> int:
        """Octets of an incomplete packet held back."""
        return len(self._buffer)


def decode_reply(code: bytes, data: bytes) -> Reply:
    try:
        kind = Kind(code)
    except ValueError:
        raise ProtocolError(f"unknown reply code {code!r}") from None
    try:
        return _PARSERS.get(kind, _bare)(kind, data)
    except (struct.error, ValueError, UnicodeDecodeError, IndexError) as error:
        raise ProtocolError(f"malformed {kind.name} reply: {error}") from None


def decode_negotiation(reply: Reply) -> Negotiated:
    """The OPTNEG answer's data (kept in ``Reply.data``) -> ``Negotiated``."""
    data = reply.data
    try:
        version, actions, steps = struct.unpack_from("!III", data)
        macros, rest = {}, data[12:]
        while rest:  # SETSYMLIST: stage number, then the macro names separated by spaces
            (stage,) = struct.unpack_from("!I", rest)
            names, sep, rest = rest[4:].partition(b"\0")
            if not sep or stage not in _MACRO_STAGES:
                raise ValueError(f"bad macro list for stage {stage}")
            macros[_MACRO_STAGES[stage]] = tuple(names.split())
    except (struct.error, ValueError) as error:
        raise ProtocolError(f"malformed OPTNEG reply: {error}") from None
    if version < 2 or version > VERSION:
        raise ProtocolError(f"filter speaks milter version {version}, we speak {VERSION}")
    return Negotiated(version, Action(actions & ALL_ACTIONS), Step(steps & 0x1FFFFF), macros)


def _split(data: bytes, count: int) -> list[bytes]:
    """``count`` NUL-terminated strings (a missing last NUL is tolerated, as libmilter does)."""
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) < count:
        raise ValueError(f"{count} strings expected, {len(parts)} found")
    return parts


def _bare(kind: Kind, data: bytes) -> Reply:
    return Reply(kind, data=data)


def _text(kind: Kind, data: bytes) -> Reply:
    text = data.rstrip(b"\0").decode("utf-8", "replace")
    if kind is Kind.REPLYCODE and (len(text) < 3 or not text[:3].isdigit() or text[0] not in "45"):
        raise ValueError(f"not a 4xx/5xx reply: {text[:40]!r}")
    return Reply(kind, text=text)


def _header(kind: Kind, data: bytes) -> Reply:
    index = 0
    if kind is not Kind.ADDHEADER:
        (index,) = struct.unpack_from("!I", data)
        data = data[4:]
    parts = data.split(b"\0")
    if len(parts) < 2 or not parts[0]:
        raise ValueError("a header name and value expected")
    return Reply(kind, index=index, name=parts[0], value=parts[1])


def _envelope(kind: Kind, data: bytes) -> Reply:
    parts = _split(data, 1)
    return Reply(kind, address=parts[0], args=parts[1] if len(parts) > 1 else b"")


_PARSERS = {
    Kind.REPLYCODE: _text, Kind.QUARANTINE: _text,
    Kind.ADDHEADER: _header, Kind.INSHEADER: _header, Kind.CHGHEADER: _header,
    Kind.CHGFROM: _envelope, Kind.ADDRCPT: _envelope, Kind.ADDRCPT_PAR: _envelope, Kind.DELRCPT: _envelope,
}
