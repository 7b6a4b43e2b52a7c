"""Return codes a hook gives, and the Verdict the hook runner makes of them.

The names and meanings are qpsmtpd's (``Qpsmtpd::Constants``): a plugin returns one of
these, alone or with a message, and the first one that is not DECLINED decides.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ReturnCode(enum.IntEnum):
    """What a plugin says about the event its hook was called for."""

    OK = 900  #: accept, and stop this hook's chain
    DENY = 901  #: permanent failure (5xx), stop
    DENYSOFT = 902  #: temporary failure (4xx), stop
    DENY_DISCONNECT = 903  #: permanent failure, then close the connection
    DENYSOFT_DISCONNECT = 904  #: temporary failure, then close the connection
    DECLINED = 909  #: no opinion; the next plugin runs
    DONE = 910  #: the plugin has already answered the client itself

    @property
    def is_deny(self) -> bool:
        return self in _DENIALS

    @property
    def disconnects(self) -> bool:
        return self in (ReturnCode.DENY_DISCONNECT, ReturnCode.DENYSOFT_DISCONNECT)


_DENIALS = frozenset(
    {
        ReturnCode.DENY,
        ReturnCode.DENYSOFT,
        ReturnCode.DENY_DISCONNECT,
        ReturnCode.DENYSOFT_DISCONNECT,
    }
)

OK = ReturnCode.OK
DENY = ReturnCode.DENY
DENYSOFT = ReturnCode.DENYSOFT
DENY_DISCONNECT = ReturnCode.DENY_DISCONNECT
DENYSOFT_DISCONNECT = ReturnCode.DENYSOFT_DISCONNECT
DECLINED = ReturnCode.DECLINED
DONE = ReturnCode.DONE


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of running one hook: who decided, what, and with which words.

    ``internal_error`` marks a verdict the runner made because a plugin raised or timed
    out; the reply table answers it with 451 4.3.0 whatever the hook.
    """

    code: ReturnCode = ReturnCode.DECLINED
    message: tuple[str, ...] = ()
    plugin: str | None = None
    internal_error: bool = False


DECLINED_VERDICT = Verdict()
