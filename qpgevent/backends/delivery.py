"""Running the outbound queue: when each message is tried, how, and what its answers mean.

Owns ``Runner``, which the queue runner process (``queue_runner``) drives: it watches
the queue folder (``outqueue``), delivers messages whose time has come, retries with
backoff, expires, and queues failure notices (``dsn``).

Theory of operation.

*One attempt* at a message groups its pending recipients by domain and delivers the
groups at once, each in one SMTP transaction carrying all of its recipients, over a
connection from a pool with ``destination_concurrency`` connections per destination
(``smtp_client.Pool``: connections are reused, RSET between messages; a destination is
a recipient domain and its servers, as in Postfix). The servers come from ``mxroute``: static routes, else the MX records; a server that refuses the
connection (or whose greeting, EHLO or STARTTLS fails) is skipped for the next one.

*Answers.* A 2xx to the end of DATA delivers the recipients accepted at RCPT; a 5xx to
RCPT (or to MAIL or DATA) fails those recipients for good; a 4xx, or a connection that
breaks, leaves them pending. A 5xx for some recipients fails only those.

*Durability.* As soon as one domain's transaction has its answer, the envelope is
rewritten on disk (``Queue.save``: fsynced) before anything else happens to the message
(or, when that answer delivered the last recipients, removed: also fsynced).
So a recipient marked delivered is never sent again. What can happen twice: if the
runner dies (kill -9, power loss) after the next hop said 250 and before that write, the
recipients of that one transaction are still pending when it restarts, and get the
message once more: at most one duplicate, per transaction in flight at the crash
(RFC 5321 6.1 prefers a duplicate to a loss). The same holds when the connection breaks
after our final dot and before the reply (RFC 1047).

*Retries.* After an attempt that leaves recipients pending, the next attempt waits
``minimal_backoff`` seconds, doubling with each attempt up to ``maximal_backoff``
(Postfix's rule and defaults: 300 s, 4000 s). A message older than ``lifetime`` (5 days)
whose attempt still leaves recipients pending fails them ("4.4.7 expired").

*Notices.* With ``delay_warning`` set, a message still pending that long gets one
"delayed" report (RFC 3464 Action: delayed) for its pending recipients. Failed recipients
are reported to the sender in one RFC 3464 report per attempt, queued in this same queue
(with the null sender) before the recipients are marked notified. NOTIFY=NEVER gets none;
a message with the null sender (someone's bounce) gets a notice sent to ``postmaster``
instead (a double bounce), and a failing double bounce is only logged. A hop that offers
DSN gets the request (RET, ENVID, NOTIFY, ORCPT); a hop that does not and accepts a
NOTIFY=SUCCESS recipient makes it ``relayed`` (saved with its delivery): one "relayed"
report per attempt (RFC 3461 5.2.2.3). Reports other than failures carry only the header.

*REQUIRETLS* (RFC 8689 4.2.1). A flagged message goes only to MX hosts of a validated
MX answer or named by an MTA-STS policy (else 5.7.10 at once), only over TLS whose certificate was
verified (PKIX for the MX name, ``verify``; or a DANE-EE or DANE-TA match for a DANE domain) to a
server that offers REQUIRETLS, with REQUIRETLS on MAIL. A server without REQUIRETLS, or
servers that all answered without such TLS, fail its recipients (5.7.10); its notice is
itself sent with REQUIRETLS.

*TLS reports.* With TLS-RPT on (``tls_policy``, ``tlsrpt``), its turn (counts to disk,
reports when a period ends) runs in a greenlet of its own; the report mails it queues
are tried at once.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.pool import Pool as GreenletPool

from ..core import dsn
from . import disk_threads, mxroute, queue_metrics
from ..core.address import Address, AddressError
from .outqueue import Envelope, Queue, QueueError, Recipient, State
from ..core.schedule import Schedule
from .relay_pool import Pool
from .relay_routes import Route, route_for
from .smtp_downstream import ClientOptions, DownstreamError, Response, TlsFailure
from .tls_policy import MxNotAuthenticated, TlsPolicies, TlsPolicyError

log = logging.getLogger("qpgevent.delivery")

__all__ = ["Options", "Runner", "backoff"]

BOUNCE, DOUBLE_BOUNCE = "bounce", "double-bounce"
REQUIRETLS_DANE = "requiretls-dane"  #: the pool of REQUIRETLS messages to DANE domains
COMMANDS = ("flush", "hold", "release", "delete", "bounce")
SCANS_PER_SECOND = 10  #: how often at most a burst of kicks makes the runner list the folder
UNSETTLED_RETRY = 1.0  #: seconds until a message whose client has no answer yet is looked at again
REPORT_GRACE = 10.0  #: seconds a stopping runner gives TLS-RPT's turn to finish


@dataclass
class Options:
    """What the queue plugin's options say about delivery (see plugins/queue/outbound.py)."""

    me: str = "localhost"
    routes: list[Route] | None = None
    port: int = 25
    families: str = "all"
    destination_concurrency: int = 10
    max_deliveries: int = 100
    minimal_backoff: float = 300.0
    maximal_backoff: float = 4000.0
    lifetime: float = 5 * 86400.0
    delay_warning: float = 0.0  #: seconds queued before a "still trying" notice; 0: never
    scan_interval: float = 10.0
    postmaster: str = ""
    idle_timeout: float = 60.0
    client: ClientOptions | None = None
    tls: TlsPolicies | None = None  #: None: opportunistic STARTTLS everywhere


def _in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Disk writes (fsync) off the event loop, so that other deliveries go on meanwhile; in
    the disk's share of the threads (``disk_threads``): a sick disk holding them all would
    stall the name look-ups of every connection to a next hop."""
    return disk_threads.run_blocking(functools.partial(function, *args, **kwargs))


def backoff(attempts: int, minimal: float, maximal: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: doubling, capped."""
    return min(maximal, minimal * 2 ** max(0, attempts - 1))


class Runner:
    def __init__(self, queue: Queue, options: Options,
                 blocking: Callable[..., Any] | None = None) -> None:
        self.queue, self.options = queue, options
        client = options.client or ClientOptions(helo=options.me, tls_context=None)
        client.helo = client.helo or options.me
        self.tls = options.tls or TlsPolicies(client, {}, "may", mta_sts=False, dane=False)
        # Connections wait for a free slot of their destination as long as a delivery may take.
        wait = client.connect_timeout + 8 * client.command_timeout + client.data_timeout
        #: One pool per TLS level: a connection made under one policy never serves another.
        variants = dict(self.tls.variants)
        # REQUIRETLS over DANE: the certificate must match a DANE-EE record (not TLS alone).
        variants[REQUIRETLS_DANE] = dataclasses.replace(
            variants["dane"], tls_check=self.tls.dane_verified_check, tls_check_verifies=True)
        self.pools = {level: Pool(variant, options.destination_concurrency, wait, options.idle_timeout)
                      for level, variant in variants.items()}
        self.deliveries = GreenletPool(options.max_deliveries)
        self.schedule = Schedule()  #: id -> next attempt (None: held)
        self.active: set[str] = set()
        self.after_attempt: dict[str, list[str]] = {}  #: commands for messages being tried
        #: id -> (pending recipients, attempts) as last read or written: the metrics' census.
        self.census: dict[str, tuple[int, int]] = {}
        self.wake = Event()
        self.rescan = True  #: look at the folder on the next turn (a new message was kicked in)
        self.last_scan = self.last_published = 0.0
        self.blocking = blocking or _in_thread
        self.reporting: gevent.Greenlet | None = None  #: TLS-RPT's turn, while it runs

    # -- the loop ------------------------------------------------------------------------
    def run(self, stop: Event) -> None:
        """Deliver until ``stop`` is set; then let the deliveries in flight finish."""
        for path in self.queue.clean():
            log.info("removed crash left-over %s", path)
        while not stop.is_set():
            now = time.monotonic()
            # Kicks come once per queued message: a burst is read in one listing, at most
            # SCANS_PER_SECOND times a second, and at least every scan_interval.
            if (self.rescan and now - self.last_scan >= 1 / SCANS_PER_SECOND) or \
                    now - self.last_scan >= self.options.scan_interval:
                self.rescan, self.last_scan = False, now
                self.scan()
            self.start_due()
            self._report_tls()
            if now - self.last_published >= 1.0:
                self.last_published = now
                self._publish_state()
            self.wake.clear()
            gevent.wait([stop, self.wake], timeout=self.sleep_time(), count=1)
        self.deliveries.join()
        for pool in self.pools.values():
            pool.close()
        if self.reporting is not None:
            self.reporting.join(REPORT_GRACE)  # a report being posted or queued: a moment to finish
            self.reporting.kill()
        if self.tls.reports is not None:
            self.tls.reports.flush()

    def _report_tls(self) -> None:
        """TLS-RPT's turn (``tlsrpt``), in a greenlet of its own: its look-ups and POSTs take time."""
        reports = self.tls.reports
        if reports is not None and (self.reporting is None or self.reporting.dead) and reports.due(time.time()):
            self.reporting = gevent.spawn(contextvars.copy_context().run, reports.turn_safely, self.blocking,
                                          self._queued_report)

    def _queued_report(self, message_id: str) -> None:
        self.schedule.set(message_id, 0.0)
        self.wake.set()

    def kick(self, message: str = "") -> None:
        """What the kick socket said: "" (look at the folder now) or a command of ``COMMANDS``."""
        verb, _, message_id = message.strip().partition(" ")
        message_id = message_id.strip()
        if verb in COMMANDS and message_id.isalnum():  # an id, never a path
            self.command(verb, message_id)
        elif verb == "tlsrpt" and self.tls.reports is not None:  # qpgevent queue tlsrpt: report now
            self.tls.reports.ask()
        elif verb == "flush":  # every message that is not held: now
            for waiting, when in list(self.schedule.when.items()):
                if when is not None:
                    self.schedule.set(waiting, 0.0)
        elif not verb:
            self.rescan = True
        self.wake.set()

    def command(self, verb: str, message_id: str) -> bool:
        """An operator's command (``qpgevent queue``); after the attempt if one is running.

        flush: try now; hold: no attempts until released; release: try now again;
        delete: forget it, no notice; bounce: fail its pending recipients now (a notice
        goes to the sender). False if there is no such message.
        """
        if message_id in self.active:
            self.after_attempt.setdefault(message_id, []).append(verb)
            return True
        try:
            envelope = self.queue.load(message_id)
        except FileNotFoundError:
            self.schedule.pop(message_id)
            return False
        if verb == "delete":
            self.blocking(self.queue.remove, message_id)
            self.schedule.pop(message_id)
            log.info("%s: deleted by the operator", message_id)
            return True
        if verb == "bounce":
            for recipient in envelope.pending():
                self._decide(recipient, State.FAILED, "5.0.0 returned to the sender by the postmaster", "")
            self._finish(envelope)
            return True
        if verb == "flush" and envelope.held:
            return True  # flushing does not release
        envelope.held = verb == "hold"
        if verb != "hold":
            envelope.next_attempt = 0.0
        self.blocking(self.queue.save, envelope)
        self.schedule.set(message_id, None if envelope.held else envelope.next_attempt)
        log.info("%s: %s by the operator", message_id, {"hold": "held", "release": "released",
                                                       "flush": "flushed"}[verb])
        return True

    def scan(self) -> None:
        """Learn of new messages (and of ones removed by hand) from the folder."""
        ids = set(self.queue.ids())
        for gone in self.schedule.ids() - ids - self.active:
            self.schedule.pop(gone)
        for message_id in sorted(ids - self.schedule.ids() - self.active):
            try:
                envelope = self.queue.load(message_id)
            except FileNotFoundError:
                continue
            except QueueError as error:
                log.error("%s", error)
                continue
            self.census[message_id] = (len(envelope.pending()), envelope.attempts)
            self.schedule.set(message_id, None if envelope.held else envelope.next_attempt)

    def _publish_state(self) -> None:
        queued = self.schedule.ids() | self.active
        # Ids begin with their arrival time in milliseconds (outqueue.new_id).
        oldest = min((int(i[:13], 16) / 1000 for i in queued if i[:13].isalnum()), default=time.time())
        self.census = {i: self.census.get(i, (0, 0)) for i in queued}  # forget the messages gone
        held = [i for i in queued if self.schedule.get(i) is None and i not in self.active]
        deferred = [i for i, (_, attempts) in self.census.items()
                    if attempts and i not in self.active and self.schedule.get(i) is not None]
        queue_metrics.queue_state(queue_metrics.QueueState(
            messages=len(queued), recipients=sum(pending for pending, _ in self.census.values()), held=len(held),
            deferred=len(deferred), active=len(self.active), oldest_seconds=time.time() - oldest))

    def start_due(self) -> None:
        free = self.options.max_deliveries - len(self.active)
        for message_id in self.schedule.take_due(time.time(), max(0, free)):
            if message_id in self.active:
                continue  # rescheduled (a flush) while being tried: its attempt sets the next time
            self.active.add(message_id)
            # In this greenlet's context: the services (resolver, store) the runner was given.
            self.deliveries.spawn(contextvars.copy_context().run, self._attempt_safely, message_id)

    def sleep_time(self) -> float:
        soonest = self.schedule.next_time()
        if soonest is None or len(self.active) >= self.options.max_deliveries:
            wait = self.options.scan_interval  # a finishing attempt wakes us (no busy loop while full)
        else:
            wait = soonest - time.time()
        if self.rescan:
            wait = min(wait, 1 / SCANS_PER_SECOND)
        return max(0.0, min(self.options.scan_interval, wait))

    def _attempt_safely(self, message_id: str) -> None:
        try:
            self.attempt(message_id)
        except QueueError as error:
            log.error("%s: %s; retrying in %ss", message_id, error, self.options.minimal_backoff)
            self.schedule.set(message_id, time.time() + self.options.minimal_backoff)
        except Exception:
            log.exception("%s: delivery attempt failed", message_id)
            self.schedule.set(message_id, time.time() + self.options.minimal_backoff)
        finally:
            self.active.discard(message_id)
            for verb in self.after_attempt.pop(message_id, []):
                self.command(verb, message_id)
            self.wake.set()

    # -- one attempt at one message -----------------------------------------------------------
    def attempt(self, message_id: str) -> None:
        try:
            if not self.queue.settled(message_id):  # its client's answer is not decided yet
                self.schedule.set(message_id, time.time() + UNSETTLED_RETRY)
                return
            envelope = self.queue.load(message_id)
        except FileNotFoundError:
            self.schedule.pop(message_id)
            return
        if envelope.held:
            self.schedule.set(message_id, None)
            return
        envelope.attempts += 1
        groups: dict[str, list[Recipient]] = {}
        for recipient in envelope.pending():
            groups.setdefault(recipient.domain, []).append(recipient)
        lock = Semaphore()
        gevent.joinall([gevent.spawn(contextvars.copy_context().run, self._deliver_domain, envelope, domain,
                                     recipients, lock)
                        for domain, recipients in groups.items()], raise_error=True)
        pending = envelope.pending()
        if pending and time.time() - envelope.arrived > self.options.lifetime:
            for recipient in pending:
                last = recipient.reply or "no attempt succeeded"
                self._decide(recipient, State.FAILED, f"4.4.7 message expired in the queue; last: {last}", "")
        self._finish(envelope)

    def _finish(self, envelope: Envelope) -> None:
        """After an attempt: notices for new failures; then forget the message, or reschedule it."""
        message_id = envelope.id
        self._notify(envelope)
        self.census[message_id] = (len(envelope.pending()), envelope.attempts)
        if envelope.done:
            self.blocking(self.queue.remove, message_id)
            self.schedule.pop(message_id)
            log.info("%s: done after %d attempt(s)", message_id, envelope.attempts)
            return
        if envelope.held:
            self.blocking(self.queue.save, envelope)
            self.schedule.set(message_id, None)
            return
        self._warn_of_delay(envelope)
        delay = backoff(envelope.attempts, self.options.minimal_backoff, self.options.maximal_backoff)
        envelope.next_attempt = time.time() + delay
        self.blocking(self.queue.save, envelope)
        self.schedule.set(message_id, envelope.next_attempt)
        queue_metrics.delivery("deferred", len(envelope.pending()))
        log.info("%s: %d recipient(s) deferred, next attempt in %.0fs", message_id,
                 len(envelope.pending()), delay)

    def _deliver_domain(self, envelope: Envelope, domain: str, recipients: list[Recipient],
                        lock: Semaphore) -> None:
        """One transaction for ``recipients`` (all of ``domain``); their states saved at once."""
        routes = self.options.routes or []
        try:
            route = mxroute.destination(domain, routes, self.options.port, self.options.families)
            static = route_for(routes, domain) is not None
            route, level = self.tls.prepare(domain, route, static=static)
            if envelope.requiretls:  # RFC 8689 4.2.1: authenticated MX hosts; DANE, else PKIX
                route = route if static else self.tls.requiretls_route(domain, route)
                level = REQUIRETLS_DANE if level == "dane" else "verify"
        except (mxroute.RoutingError, MxNotAuthenticated) as error:
            state = State.PENDING if isinstance(error, mxroute.RoutingError) and not error.permanent else State.FAILED
            for recipient in recipients:
                self._decide(recipient, state, str(error), "")
        except TlsPolicyError as error:
            for recipient in recipients:
                self._decide(recipient, State.PENDING, str(error), "")
        else:
            self._transaction(envelope, route, recipients, self.pools[level])
        if any(r.state is not State.DELIVERED for r in recipients):
            queue_metrics.destination_failure(domain)
        if all(r.state is State.DELIVERED for r in envelope.recipients):
            return  # nothing left: the removal of the envelope, next, is the durable mark
        with lock:  # one writer of the envelope at a time; the others' changes ride along
            self.blocking(self.queue.save, envelope)

    def _transaction(self, envelope: Envelope, route: Route, recipients: list[Recipient], pool: Pool) -> None:
        where = route.where
        try:
            sender = Address.parse(f"<{envelope.sender}>", smtputf8=True)
            rcpts = [dataclasses.replace(Address.parse(f"<{r.address}>", smtputf8=True, allow_postmaster=True),
                                         notify=tuple(r.notify.upper().split(",")) if r.notify else None,
                                         orcpt=r.orcpt)
                     for r in recipients]
        except AddressError as error:
            for recipient in recipients:
                self._decide(recipient, State.FAILED, f"5.1.3 bad address: {error}", "")
            return
        accepted: list[Recipient] = []
        try:
            with pool.connection(route, key=route.domain) as downstream:
                downstream.prepare(None)
                where = downstream.hop.host
                response = downstream.mail(sender, envelope.size, rcpts, (envelope.ret, envelope.envid),
                                           envelope.requiretls)
                if not response.ok:
                    downstream.reset()
                    for recipient in recipients:
                        self._answered(recipient, response, where)
                    return
                for recipient, address in zip(recipients, rcpts):
                    response = downstream.rcpt(address)
                    if response.ok:
                        accepted.append(recipient)
                    else:
                        self._answered(recipient, response, where)
                if not accepted:
                    downstream.reset()
                    return
                response = downstream.data(self.queue.message_chunks(envelope.id), 1)[0]
                # RFC 3461 5.2.2.3: a hop without DSN cannot pass NOTIFY=SUCCESS on: we report.
                relayed = response.ok and not downstream.offers_dsn and bool(envelope.sender)
                for recipient in accepted:
                    self._answered(recipient, response, where)
                    recipient.relayed = relayed and "SUCCESS" in (recipient.notify or "").upper()
        except DownstreamError as error:
            # RFC 8689 4.2.1: no verified TLS at any server: a REQUIRETLS message fails.
            fails = envelope.requiretls and isinstance(error, TlsFailure)
            state, reply = (State.FAILED, f"5.7.10 REQUIRETLS: {error}") if fails else (State.PENDING, f"4.4.1 {error}")
            for recipient in recipients:
                if recipient.state is State.PENDING:
                    self._decide(recipient, state, reply, "")
            log.warning("%s: %s", envelope.id, error)

    def _answered(self, recipient: Recipient, response: Response, where: str) -> None:
        state = State.DELIVERED if response.ok else State.FAILED if response.permanent else State.PENDING
        self._decide(recipient, state, str(response), where)

    def _decide(self, recipient: Recipient, state: State, reply: str, where: str) -> None:
        recipient.state, recipient.reply, recipient.remote_mta = state, reply, where
        recipient.updated = time.time()
        if state is not State.PENDING:
            queue_metrics.delivery(state.value)
        log.info("<%s>: %s%s: %s", recipient.address, state.value, f" by {where}" if where else "", reply)

    # -- failure notices -----------------------------------------------------------------------------
    def _notify(self, envelope: Envelope) -> None:
        failures = envelope.unnotified_failures()
        wanted = [r for r in failures if r.notify is None or "FAILURE" in r.notify.upper()]
        if wanted:
            self._queue_notice(envelope, wanted)
        relays = envelope.unnotified_relays()  # asked only when the sender is not null
        if relays:  # every one of this attempt in one report (RFC 3464 Action: relayed)
            self._queue_notice(envelope, relays, action="relayed")
        for recipient in failures + relays:
            recipient.notified = True

    def _warn_of_delay(self, envelope: Envelope) -> None:
        """Once, after ``delay_warning`` seconds queued: "still trying" for the pending
        recipients (RFC 3464 Action: delayed) that asked for it (NOTIFY=DELAY) or gave no
        NOTIFY. Never for a bounce (the null sender)."""
        warning = self.options.delay_warning
        if not warning or envelope.delay_warned or not envelope.sender or \
                time.time() - envelope.arrived < warning:
            return
        envelope.delay_warned = True
        wanted = [r for r in envelope.pending() if r.notify is None or "DELAY" in r.notify.upper()]
        if wanted:
            self._queue_notice(envelope, wanted, action="delayed")

    def _queue_notice(self, envelope: Envelope, failures: list[Recipient], action: str = "failed") -> None:
        if envelope.kind == DOUBLE_BOUNCE:
            log.error("%s: a double bounce could not be delivered; dropped: %s", envelope.id,
                      "; ".join(f"<{r.address}> {r.reply}" for r in failures))
            return
        if envelope.sender:
            to, kind = envelope.sender, BOUNCE
        else:
            to, kind = self.options.postmaster or f"postmaster@{self.options.me}", DOUBLE_BOUNCE
        original = b"".join(self.queue.message_chunks(envelope.id))
        # RET asks for the message in failure reports only (RFC 3461 4.3); a REQUIRETLS
        # message's notice goes with REQUIRETLS too, and holds no more of it than the header.
        ret = envelope.ret if action == "failed" and not envelope.requiretls else "HDRS"
        report = dsn.bounce(self.options.me, to, [
            dsn.Failure(r.address, r.reply, r.remote_mta, r.orcpt, action, r.updated) for r in failures],
            original, arrival=envelope.arrived, envid=envelope.envid, ret=ret,
            received_from=envelope.received_from)
        notice = self.blocking(self.queue.enqueue, "", [Recipient(to)], [report], kind=kind,
                               requiretls=envelope.requiretls)
        if action == "failed":
            queue_metrics.delivery("bounced")
        self.census[notice.id] = (1, 0)
        self.schedule.set(notice.id, 0.0)
        log.info("%s: %s %s (%s) to <%s> for %d recipient(s)", envelope.id, kind, notice.id, action, to,
                 len(failures))
