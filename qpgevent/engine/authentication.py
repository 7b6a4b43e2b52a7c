"""The AUTH command's part of the conversation (RFC 4954): offer, exchange, ask the back ends.

Which mechanisms are offered (only inside TLS unless the listener or the config allows
plaintext), the failure limits (per address and user, from the server's store), the
exchange in progress (``qpgevent.engine.sasl``), asking the back ends through the
conversation's one hook path, and the replies: 235, 535 (each failure answered a little
later than the last), 454 when a back end could not check, 421 past the limit.

The back ends are asked in config order, ``auth_<mechanism>``'s plugins first, then (for
PLAIN and LOGIN) the generic ``auth`` ones: a back end that does not know the user
returns DECLINED and the next is asked; the first other answer is final (OK 235, DENY
535, DENYSOFT 454), as docs/hooks.md says.

A plugin's mechanism (``sasl_mechanisms``) is decided by ``auth_sasl``, which may also
challenge (``session.challenge``): the 334 goes out and the client's answer goes to that
plugin alone, until it says OK, DENY or DECLINED (535: nobody else can take over an
exchange half done). Failures count and wait as for the built-in mechanisms; ``*``
cancels (501, the protocol core). A plugin may declare CRAM-MD5 (the one built-in whose
challenge the server makes, so a back end such as Dovecot must make it): its exchange
then replaces the built-in one.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

from ..core.codes import ReturnCode, Verdict
from ..core.reply import Canned, Outcome, Reply, reply
from . import sasl
from .dialogue import Dialogue
from .session import Session



class Authentication:
    """The AUTH command in one conversation: the exchange in progress, its end."""

    __slots__ = ("exchange",)  # one per session, idle ones too

    def __init__(self) -> None:
        self.exchange: sasl.Exchange | None = None

    def mechanisms(self, conversation: Dialogue) -> tuple[str, ...]:
        """Offered now: only over TLS, unless the listener or the config allows plaintext."""
        if not (conversation.session.connection.tls or conversation.listen.plain_auth
                or not conversation.settings.tls_before_auth):
            return ()
        return self.available(conversation)

    def available(self, conversation: Dialogue) -> tuple[str, ...]:
        runner = conversation.runner
        plugins = runner.extensions.sasl_mechanisms
        return tuple(m for m in sasl.mechanisms(runner.has) if m not in plugins) + plugins

    def begin(self, conversation: Dialogue, mechanism: str, initial: bytes | None) -> None:
        """``AUTH mechanism [initial]``."""
        offered = self.mechanisms(conversation)
        if not offered:
            needs_tls = self.available(conversation) and not conversation.session.connection.tls
            conversation.send(Canned.ENCRYPTION_REQUIRED if needs_tls else Canned.AUTH_NOT_OFFERED)
        elif mechanism not in offered:
            conversation.send(Canned.UNKNOWN_MECHANISM)
        elif conversation.surroundings.limits.blocked(conversation.session.connection.remote_ip):
            conversation.log.warning("AUTH refused: too many failures from %s",
                                     conversation.session.connection.remote_ip)
            conversation.send(Canned.TOO_MANY_AUTH_FAILURES)
        elif mechanism in conversation.runner.extensions.sasl_mechanisms:
            exchange = self.exchange = sasl.PluginExchange(mechanism, conversation.settings.me)
            if initial is None and mechanism in conversation.runner.extensions.sasl_first_challenge:
                self.ask_plugin(conversation, exchange, None)  # the plugin (its server) speaks first
            else:
                self._go_on(conversation, lambda exchange: exchange.start(initial))
        elif mechanism == "CRAM-MD5" and initial is not None:
            conversation.send(Canned.SYNTAX)
        else:
            self.exchange = sasl.EXCHANGES.get(mechanism, sasl.Exchange)(mechanism, conversation.settings.me)
            self._go_on(conversation, lambda exchange: exchange.start(initial))

    def respond(self, conversation: Dialogue, data: bytes) -> None:
        """One line answering our 334."""
        if self.exchange is None:  # cannot happen: the protocol reads these only after our 334
            conversation.send(Canned.AUTH_CANCELLED)
            return
        self._go_on(conversation, lambda exchange: exchange.step(data))

    def _go_on(self, conversation: Dialogue,
               step: Callable[[sasl.Exchange], sasl.Challenge | sasl.Credentials]) -> None:
        exchange = self.exchange
        assert exchange is not None
        try:
            result = step(exchange)
        except sasl.BadResponse as error:
            conversation.log.info("AUTH %s: %s", exchange.mechanism, error)
            self.failed(conversation, exchange.mechanism, exchange.user, Canned.BAD_CREDENTIALS)
            return
        if isinstance(result, sasl.Challenge):
            conversation.send(reply(334, None, result.text))
        elif isinstance(exchange, sasl.PluginExchange):
            self.ask_plugin(conversation, exchange, result.response)
        else:
            self.check(conversation, result)

    def ask_plugin(self, conversation: Dialogue, exchange: sasl.PluginExchange, response: bytes | None) -> None:
        """A plugin's mechanism: its ``auth_sasl`` decides, or challenges (334) and is asked
        again, alone, with the client's answer; past ``sasl.MAX_STEPS`` challenges, 535."""
        session = conversation.session
        session.auth_step, session.auth_challenge = exchange.steps, None
        verdict = conversation.decide("auth_sasl", exchange.mechanism, response, only=exchange.owner)
        challenge = _take_challenge(session)
        if verdict.code is ReturnCode.DONE and challenge is not None and not verdict.internal_error:
            if exchange.steps < sasl.MAX_STEPS:
                exchange.steps, exchange.owner = exchange.steps + 1, verdict.plugin
                conversation.send(reply(334, None, base64.b64encode(challenge).decode()))
                return
            conversation.log.info("AUTH %s: more than %d challenges", exchange.mechanism, sasl.MAX_STEPS)
            self.failed(conversation, exchange.mechanism, None, Canned.BAD_CREDENTIALS)
            return
        user = None
        if verdict.code is ReturnCode.OK and not verdict.internal_error:
            user = verdict.message[0].strip() if verdict.message else ""
            verdict = Verdict(ReturnCode.OK, (), verdict.plugin) if user else Verdict(
                ReturnCode.DENYSOFT, ("auth_sasl: OK without a user name",), verdict.plugin, True)
        self.exchange = None
        self.conclude(conversation, exchange.mechanism, user, verdict)

    def check(self, conversation: Dialogue, credentials: sasl.Credentials) -> None:
        """Ask the back ends: the mechanism's own hook, then (if all declined) the generic ``auth``."""
        mechanism, user = credentials.mechanism, credentials.user
        ip = conversation.session.connection.remote_ip
        if user is not None and conversation.surroundings.limits.blocked(ip, user):
            self.failed(conversation, mechanism, user, Canned.BAD_CREDENTIALS, counted=False)
            return
        args = (mechanism, user, credentials.password, credentials.ticket)
        verdict = conversation.decide(sasl.MECHANISM_HOOKS[mechanism], *args)
        declined = verdict.code is ReturnCode.DECLINED and not verdict.internal_error
        if declined and mechanism in sasl.GENERIC_MECHANISMS:
            verdict = conversation.decide("auth", *args)
        self.exchange = None
        self.conclude(conversation, mechanism, user, verdict)

    def conclude(self, conversation: Dialogue, mechanism: str, user: str | None, verdict: Verdict) -> None:
        result = conversation.answer("auth", verdict)
        if result.outcome is Outcome.PROCEED and user:
            notes = conversation.session.connection.notes
            notes["auth_user"], notes["auth_method"] = user, mechanism
            conversation.session.connection.relay_client = True
            conversation.log.info("AUTH %s: authenticated user=%s (plugin %s)", mechanism, user, verdict.plugin)
            assert result.reply is not None
            conversation.send(result.reply)
        elif result.outcome is Outcome.ANSWERED:
            pass
        elif result.reply is not None and result.reply.code // 100 == 4 and not result.reply.close:
            conversation.send(result.reply)  # the back end could not check (454): not the client's failure
        else:
            self.failed(conversation, mechanism, user, result.reply or Canned.BAD_CREDENTIALS)

    def failed(self, conversation: Dialogue, mechanism: str, user: str | None, refusal: Reply,
               counted: bool = True) -> None:
        """Count the failure, make the client wait longer each time, then 535 (or 421 past the limit)."""
        self.exchange = None
        settings, limits = conversation.settings, conversation.surroundings.limits
        ip = conversation.session.connection.remote_ip
        failures = limits.failed(ip, user) if counted else settings.auth_max_failures_ip + 1
        conversation.log.info("AUTH %s failed for user=%s (%d from %s in the window)", mechanism, user or "-",
                              min(failures, settings.auth_max_failures_ip + 1), ip)
        conversation.wait(min(settings.auth_failure_delay * failures, settings.auth_max_delay))
        if failures > settings.auth_max_failures_ip or limits.blocked(ip, user):
            conversation.log.warning("AUTH: too many failures (address %s, user %s); closing", ip, user or "-")
            conversation.send(Canned.TOO_MANY_AUTH_FAILURES)
        else:
            conversation.send(refusal)


def _take_challenge(session: Session) -> bytes | None:
    """What ``session.challenge`` asked to send while ``auth_sasl`` ran, taken. In a function of
    its own: right after ``ask_plugin`` set it to None, mypy takes it for None still (it does
    not see the plugin's call change it), and the compiled build would enforce that."""
    challenge, session.auth_challenge = session.auth_challenge, None
    return challenge
