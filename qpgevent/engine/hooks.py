"""The hook table, and the ONE place hooks run.

Rules:
1. ``HOOKS`` is the list of valid hooks, as data: the loader checks every ``hook_*``
   method against it when the plugin loads (pluggy's lesson), and the docs are made
   from it.
2. ``HookRunner.run`` is the only code that calls plugins. It runs a hook's plugins in
   config order, each under its own timeout (a timer the server hands in: the engine
   imports no gevent); the first verdict that is not DECLINED
   wins. A plugin that raises, times out or returns nonsense is logged with its name
   and gives an ``internal_error`` verdict (451 4.3.0), never a silent pass.
3. Notification hooks (``deny``, ``ok``, ``disconnect``...) run every plugin; their
   results and failures are logged and change nothing.
4. ``observers`` are told of every plugin call, before and after (metrics, the live
   scoreboard); the runner stays ignorant of what they do with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..core.codes import DECLINED_VERDICT, ReturnCode, Verdict
from .extensions import Extensions

if TYPE_CHECKING:
    from ..plugin import Plugin

log = logging.getLogger("qpgevent.hooks")


@dataclass(frozen=True, slots=True)
class HookSpec:
    name: str
    args: tuple[str, ...]  #: arguments after ``session``
    notify: bool = False  #: results are ignored; every plugin runs
    session: bool = True  #: the hook gets the session as its first argument
    doc: str = ""
    fired: bool = True  #: False: reserved for a later feature, accepted but never called

    def signature(self) -> str:
        """``hook_<name>(self, session: Session, ...) -> HookResult``, as the docs show it."""
        arguments = ["self", *(f"{name}: {ARGUMENT_TYPES[name]}" for name in self.parameters())]
        return f"hook_{self.name}({', '.join(arguments)}) -> HookResult"

    def parameters(self) -> list[str]:
        return (["session"] if self.session else []) + list(self.args)


def _spec(name: str, *args: str, notify: bool = False, session: bool = True,
          fired: bool = True, doc: str = "") -> HookSpec:
    return HookSpec(name, args, notify, session, doc, fired)


#: The type of every hook argument, by its name (the docs show them; no Any).
ARGUMENT_TYPES = {
    "session": "Session", "host": "str", "path": "str", "params": "dict[str, str | None]",
    "sender": "Address", "recipient": "Address", "argument": "str", "verb": "str", "verdict": "Verdict",
    "mechanism": "str", "user": "str", "password": "str", "ticket": "str | None", "response": "bytes",
    "line": "str",
}
_AUTH_DOC = ("AUTH (RFC 4954). The back ends are asked in config order, auth_<mechanism>'s first, then "
             "(PLAIN, LOGIN) the generic auth's: one that does not know the user returns DECLINED and the "
             "next is asked; the first other answer is final: OK accepts (235, relay client), DENY refuses "
             "(535: it knows the user, the password is wrong), DENYSOFT could not check (454). "
             "CRAM-MD5: password is the client's hex digest and ticket the challenge; else ticket is None")
_PARSE_DOC = ("{verb}, after the sequence checks and before its argument is parsed: (OK, text) replaces the "
              "argument the core parses (qpsmtpd's {verb_lower}_parse, as text, not a code ref); DENY refuses "
              "the command (501)")

#: Every hook, roughly in the order it fires in a session.
HOOKS: dict[str, HookSpec] = {spec.name: spec for spec in (
    _spec("post_fork", session=False, notify=True,
          doc="in each worker process after it is forked, before it serves: open pools here"),
    _spec("pre_connection", doc="a client connected; nothing has been said yet"),
    _spec("connect", doc="before the 220 greeting"),
    _spec("helo_parse", "argument", doc=_PARSE_DOC.format(verb="HELO", verb_lower="helo")),
    _spec("ehlo_parse", "argument", doc=_PARSE_DOC.format(verb="EHLO", verb_lower="ehlo")),
    _spec("helo", "host", doc="HELO, before it is accepted"),
    _spec("ehlo", "host", doc="EHLO, before it is accepted"),
    _spec("mail_parse", "argument", doc=_PARSE_DOC.format(verb="MAIL", verb_lower="mail")),
    _spec("mail_pre", "path", "params",
          doc="MAIL: the raw path; session.rewrite_sender(path) replaces it (the old (OK, path) still does, "
              "with a deprecation warning)"),
    _spec("mail", "sender", "params", doc="MAIL: the parsed sender Address"),
    _spec("rcpt_parse", "argument", doc=_PARSE_DOC.format(verb="RCPT", verb_lower="rcpt")),
    _spec("rcpt_pre", "path", "params",
          doc="RCPT: the raw path; session.rewrite_recipient(path) replaces it (the old (OK, path) still "
              "does, with a deprecation warning)"),
    _spec("rcpt", "recipient", "params", doc="RCPT: some plugin must return OK to accept"),
    _spec("data", doc="DATA, after the sequence checks and before 354"),
    _spec("data_headers_end", doc="the message header has been received"),
    _spec("received_line", "line",
          doc="the message is in; line is our Received header's value: (OK, text) writes text instead "
              "(one header either way); a refusal refuses the message"),
    _spec("data_post", doc="the whole message has been received, our Received added"),
    _spec("queue_pre", doc="just before queueing"),
    _spec("queue", doc="hand the message off; OK only once it is safe"),
    _spec("queue_post", notify=True, doc="after queueing, whatever the result"),
    _spec("reset_transaction", notify=True, doc="a transaction ends (RSET, MAIL done, EHLO...)"),
    _spec("rset", notify=True, doc="RSET, before the transaction is reset (RFC 5321 4.1.1.5: always 250)"),
    _spec("vrfy", "argument", doc="VRFY <argument>: OK (250) only for a mailbox the plugin verified, DENY (550) "
          "for one it knows is not there (RFC 5321 3.5.3); DECLINED is 252, neither"),
    _spec("expn", "argument", doc="EXPN <argument>: (OK, [members...]) answers 250, one member a line "
          "(RFC 5321 3.5.2); DECLINED by all: 502, the core has no lists"),
    _spec("noop", "argument"),
    _spec("help", "argument", doc="HELP [verb]: a plugin may answer first; DECLINED by all: the core answers, "
          "214 with the verbs this session supports, or the verb's line (help_texts), 504 for a verb it does not know"),
    _spec("unrecognized_command", "verb", "argument",
          doc="a verb neither the core nor a plugin's verbs know; DONE if the plugin handled it"),
    _spec("command", "verb", "argument",
          doc="a verb a plugin declared (verbs = (\"ETRN\",)): the plugin that owns the verb answers; "
              "the others return DECLINED"),
    _spec("quit", doc="QUIT; the plugin may change the goodbye text"),
    _spec("disconnect", notify=True, doc="the session ends (QUIT, EOF, timeout, refusal)"),
    _spec("post_connection", notify=True, doc="after the socket is closed"),
    _spec("deny", "verdict", notify=True, doc="a plugin denied something"),
    _spec("ok", "verdict", notify=True, doc="a plugin accepted something"),
    _spec("auth_parse", "argument", doc=_PARSE_DOC.format(verb="AUTH", verb_lower="auth") +
          "; the argument holds the initial response: never log it"),
    _spec("auth", "mechanism", "user", "password", "ticket", doc=_AUTH_DOC),
    _spec("auth_plain", "mechanism", "user", "password", "ticket", doc=_AUTH_DOC),
    _spec("auth_login", "mechanism", "user", "password", "ticket", doc=_AUTH_DOC),
    _spec("auth_cram_md5", "mechanism", "user", "password", "ticket", doc=_AUTH_DOC),
    _spec("auth_sasl", "mechanism", "response",
          doc="AUTH with a mechanism a plugin declared (sasl_mechanisms = (\"X-TOKEN\",)): response is the "
              "client's decoded response (its initial one, or its answer to an empty 334; None when the "
              "plugin set sasl_first_challenge = True and the client sent no initial response); return "
              "(OK, user) to accept it as user (235, the reply's words are ours), DENY to refuse (535), "
              "DECLINED to let the next plugin that declared it answer, or session.challenge(data) to "
              "send a 334 and be asked again, alone, with the answer (session.auth_step counts the steps)"),
)}


class Timer(Protocol):
    """One plugin call's time limit: raises itself in the caller once started and expired.
    ``close`` ends the call's use of it (the server keeps it for a later call)."""

    def start(self) -> None: ...

    def close(self) -> None: ...


class _NoTimer:
    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


_NO_TIMER = _NoTimer()


class HookObserver(Protocol):
    """Told of every plugin call. Called in the session's greenlet: be quick, never raise."""

    def hook_started(self, hook: str, plugin: str, session: Any) -> None: ...

    def hook_finished(self, hook: str, plugin: str, session: Any, verdict: Verdict, seconds: float) -> None: ...


class HookRunner:
    """Runs hooks over an ordered list of loaded plugins."""

    def __init__(self, plugins: list[Plugin], default_timeout: float = 30.0,
                 timeout: Callable[[float], Timer] | None = None) -> None:
        self.plugins = plugins
        self.default_timeout = default_timeout
        #: Makes the timer of one plugin call (the server's: a ``gevent.Timeout`` raised in the
        #: caller's greenlet when the time is up, server/timers.py). None: no time limit.
        self._timeout = timeout
        self.observers: list[HookObserver] = []
        #: What the plugins add to the dialogue (EHLO keywords, parameters, verbs, SASL mechanisms).
        self.extensions = Extensions.declared_by(plugins)
        self._chains: dict[str, list[tuple[Plugin, Callable[..., Any]]]] = {name: [] for name in HOOKS}
        for plugin in plugins:
            for name in plugin.implemented_hooks():
                self._chains[name].append((plugin, getattr(plugin, "hook_" + name)))

    def has(self, hook: str) -> bool:
        return bool(self._chains[hook])

    def observe(self, observer: HookObserver) -> None:
        """Add ``observer`` (once: adding it again changes nothing)."""
        if observer not in self.observers:
            self.observers.append(observer)

    def order(self) -> dict[str, list[str]]:
        """Hook -> plugin labels, in the order they run (for --check-config)."""
        return {hook: [p.name for p, _ in chain] for hook, chain in self._chains.items() if chain}

    def run(self, hook: str, session: Any, *args: Any, only: str | None = None) -> Verdict:
        """The first verdict that is not DECLINED; ``only``: ask that plugin alone (the one
        in the middle of a SASL exchange)."""
        chain = self._chains[hook]
        if not chain:  # most hooks of most sessions: no plugin implements them
            return DECLINED_VERDICT
        spec = HOOKS[hook]
        logger = getattr(session, "log", log)
        if spec.notify:
            self.notify(hook, session, *args)
            return DECLINED_VERDICT
        for plugin, method in chain:
            if only is not None and plugin.name != only:
                continue
            verdict = self._call(plugin, method, hook, session, args, logger)
            if verdict.code is ReturnCode.DECLINED and not verdict.internal_error:
                continue
            if logger.isEnabledFor(logging.INFO):
                logger.info("hook=%s plugin=%s code=%s%s msg=%r", hook, plugin.name,
                            verdict.code.name, " (internal error)" if verdict.internal_error else "",
                            " / ".join(verdict.message))
            if hook not in ("deny", "ok"):
                if verdict.code.is_deny or verdict.internal_error:
                    self.notify("deny", session, verdict)
                elif verdict.code is ReturnCode.OK:
                    self.notify("ok", session, verdict)
            return verdict
        return DECLINED_VERDICT

    def notify(self, hook: str, session: Any, *args: Any) -> None:
        """Run every plugin of a notification hook; failures are logged, never raised."""
        chain = self._chains[hook]
        if not chain:
            return
        logger = getattr(session, "log", log)
        for plugin, method in chain:
            self._call(plugin, method, hook, session, args, logger)

    def _call(self, plugin: Plugin, method: Callable[..., Any], hook: str, session: Any,
              args: tuple[Any, ...], logger: Any) -> Verdict:
        if not self.observers:
            return self._invoke(plugin, method, hook, session, args, logger)
        for observer in self.observers:
            observer.hook_started(hook, plugin.name, session)
        started = time.monotonic()
        verdict = self._invoke(plugin, method, hook, session, args, logger)
        seconds = time.monotonic() - started
        for observer in self.observers:
            observer.hook_finished(hook, plugin.name, session, verdict, seconds)
        return verdict

    def _invoke(self, plugin: Plugin, method: Callable[..., Any], hook: str, session: Any,
                args: tuple[Any, ...], logger: Any) -> Verdict:
        seconds = plugin.timeout or self.default_timeout
        call_args = (session, *args) if HOOKS[hook].session else args
        timer = self._timeout(seconds) if self._timeout is not None else _NO_TIMER
        timer.start()
        try:
            result = method(*call_args)
        except BaseException as error:
            if error is timer:  # type: ignore[comparison-overlap]  # gevent's timer is the exception
                logger.error("hook=%s plugin=%s timed out after %ss", hook, plugin.name, seconds)
                return Verdict(ReturnCode.DENYSOFT, ("plugin timeout",), plugin.name, True)
            if not isinstance(error, Exception):
                raise  # GreenletExit, KeyboardInterrupt, another's timeout: not the plugin's failure
            # a plugin bug must not take the session down, nor pass mail
            logger.exception("hook=%s plugin=%s raised", hook, plugin.name)
            return Verdict(ReturnCode.DENYSOFT, ("plugin error",), plugin.name, True)
        finally:
            timer.close()
        try:
            return to_verdict(result, plugin.name)
        except TypeError as error:
            logger.error("hook=%s plugin=%s %s", hook, plugin.name, error)
            return Verdict(ReturnCode.DENYSOFT, ("bad plugin result",), plugin.name, True)


def to_verdict(result: Any, plugin: str | None = None) -> Verdict:
    """``None`` / a code / ``(code, message)`` / ``(code, [lines])`` -> Verdict."""
    if result is None:
        return Verdict(ReturnCode.DECLINED, (), plugin)
    if isinstance(result, ReturnCode):
        return Verdict(result, (), plugin)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], ReturnCode):
        code, message = result
        if message is None:
            return Verdict(code, (), plugin)
        if isinstance(message, str):
            return Verdict(code, (message,), plugin)
        if isinstance(message, (list, tuple)) and all(isinstance(m, str) for m in message):
            return Verdict(code, tuple(message), plugin)
    raise TypeError(f"returned {result!r}; expected None, a return code, or (code, message)")
