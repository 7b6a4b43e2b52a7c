"""Handing messages to a next hop over SMTP or LMTP: the client side of queue plugins.

Owns what ``queue/smtp_forward`` and ``queue/lmtp`` share: ``Relay``, which runs a whole
queue hand-off or an RCPT-time check ("callahead") and turns the replies into one verdict,
and ``RelayPlugin``, their base class. Built from routes (``relay_routes``: which next hop
takes which domain), ``Downstream`` (``smtp_downstream``: one connection, on smtplib, which
gevent makes cooperative: greeting, EHLO/LHLO, STARTTLS, AUTH, XCLIENT/XFORWARD, one
transaction with a reply per recipient, DATA streamed from the spool and dot-stuffed) and
``Pool`` (``relay_pool``: a bounded set of reusable connections per route, per worker);
their names are re-exported here, the plugin API's ``qpgevent.smtp_client``.

Theory of operation. A message is "queued" only when the next hop said 2xx to the end of
its DATA (for LMTP: to every recipient). The client hears about it once, after DATA, so
every outcome has to be folded into one reply:

- all recipients accepted, DATA accepted: 250, with the next hop's words;
- refused before DATA (MAIL, or one RCPT): nothing was sent, so RSET and pass the
  refusal on: 5xx when every recipient was refused for good, else 4xx, because a
  partial 250 would drop the refused recipients silently, and a 5xx would bounce the
  accepted ones. The cure is to find refusals at RCPT time: ``callahead`` asks the next
  hop about each recipient while the client is still at RCPT, so a refused recipient is
  refused to the client, individually, and the rest go through;
- LMTP's one reply per recipient after DATA (RFC 2033 4.2): all 2xx is 250; none is a
  refusal as above; a mix means some mailboxes have the message already, and SMTP has
  no way to say so after DATA. We answer 4xx (a retry duplicates it for the accepted
  recipients, where 250 would lose it for the others: RFC 5321 6.1 prefers a duplicate
  to a loss) and log which recipients have it;
- the connection broke, or timed out, before the final reply: 4xx. If it broke after
  the final dot, the next hop may have the message (RFC 1047's race), again a duplicate
  rather than a loss.

One transaction goes to one route: ``Relay.check_route`` refuses (4xx) a recipient whose
route differs from the ones already accepted, so the client sends it in a transaction of
its own, and no message is ever half delivered across two next hops.
"""

from __future__ import annotations

import logging
import re
from contextlib import ExitStack
from typing import Any

from ..core.address import Address
from ..plugin import DECLINED, DENY, DENYSOFT, OK, Plugin
from .relay_pool import Pool
from .relay_routes import ConfigurationError, Hop, Route, parse_routes, route_for
from .smtp_downstream import (ClientFacts, ClientOptions, Downstream, DownstreamError, Response, dot_stuffed,
                              xtext)

log = logging.getLogger("qpgevent.smtp_client")

#: The options both plugins take, as configspec lines (defaults suit a smarthost).
CONFIGSPEC = """
routes = force_list(default=list())
callahead = boolean(default=False)
helo = string(default="")
starttls = option("auto", "required", "off", default="auto")
tls_verify = boolean(default=True)
tls_ca_file = path(default="")
auth_user = string(default="")
auth_password = string(default="")
auth_without_tls = boolean(default=False)
forward_client = force_list(default=list("xforward"))
pool_size = integer(min=1, default=10)
pool_wait = float(min=0, default=10)
idle_timeout = float(min=0, default=60)
connect_timeout = float(min=0.01, default=10)
command_timeout = float(min=0.01, default=60)
data_timeout = float(min=0.01, default=600)
"""


# -- a whole hand-off, and its verdict -----------------------------------------------


class Relay:
    """Routes, a pool, and the rules above: what the two plugins call from their hooks."""

    def __init__(self, config: dict[str, Any], lmtp: bool, logger: logging.Logger) -> None:
        self.lmtp = lmtp
        self.routes = parse_routes(config["routes"], 24 if lmtp else 25)
        if not lmtp and any(hop.is_unix for route in self.routes for hop in route.hops):
            raise ConfigurationError("unix socket routes are for LMTP (queue/lmtp)")
        self.options = ClientOptions.from_config(config, lmtp)
        self.pool = Pool(self.options, config["pool_size"], config["pool_wait"], config["idle_timeout"])
        self.callahead = config["callahead"]
        self.log = logger

    def route(self, recipient: Address) -> Route | None:
        # Bare <postmaster> and address literals have no domain to route by: they take "*".
        domain = recipient.host if recipient.host and not recipient.host.startswith("[") else "*"
        return route_for(self.routes, domain)

    # RCPT time ----------------------------------------------------------------
    def check_recipient(self, session: Any, recipient: Address) -> Any:
        """hook_rcpt: one route per transaction; with callahead, ask the next hop now."""
        self.options.helo = self.options.helo or session.me
        route = self.route(recipient)
        if route is None:
            return DENY, f"5.4.4 no route for {recipient.host or recipient.address}"
        transaction = session.transaction
        taken = {self.route(r) for r in transaction.recipients}
        if taken and route not in taken:
            return DENYSOFT, ("4.5.3 this recipient goes to another next hop than the ones "
                              "before it; send it in a separate transaction")
        if not self.callahead:
            return DECLINED
        sender = transaction.sender or Address.null()
        try:
            with self.pool.connection(route) as downstream:
                downstream.prepare(ClientFacts.of(session))
                response = downstream.mail(sender, 0, [recipient])
                if response.ok:
                    response = downstream.rcpt(recipient)
        except DownstreamError as error:
            self.log.warning("callahead for %s: %s", recipient.format(), error)
            return DENYSOFT, "4.4.1 cannot check this recipient with the next hop now, try again later"
        self.log.info("callahead %s: %s", recipient.format(), response)
        if response.ok:
            return DECLINED  # the next hop would take it; relaying rules are rcpt_ok's business
        return _refusal(response)

    # queue time ---------------------------------------------------------------
    def deliver(self, session: Any) -> Any:
        """hook_queue: hand the transaction over; OK only when the next hop has it."""
        self.options.helo = self.options.helo or session.me
        transaction = session.transaction
        sender = transaction.sender or Address.null()
        groups: dict[Route, list[Address]] = {}
        for recipient in transaction.recipients:
            route = self.route(recipient)
            if route is None:
                self.log.error("no route for %s (check routes)", recipient.format())
                return DENYSOFT, f"4.4.0 no route for {recipient.format()}, try again later"
            groups.setdefault(route, []).append(recipient)
        if len(groups) > 1:
            # check_recipient keeps this from happening; a plugin before us in the rcpt
            # chain accepted the recipients without asking us. See the docstring.
            self.log.warning("recipients span %d routes: put this plugin before rcpt_ok in [plugins]",
                             len(groups))
        size = transaction.data_size + 1000  # + our Received header, roughly
        client = ClientFacts.of(session)
        delivered: list[str] = []  # "next hop: its reply", for the log
        accepted: list[str] = []
        try:
            with ExitStack() as stack:
                ready = []
                for route, recipients in groups.items():
                    downstream = stack.enter_context(self.pool.connection(route))
                    downstream.prepare(client)
                    refusal = self._envelope(downstream, sender, recipients, size,
                                             (transaction.dsn_ret, transaction.dsn_envid),
                                             transaction.requiretls)
                    if refusal is not None:
                        return refusal
                    ready.append((route, downstream, recipients))
                for route, downstream, recipients in ready:
                    responses = downstream.data(transaction.message_chunks(), len(recipients))
                    verdict = self._after_data(route, recipients, responses, delivered)
                    if verdict[0] is not OK:
                        return verdict
                    delivered.append(f"{downstream.hop.where}: {responses[0].text}")
                    accepted.append(responses[0].text)
        except DownstreamError as error:
            self.log.warning("delivery failed: %s", error)
            if delivered:
                self.log.error("delivered to %s before that failure: the retry duplicates it there",
                               "; ".join(delivered))
            return DENYSOFT, "4.4.1 the next hop is not available, try again later"
        self.log.info("queued: %s", "; ".join(delivered))
        return OK, accepted[0] if len(accepted) == 1 else "2.0.0 Queued"

    def _envelope(self, downstream: Downstream, sender: Address, recipients: list[Address],
                  size: int, dsn: tuple[str | None, str | None], requiretls: bool = False) -> Any:
        """MAIL and every RCPT; None when all were accepted, else the verdict (after RSET)."""
        response = downstream.mail(sender, size, recipients, dsn, requiretls)
        if not response.ok:
            self.log.info("next hop refused MAIL %s: %s", sender.format(), response)
            downstream.reset()
            return _refusal(response)
        refused = []
        for recipient in recipients:
            response = downstream.rcpt(recipient)
            if not response.ok:
                self.log.info("next hop refused RCPT %s: %s", recipient.format(), response)
                refused.append((recipient, response))
        if not refused:
            return None
        downstream.reset()  # nothing was sent: leave the next hop clean for the next use
        return _combined(refused, len(recipients))

    def _after_data(self, route: Route, recipients: list[Address], responses: list[Response],
                    delivered: list[str]) -> Any:
        if all(r.ok for r in responses):
            return OK, responses[0].text
        if delivered:
            self.log.error("delivered to %s, then %s refused the DATA: the retry duplicates it",
                           "; ".join(delivered), route.where)
            first = next(r for r in responses if not r.ok)
            return DENYSOFT, f"4.3.0 partly delivered; {first.text}"
        if not self.lmtp:
            return _refusal(responses[0])
        refused = [(rcpt, r) for rcpt, r in zip(recipients, responses) if not r.ok]
        if len(refused) == len(recipients):
            return _combined(refused, len(recipients))
        accepted = [rcpt.format() for rcpt, r in zip(recipients, responses) if r.ok]
        self.log.warning("LMTP accepted %s and refused %s: answering 4xx, so the retry duplicates it "
                         "for the accepted ones (use callahead to refuse at RCPT time)",
                         ", ".join(accepted), "; ".join(f"{rcpt.format()}: {r}" for rcpt, r in refused))
        rcpt, response = refused[0]
        return DENYSOFT, f"4.3.0 not delivered to {rcpt.format()}: {_without_enhanced(response.text)}"


def _refusal(response: Response) -> Any:
    """The next hop's refusal, passed on: its text (enhanced code included), 5xx or 4xx."""
    return (DENY if response.permanent else DENYSOFT), response.text


def _combined(refused: list[tuple[Address, Response]], total: int) -> Any:
    """Some recipients refused and nothing delivered: 5xx only if all were, for good."""
    if len(refused) == total and all(r.permanent for _, r in refused):
        return DENY, refused[0][1].text
    recipient, response = refused[0]
    if len(refused) == total:
        temporary = next((r for _, r in refused if not r.permanent), response)
        return DENYSOFT, temporary.text
    return DENYSOFT, (f"4.3.0 {recipient.format()} was refused by the next hop "
                      f"({response.code} {_without_enhanced(response.text)}); try again later")


def _without_enhanced(text: str) -> str:
    return re.sub(r"^[245]\.\d{1,3}\.\d{1,3}\s+", "", text)


__all__ = ["CONFIGSPEC", "ClientFacts", "ClientOptions", "ConfigurationError", "Downstream",
           "DownstreamError", "Hop", "Pool", "Relay", "Response", "Route", "dot_stuffed", "parse_routes",
           "route_for", "xtext"]


class RelayPlugin(Plugin):
    """What queue/smtp_forward and queue/lmtp share: a ``Relay`` to the next hop.

    The plugin checks recipients with the next hop at RCPT (callahead) and delivers at
    queue; ``lmtp`` says which protocol. Its hook timeout defaults to the sum of its own
    network timeouts, so a slow next hop is waited for rather than cut off mid-reply.
    """

    configspec = CONFIGSPEC
    lmtp = False

    def setup(self) -> None:
        try:
            self.relay = Relay(self.config, lmtp=self.lmtp, logger=self.log)
        except ConfigurationError as error:
            raise ValueError(str(error)) from None
        if self.timeout is None:
            config = self.config
            self.timeout = config["connect_timeout"] + 8 * config["command_timeout"] + config["data_timeout"]

    def hook_rcpt(self, session: Any, recipient: Address, params: dict[str, Any]) -> Any:
        return self.relay.check_recipient(session, recipient)

    def hook_queue(self, session: Any) -> Any:
        return self.relay.deliver(session)
