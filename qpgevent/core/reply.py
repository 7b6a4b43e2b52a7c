"""SMTP replies: the Reply value, the core's canonical replies, and the ONE reply table.

Every decision a hook makes reaches the client through ``answer()``, which looks the
(hook, return code) pair up in ``REPLY_TABLE``. qpsmtpd spread this mapping over one
``*_respond`` method per command and the copies drifted (DENYSOFT_DISCONNECT was 450 at
HELO but 421 at MAIL); here there is one table, and a test walks every cell of it.

Deliberate differences from qpsmtpd, each fixing a bug listed in its inventory:
- every ``*_DISCONNECT`` code that is temporary answers 421, the only 4xx code after
  which RFC 5321 3.8 lets a server close;
- every cell has a default text, so a plugin that denies without words still gets a
  reply out (qpsmtpd sent nothing and the client hung);
- ``queue_pre``, ``data_headers_end`` and ``data_post`` honour DENY and DENYSOFT;
- a plugin that raises or times out answers 451 4.3.0, never a pass (``INTERNAL_ERROR``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

from .codes import ReturnCode, Verdict

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_CODE = re.compile(r"^([245][0-5][0-9])(?:\s+|$)")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a code, text lines, an RFC 3463 enhanced status code.

    ``close`` says that the server closes the connection once the reply is sent.
    """

    code: int
    text: tuple[str, ...] = ("OK",)
    enhanced: str | None = None
    close: bool = False
    #: Its bytes with enhanced codes, once made: a reply kept for reuse (the canned ones, the
    #: reply table's cells, a listener's greeting) is encoded once, not once per message.
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    def to_bytes(self, enhanced_codes: bool = True) -> bytes:
        # RFC 2034 3: the enhanced code follows the reply code on every line, but only
        # on 2xx, 4xx and 5xx replies (never on 354 or the 220 greeting, which we build
        # without one).
        if not enhanced_codes and self.enhanced is not None:
            return self._encode("")
        wire = self._wire
        if wire is None:
            enhanced = self.enhanced
            wire = self._encode(enhanced + " " if enhanced and self.code // 100 in (2, 4, 5) else "")
            object.__setattr__(self, "_wire", wire)  # frozen for its fields; this is a cache
        return wire

    def _encode(self, prefix: str) -> bytes:
        text = self.text
        if len(text) == 1:  # most replies: one line, no list to build
            line = text[0]
            if not line.isprintable() and _UNPRINTABLE.search(line):  # isprintable: cheaper, stricter
                line = _UNPRINTABLE.sub("?", line)
            return f"{self.code} {prefix}{line}\r\n".encode("utf-8", "replace")
        if not text:
            return f"{self.code} {prefix}\r\n".encode("utf-8", "replace")
        # The lines after the first are the same reply after reply (EHLO's keywords, a
        # plugin's fixed text): made once (_TAILS), the first line each time.
        key = (self.code, prefix, text[1:])
        tail = _TAILS.get(key)
        if tail is None:
            tail = _lines(self.code, prefix, text[1:])
            if len(_TAILS) >= _TAILS_KEPT:
                _TAILS.clear()
            _TAILS[key] = tail
        return f"{self.code}-{prefix}{_UNPRINTABLE.sub('?', text[0])}\r\n".encode("utf-8", "replace") + tail

    def with_text(self, *lines: str) -> Reply:
        return Reply(self.code, tuple(lines), self.enhanced, self.close)


def _lines(code: int, prefix: str, text: tuple[str, ...]) -> bytes:
    """The lines of a reply that come after its first: ``code-``, and ``code `` on the last."""
    last = len(text) - 1
    return "".join(f"{code}{' ' if i == last else '-'}{prefix}{_UNPRINTABLE.sub('?', line)}\r\n"
                   for i, line in enumerate(text)).encode("utf-8", "replace")


#: (code, enhanced prefix, the lines after the first) -> their bytes; cleared when it grows past _TAILS_KEPT.
_TAILS: dict[tuple[int, str, tuple[str, ...]], bytes] = {}
_TAILS_KEPT = 256


def reply(code: int, enhanced: str | None, *text: str, close: bool = False) -> Reply:
    return Reply(code, tuple(text) or ("",), enhanced, close)


# Replies the core gives on its own, outside any hook.
class Canned:
    """The core's own replies (not decided by plugins). Text for humans, codes for RFCs.

    ``Final``: class constants, not instance attributes (the compiled build needs it said).
    """

    COMMAND_TOO_LONG: Final = reply(500, "5.5.2", "Line too long")  # RFC 5321 4.5.3.1.4
    TEXT_LINE_TOO_LONG: Final = reply(500, "5.5.2", "Message line too long")  # 4.5.3.1.6
    BARE_LINE_ENDING: Final = reply(
        550, "5.6.0",
        "Message refused: bare LF or CR line ending; SMTP uses CRLF (RFC 5321 2.3.8)",
    )
    NUL_IN_TEXT: Final = reply(550, "5.6.0", "Message refused: NUL character in message text (RFC 5322 4.1)")
    BARE_LF_IN_COMMAND: Final = reply(500, "5.5.2", "Command lines must end with CRLF")
    NOT_UTF8: Final = reply(500, "5.5.2", "Syntax error: command is not valid UTF-8")
    UNRECOGNIZED: Final = reply(500, "5.5.1", "Unrecognized command")
    SYNTAX: Final = reply(501, "5.5.4", "Syntax error in parameters or arguments")
    HELO_NEEDS_DOMAIN: Final = reply(501, "5.5.4", "HELO/EHLO requires a domain or address")
    SAY_HELLO_FIRST: Final = reply(503, "5.5.1", "please say hello first ...")
    NESTED_MAIL: Final = reply(503, "5.5.1", "Nested MAIL command")
    MAIL_FIRST: Final = reply(503, "5.5.1", "MAIL first")
    RCPT_FIRST: Final = reply(503, "5.5.1", "RCPT first")
    NO_VALID_RECIPIENTS: Final = reply(554, "5.5.1", "No valid recipients")  # RFC 2920 3.1
    BAD_SENDER: Final = reply(501, "5.1.7", "could not parse your mail from command")
    BAD_RECIPIENT: Final = reply(501, "5.1.3", "could not parse recipient")
    UNKNOWN_PARAMETER: Final = reply(555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized or not implemented")
    NEEDS_SMTPUTF8: Final = reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")  # RFC 6531 3.4
    BAD_BODY: Final = reply(501, "5.5.4", "BODY must be 7BIT, 8BITMIME or BINARYMIME")
    # RFC 3030: a BDAT whose size we cannot read leaves the stream out of step: 501, then close.
    BAD_BDAT: Final = reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]")
    BDAT_LOST: Final = reply(421, "4.5.0", "Cannot tell where that BDAT chunk ends; closing connection", close=True)
    DATA_AFTER_BDAT: Final = reply(503, "5.5.1", "DATA not allowed after BDAT")  # RFC 3030 2
    BINARYMIME_NEEDS_BDAT: Final = reply(503, "5.5.1", "BODY=BINARYMIME requires BDAT, not DATA")  # RFC 3030 3
    RCPT_AFTER_BDAT: Final = reply(503, "5.5.1", "RCPT not allowed after BDAT")
    BAD_SIZE: Final = reply(501, "5.5.4", "SIZE must be a number")
    TOO_BIG: Final = reply(552, "5.3.4", "Message size exceeds fixed maximum message size")  # RFC 1870
    HEADER_TOO_BIG: Final = reply(552, "5.3.4", "Message header exceeds fixed maximum size")  # [limits] max_header_size
    TOO_MANY_RECIPIENTS: Final = reply(452, "4.5.3", "Too many recipients")  # RFC 5321 4.5.3.1.10
    TOO_MANY_ERRORS: Final = reply(421, "4.7.0", "Too many errors, closing connection", close=True)
    TOO_MANY_CONNECTIONS: Final = reply(421, "4.3.2", "Too many connections, try again later", close=True)
    TIMEOUT: Final = reply(421, "4.4.2", "Timeout, closing connection", close=True)
    SHUTTING_DOWN: Final = reply(421, "4.3.2", "Service shutting down, try again later", close=True)
    INCOMPLETE_DATA: Final = reply(451, "4.3.0", "Incomplete DATA")
    NO_ARGUMENTS: Final = reply(501, "5.5.4", "No parameters allowed")
    SAY_EHLO_FIRST: Final = reply(503, "5.5.1", "EHLO first")
    NOT_IN_TRANSACTION: Final = reply(503, "5.5.1", "Not inside a mail transaction; RSET first")
    # STARTTLS (RFC 3207) and AUTH (RFC 4954); secrets never appear in these.
    READY_FOR_TLS: Final = reply(220, "2.0.0", "Ready to start TLS")
    TLS_NOT_OFFERED: Final = reply(502, "5.5.1", "STARTTLS not offered here")
    TLS_UNAVAILABLE: Final = reply(454, "4.7.0", "TLS not available due to temporary reason")  # RFC 3207 4
    ALREADY_TLS: Final = reply(503, "5.5.1", "Already in TLS")
    AUTH_NOT_OFFERED: Final = reply(503, "5.5.1", "AUTH not offered here")
    ENCRYPTION_REQUIRED: Final = reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
    UNKNOWN_MECHANISM: Final = reply(504, "5.5.4", "Unrecognized authentication type")
    ALREADY_AUTHENTICATED: Final = reply(503, "5.5.1", "Already authenticated")
    AUTH_CANCELLED: Final = reply(501, "5.7.0", "Authentication cancelled")
    BAD_BASE64: Final = reply(501, "5.5.2", "Cannot decode response (base64)")
    BAD_CREDENTIALS: Final = reply(535, "5.7.8", "Authentication credentials invalid")
    AUTH_REQUIRED: Final = reply(530, "5.7.0", "Authentication required")
    REQUIRETLS_WITHOUT_TLS: Final = reply(530, "5.7.10", "REQUIRETLS needs a TLS session: STARTTLS first")  # RFC 8689
    TOO_MANY_AUTH_FAILURES: Final = reply(421, "4.7.0", "Too many failed authentications, closing connection", close=True)
    SENDER_NOT_YOURS: Final = reply(553, "5.7.1", "Sender address not owned by the authenticated user")
    OK: Final = reply(250, "2.0.0", "OK")
    GO_AHEAD: Final = reply(354, None, "go ahead")


INTERNAL_ERROR = reply(451, "4.3.0", "Internal error, try again later")


class Outcome(enum.Enum):
    """What the session does with a hook's verdict, besides sending the reply."""

    PROCEED = "proceed"  #: the command succeeds (reply None: nothing to send yet)
    REFUSE = "refuse"  #: the command fails; the session goes on
    CLOSE = "close"  #: send the reply, then close the connection
    ANSWERED = "answered"  #: DONE: the plugin answered the client itself


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: Outcome
    reply: Reply | None


@dataclass(frozen=True, slots=True)
class Rule:
    outcome: Outcome
    code: int = 0
    enhanced: str | None = None
    text: str = ""


P, R, C = Outcome.PROCEED, Outcome.REFUSE, Outcome.CLOSE
D = ReturnCode
SILENT = Rule(P)  # go on, nothing to say yet


def _denials(hard: tuple[int, str, str], soft: tuple[int, str, str],
             hard_close: tuple[int, str, str] | None = None) -> dict[ReturnCode, Rule]:
    """The four deny codes of one hook: refuse, or refuse and close (4xx closing is 421)."""
    hard_close = hard_close or hard
    return {
        D.DENY: Rule(R, *hard),
        D.DENYSOFT: Rule(R, *soft),
        D.DENY_DISCONNECT: Rule(C, *hard_close),
        D.DENYSOFT_DISCONNECT: Rule(C, 421, soft[1], soft[2]),
    }


_MESSAGE_DENIED = _denials((554, "5.7.1", "Message denied"),
                           (451, "4.7.1", "Message denied temporarily"))

#: (hook, return code) -> what happens. Hooks missing here are notifications: their
#: verdicts are logged and change nothing. ``{address}`` and ``{me}`` are filled in.
REPLY_TABLE: dict[str, dict[ReturnCode, Rule]] = {
    "pre_connection": {
        D.OK: SILENT, D.DECLINED: SILENT,
        D.DENY: Rule(C, 554, "5.7.1", "Sorry, service not available for you"),
        D.DENY_DISCONNECT: Rule(C, 554, "5.7.1", "Sorry, service not available for you"),
        D.DENYSOFT: Rule(C, 421, "4.7.0", "Sorry, try again later"),
        D.DENYSOFT_DISCONNECT: Rule(C, 421, "4.7.0", "Sorry, try again later"),
    },
    "connect": {
        D.OK: SILENT, D.DECLINED: SILENT,
        # RFC 5321 3.1: a server that refuses at connect answers 554 (or 421) and closes.
        D.DENY: Rule(C, 554, "5.7.1", "Connection from you denied, bye bye."),
        D.DENY_DISCONNECT: Rule(C, 554, "5.7.1", "Connection from you denied, bye bye."),
        D.DENYSOFT: Rule(C, 421, "4.7.0", "Connection from you temporarily denied, bye bye."),
        D.DENYSOFT_DISCONNECT: Rule(C, 421, "4.7.0", "Connection from you temporarily denied, bye bye."),
    },
    "helo": {D.OK: SILENT, D.DECLINED: SILENT, **_denials(
        (550, "5.7.1", "Your HELO was refused"), (450, "4.7.1", "Your HELO was refused, try again later"))},
    "ehlo": {D.OK: SILENT, D.DECLINED: SILENT, **_denials(
        (550, "5.7.1", "Your EHLO was refused"), (450, "4.7.1", "Your EHLO was refused, try again later"))},
    "mail_pre": {D.OK: SILENT, D.DECLINED: SILENT, **_denials(
        (501, "5.1.7", "could not parse your mail from command"),
        (451, "4.1.7", "could not check your mail from command, try again later"),
        (554, "5.1.7", "could not parse your mail from command"))},
    "mail": {
        D.OK: Rule(P, 250, "2.1.0", "{address}, sender OK - how exciting to get mail from you!"),
        D.DECLINED: Rule(P, 250, "2.1.0", "{address}, sender OK - how exciting to get mail from you!"),
        **_denials((550, "5.7.1", "{address}, denied"), (450, "4.7.1", "{address}, temporarily denied")),
    },
    "rcpt_pre": {D.OK: SILENT, D.DECLINED: SILENT, **_denials(
        (501, "5.1.3", "could not parse recipient"),
        (451, "4.1.3", "could not check recipient, try again later"),
        (554, "5.1.3", "could not parse recipient"))},
    "rcpt": {
        D.OK: Rule(P, 250, "2.1.5", "{address}, recipient ok"),
        # Some plugin must say OK: silence from all of them is not consent to relay.
        D.DECLINED: Rule(R, 450, "4.7.1", "No plugin decided if relaying is allowed"),
        **_denials((550, "5.7.1", "relaying denied"), (450, "4.7.1", "relaying denied"),
                   (550, "5.7.1", "delivery denied")),
    },
    "data": {
        D.OK: Rule(P, 354, None, "go ahead"),
        D.DECLINED: Rule(P, 354, None, "go ahead"),
        **_MESSAGE_DENIED,
    },
    "data_headers_end": {D.OK: SILENT, D.DECLINED: SILENT, **_MESSAGE_DENIED},
    "data_post": {D.OK: SILENT, D.DECLINED: SILENT, **_MESSAGE_DENIED},
    "queue_pre": {D.OK: SILENT, D.DECLINED: SILENT, **_MESSAGE_DENIED},
    "queue": {
        D.OK: Rule(P, 250, "2.0.0", "Queued"),
        D.DECLINED: Rule(R, 451, "4.3.0", "Queuing declined or disabled; try again later"),
        **_denials((554, "5.0.0", "Message denied"), (451, "4.3.0", "Message denied temporarily")),
    },
    "vrfy": {
        D.OK: Rule(P, 250, "2.1.5", "User OK"),
        # RFC 5321 3.5.3, 7.3: neither verified nor refused; X.5.0, not X.5.2 (a syntax error, RFC 3463).
        D.DECLINED: Rule(P, 252, "2.5.0", "Just try sending a mail and we'll see how it turns out ..."),
        **_denials((550, "5.7.1", "Access Denied"), (450, "4.7.1", "Access Denied, try again later")),
    },
    "expn": {
        D.OK: Rule(P, 250, "2.1.5", "OK"),
        # Nobody keeps lists here: not implemented (RFC 5321 4.5.1 makes EXPN optional).
        D.DECLINED: Rule(R, 502, "5.5.1", "EXPN not supported"),
        **_denials((550, "5.1.1", "No such list"), (450, "4.7.1", "Cannot expand the list now, try again later")),
    },
    "noop": {
        D.OK: Rule(P, 250, "2.0.0", "OK"), D.DECLINED: Rule(P, 250, "2.0.0", "OK"),
        **_denials((500, "5.5.1", "Stop wasting my time."), (450, "4.7.0", "Stop wasting my time.")),
    },
    "help": {
        D.OK: Rule(P, 214, "2.0.0", "qpgevent"),
        # No plugin answered: the core does, from its per-verb table (core/help.py).
        D.DECLINED: SILENT,
        **_denials((502, "5.5.1", "HELP not available"), (450, "4.7.0", "HELP not available now")),
    },
    "quit": {
        # QUIT always ends the session (RFC 5321 4.1.1.10); a plugin can only change the words.
        code: Rule(C, 221, "2.0.0", "{me} closing connection. Have a wonderful day.")
        for code in (D.OK, D.DECLINED, D.DENY, D.DENYSOFT, D.DENY_DISCONNECT, D.DENYSOFT_DISCONNECT)
    },
    "command": {
        D.OK: Rule(P, 250, "2.0.0", "OK"),
        # Declared, but the plugin that owns the verb did not answer: not implemented.
        D.DECLINED: Rule(R, 502, "5.5.1", "Command not implemented"),
        **_denials((550, "5.7.1", "Command refused"), (450, "4.7.0", "Command refused, try again later")),
    },
    # At the end of DATA, where data_post runs: a refusal refuses the message.
    "received_line": {D.OK: SILENT, D.DECLINED: SILENT, **_MESSAGE_DENIED},
    "unrecognized_command": {
        D.OK: Rule(R, 500, "5.5.1", "Unrecognized command"),
        D.DECLINED: Rule(R, 500, "5.5.1", "Unrecognized command"),
        **_denials((500, "5.5.1", "Unrecognized command"), (450, "4.7.0", "Unrecognized command"),
                   (521, "5.5.1", "Unrecognized command")),
    },
}

# RFC 4954 6: 235 success, 535 bad credentials, 454 temporary failure. The mechanism's
# own hook (auth_plain...) runs first; the generic ``auth`` hook only if it declined.
_AUTH_RULES = {
    D.OK: Rule(P, 235, "2.7.0", "Authentication successful"),
    D.DECLINED: Rule(R, 535, "5.7.8", "Authentication credentials invalid"),
    **_denials((535, "5.7.8", "Authentication credentials invalid"),
               (454, "4.7.0", "Temporary authentication failure")),
}
for _hook in ("auth", "auth_plain", "auth_login", "auth_cram_md5", "auth_sasl"):
    REPLY_TABLE[_hook] = _AUTH_RULES
# The *_parse hooks (qpsmtpd's): a refusal is a syntax error (501), as a parser's would be.
_PARSE_RULES = {D.OK: SILENT, D.DECLINED: SILENT, **_denials(
    (501, "5.5.4", "Syntax error in command"), (451, "4.5.4", "could not parse the command, try again later"))}
for _hook in ("helo_parse", "ehlo_parse", "mail_parse", "rcpt_parse", "auth_parse"):
    REPLY_TABLE[_hook] = _PARSE_RULES

#: Hooks whose DONE means "the plugin answered"; everywhere else DONE is a plain pass.
_ANSWERING_HOOKS = frozenset(REPLY_TABLE)
#: At these hooks the session cannot go on after an internal error: it closes with 421.
_CLOSE_ON_ERROR = frozenset({"pre_connection", "connect"})


#: The answers without a reply, made once: most hooks, most of the time, say nothing.
_NOTHING_TO_SAY = {outcome: Answer(outcome, None) for outcome in Outcome}


class _Fields(dict[str, str]):
    """Template fields; a field the caller did not give shows as itself, never a KeyError."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def answer(hook: str, verdict: Verdict, **fields: str) -> Answer:
    """Turn the verdict of a hook into what the session does and says.

    A plugin's message replaces the default text (one line per element). A message that
    starts with a reply code of the verdict's class ("452 ...") replaces the code, and
    one that starts with an enhanced status code ("5.1.1 no such user") replaces the
    default enhanced code, its class made to match the reply's.
    """
    if not verdict.message and not verdict.internal_error:
        # The plugin said nothing (most verdicts): the cell's answer, made once when it has no
        # fields to fill in.
        made = _DEFAULT_ANSWERS.get(hook, _NO_RULES).get(verdict.code, _GO_ON)
        if isinstance(made, Answer):
            return made
        return Answer(made.outcome, Reply(made.code, (made.text.format_map(_Fields(fields)),), made.enhanced,
                                          made.outcome is C))
    if verdict.internal_error:
        if hook == "quit":
            verdict = Verdict(ReturnCode.DECLINED)
        elif hook in _CLOSE_ON_ERROR:
            return Answer(C, Reply(421, INTERNAL_ERROR.text, "4.3.0", close=True))
        else:
            return Answer(R, INTERNAL_ERROR)
    if verdict.code is ReturnCode.DONE and hook in _ANSWERING_HOOKS:
        return _NOTHING_TO_SAY[Outcome.ANSWERED]
    rules = REPLY_TABLE.get(hook)
    if rules is None:
        return _NOTHING_TO_SAY[P]
    rule = rules.get(verdict.code, SILENT)
    if rule.code == 0:
        return _NOTHING_TO_SAY[rule.outcome]
    code, enhanced = rule.code, rule.enhanced
    lines = [line for text in verdict.message for line in text.split("\n")]
    lines = [line.rstrip("\r") for line in lines]
    if lines:
        match = _CODE.match(lines[0])
        if match and rule.code // 100 in (4, 5) and int(match.group(1)) // 100 in (4, 5):
            if _may_use_code(int(match.group(1)), rule):
                code = int(match.group(1))
            lines[0] = lines[0][match.end():]  # of the other class: the verdict's code stands
        match = _ENHANCED.match(lines[0])
        reply_class = str(code)[0]
        if match and enhanced and (match.group(1) == reply_class or
                                   {match.group(1), reply_class} <= {"4", "5"}):
            # The class follows the reply: a check written with "5.7.1" that is set to
            # reject_type = temp answers 4.7.1 (RFC 3463 2: the class must agree).
            enhanced = ".".join((str(code)[0], match.group(2), match.group(3)))
            lines[0] = lines[0][match.end():]
    else:
        lines = [rule.text.format_map(_Fields(fields))]
    return Answer(rule.outcome, Reply(code, tuple(lines), enhanced, rule.outcome is C))


def _default_answer(hook: str, code: ReturnCode) -> Answer | Rule:
    """What ``answer`` gives a verdict without a message: an Answer, or the Rule whose fields need filling."""
    if code is ReturnCode.DONE and hook in _ANSWERING_HOOKS:
        return _NOTHING_TO_SAY[Outcome.ANSWERED]
    rule = REPLY_TABLE[hook].get(code, SILENT)
    if rule.code == 0:
        return _NOTHING_TO_SAY[rule.outcome]
    if "{" in rule.text:
        return rule
    return Answer(rule.outcome, Reply(rule.code, (rule.text,), rule.enhanced, rule.outcome is C))


_DEFAULT_ANSWERS = {hook: {code: _default_answer(hook, code) for code in ReturnCode} for hook in REPLY_TABLE}
_NO_RULES: dict[ReturnCode, Answer] = {}
_GO_ON = _NOTHING_TO_SAY[P]


def settled_answer(hook: str, code: ReturnCode) -> Answer | None:
    """``answer(hook, Verdict(code))`` when it is the same whatever the fields (made once), else None."""
    made = _DEFAULT_ANSWERS.get(hook, _NO_RULES).get(code, _GO_ON)
    return made if isinstance(made, Answer) else None


def _may_use_code(code: int, rule: Rule) -> bool:
    """A plugin may pick its own failure code within the class the verdict fixed.

    ``(DENYSOFT, "452 4.5.3 Too many recipients")`` at RCPT answers 452, not 450. The
    class (4xx or 5xx) is never changed, and 421 only where the verdict closes anyway,
    since RFC 5321 3.8 makes 421 mean "closing".
    """
    if rule.code // 100 not in (4, 5) or code // 100 != rule.code // 100:
        return False
    return code != 421 or rule.outcome is C
