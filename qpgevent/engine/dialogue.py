"""What the parts of the conversation (AUTH, the mail transaction) use of it: an interface.

``Conversation`` (``qpgevent.engine.conversation``) is the one implementation; the parts
(``authentication``, ``mail``) are written against this Protocol so that they need not
import the module that holds them.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from ..config import Listen, Settings
from ..core.codes import Verdict
from ..core.protocol import SmtpProtocol
from ..core.reply import Answer, Reply
from .hooks import HookRunner
from .session import Session, Tally
from .surroundings import Counters, Surroundings


class Asked:
    """What asking a hook came to: the outcome, the reply (sent already unless PROCEED), the verdict."""

    __slots__ = ("outcome", "reply", "verdict")

    def __init__(self, outcome: Any, answer_reply: Reply | None, verdict: Verdict) -> None:
        self.outcome, self.reply, self.verdict = outcome, answer_reply, verdict


class Dialogue(Protocol):
    settings: Settings
    listen: Listen
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

    def decide(self, hook: str, *args: Any) -> Verdict: ...

    def answer(self, hook: str, verdict: Verdict, **fields: str) -> Answer: ...

    def ask(self, hook: str, *args: Any, **fields: str) -> Asked: ...

    def send(self, answer_reply: Reply) -> None: ...

    def wait(self, seconds: float) -> None: ...

    def reset_transaction(self) -> None: ...
