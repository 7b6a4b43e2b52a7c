"""The conversation's two interfaces: the requests it makes of its driver, and ``Dialogue``.

A driver asks ``Conversation.next_request()`` what to do and gets a ``Request`` (READ,
FLUSH, START_TLS, CLOSE) or a ``Wait``. ``Dialogue`` is what the conversation's parts
(``authentication``, ``mail``) use of it: they are written against this Protocol so that
they need not import the module that holds them. ``Conversation``
(``qpgevent.engine.conversation``) is the one implementation.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import Listen, Settings
from ..core.codes import Verdict
from ..core.protocol import SmtpProtocol
from ..core.reply import Answer, Reply
from .hooks import HookRunner
from .session import Session, Tally
from .surroundings import Counters, Surroundings


class Request(enum.Enum):
    """What the driver does next (each writes ``Conversation.out`` first)."""

    READ = "read"
    FLUSH = "flush"
    START_TLS = "start tls"
    CLOSE = "close"


@dataclass(frozen=True, slots=True)
class Wait:
    """Pause this long before going on (nothing is written meanwhile)."""

    seconds: float


READ, FLUSH, START_TLS, CLOSE = Request.READ, Request.FLUSH, Request.START_TLS, Request.CLOSE


class Asked:
    """What asking a hook came to: the outcome, the reply (sent already unless PROCEED), the verdict."""

    __slots__ = ("outcome", "reply", "verdict")

    def __init__(self, outcome: Any, answer_reply: Reply | None, verdict: Verdict) -> None:
        self.outcome, self.reply, self.verdict = outcome, answer_reply, verdict


class Dialogue(Protocol):
    settings: Settings
    listen: Listen
    copies: int  #: how many times ``send`` writes its reply (LMTP: once per recipient)
    tls_offered: bool  #: STARTTLS can be offered ([tls] has a certificate)
    runner: HookRunner
    session: Session
    protocol: SmtpProtocol
    surroundings: Surroundings
    counters: Counters
    tally: Tally

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]: ...

    @property
    def me(self) -> str: ...

    def decide(self, hook: str, *args: Any, only: str | None = None) -> Verdict: ...

    def answer(self, hook: str, verdict: Verdict, **fields: str) -> Answer: ...

    def ask(self, hook: str, *args: Any, **fields: str) -> Asked: ...

    def send(self, answer_reply: Reply) -> None: ...

    def wait(self, seconds: float) -> None: ...

    def reset_transaction(self) -> None: ...
