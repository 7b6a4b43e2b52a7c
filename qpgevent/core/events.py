"""The events of the SMTP server protocol: what ``SmtpProtocol.next_event`` hands out.

Commands in sequence (``Helo`` ... ``Auth``, ``Unknown`` for a verb the core does not
know), a line answering our 334 (``AuthResponse``), input the core refused by itself
(``Rejected``, with the reply to send), the message in pieces (``MessageData``) and its
end (``MessageEnd``; by BDAT, ``ChunkEnd`` after each chunk but the LAST one), and the two markers ``NEED_DATA`` and ``CONNECTION_CLOSED``. Plain
frozen values: the protocol makes them, the conversation reads them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .reply import Reply


class State(enum.Enum):
    NEED_HELLO = "need hello"
    READY = "ready"  #: greeted, no transaction
    MAIL = "mail"  #: a sender was accepted
    RCPT = "rcpt"  #: at least one recipient was accepted
    DATA = "data"  #: the message is streaming in (after DATA, or a BDAT chunk's octets)
    BDAT = "bdat"  #: between BDAT chunks: the message is partly in (RFC 3030)
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Command:
    """A well-formed command, in sequence. ``line`` is the raw text, for logs."""

    verb: str
    argument: str
    line: str


@dataclass(frozen=True, slots=True)
class Helo(Command):
    domain: str = ""


@dataclass(frozen=True, slots=True)
class Ehlo(Command):
    domain: str = ""


@dataclass(frozen=True, slots=True)
class Mail(Command):
    path: str = ""  #: as written, brackets included: plugins may rewrite it (mail_pre)
    params: dict[str, str | None] = field(default_factory=dict)  #: upper-cased keys


@dataclass(frozen=True, slots=True)
class Rcpt(Command):
    path: str = ""
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Data(Command):
    pass


@dataclass(frozen=True, slots=True)
class Bdat(Command):
    """RFC 3030: ``size`` octets of message follow the command line; ``last`` ends it."""

    size: int = 0
    last: bool = False


@dataclass(frozen=True, slots=True)
class Rset(Command):
    pass


@dataclass(frozen=True, slots=True)
class Noop(Command):
    pass


@dataclass(frozen=True, slots=True)
class Quit(Command):
    pass


@dataclass(frozen=True, slots=True)
class Vrfy(Command):
    pass


@dataclass(frozen=True, slots=True)
class Help(Command):
    pass


@dataclass(frozen=True, slots=True)
class Starttls(Command):
    """RFC 3207. Answered 220, the input buffered after it is thrown away (see ``send``)."""


@dataclass(frozen=True, slots=True)
class Auth(Command):
    """RFC 4954. ``initial`` is the decoded initial response (None: none given; ``=`` is b"")."""

    mechanism: str = ""
    initial: bytes | None = None


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """One client line in answer to our 334 challenge, base64-decoded. Never log it."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Unknown(Command):
    """A verb the core does not know; plugins may (the unrecognized_command hook)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """Input the protocol refused by itself; send ``reply`` and carry on."""

    reply: Reply
    line: str = ""


@dataclass(frozen=True, slots=True)
class MessageData:
    """A piece of the message: dot-unstuffed, CRLF line endings, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The final dot. ``problem`` is the reply to give instead of delivering, if any."""

    size: int
    problem: Reply | None = None


@dataclass(frozen=True, slots=True)
class ChunkEnd:
    """A BDAT chunk (not the LAST) is in: ``size`` its octets, ``total`` the message's so far."""

    size: int
    total: int
    problem: Reply | None = None


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


class _ConnectionClosed:
    def __repr__(self) -> str:
        return "CONNECTION_CLOSED"


NEED_DATA = _NeedData()
CONNECTION_CLOSED = _ConnectionClosed()

Event = Command | AuthResponse | Rejected | MessageData | MessageEnd | ChunkEnd | _NeedData | _ConnectionClosed
