"""Locust load test for an SMTP server: scenarios as user classes, every SMTP step timed.

Run it headless against a local qpgevent (see loadtest/README.md for the whole recipe)::

    locust -f loadtest/locustfile.py --headless -u 50 -r 50 -t 30s --host smtp://127.0.0.1:2525 \\
        --csv run --html run.html CleanSender

What Locust sees (``Type`` / ``Name`` in its tables, CSV and HTML reports):

  SMTP / CONNECT, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, QUIT   each step, from command to reply
                                                                  (DATA: from DATA to the reply
                                                                  after the final dot)
  SMTP / PIPELINE       with --pipelining: MAIL, every RCPT and DATA sent in one write, until the
                        354 (RFC 2920); the message itself is then timed as DATA
  TXN / <scenario>      the whole mail transaction (or the whole session, for the slow client
                        and the idle holder); its response length is the message size

A refused command, a timeout or a broken connection is a failure of that step and of the
transaction; the user then drops its connection and pauses (--error-pause) so that a server
refusing connections does not make the users spin. For the spammer it is the other way
round: the expected rejection is a success, an accepted message a failure.

Scenarios (name them after the options to run only some; without names Locust runs all of
them, weighted as below):

  CleanSender    one connection per message: CONNECT EHLO [STARTTLS EHLO] [AUTH] MAIL RCPT.. DATA QUIT
  BulkSender     one connection for --messages-per-connection messages (a mailing-list exploder)
  Spammer        a message to --spam-recipient (a domain the server does not accept): rejected
  SlowClient     slowloris-style: every command and the message trickle in --slow-chunk bytes at a
                 time, --slow-delay seconds apart, the whole session bounded by --slow-max-seconds
  IdleHolder     connects, EHLO, then holds the connection idle --idle-seconds, NOOP, QUIT
  MixedProfile   one user doing all of the above in realistic proportions (tasks weighted 70 clean,
                 15 bulk burst of 10, 10 spam, 5 slow)

Options (Locust custom arguments; also settable as LOCUST_<NAME> environment variables):
--rcpts, --body-bytes, --messages-dir, --sender, --recipient-domain, --helo, --tls,
--auth USER:PASSWORD, --pipelining, --messages-per-connection, --spam-recipient, --slow-delay,
--slow-chunk, --slow-max-seconds, --idle-seconds, --smtp-timeout, --error-pause, --think-seconds, --send-for (no new transaction after that many seconds; then a
master quits once every user has ended: a distributed run that counts every message).

``--host`` is ``smtp://HOST:PORT`` (port 25 if left out). Locust runs on gevent and
monkey-patches sockets when it is imported, so smtplib here is cooperative: hundreds of users
fit in one process.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import smtplib
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit

import gevent
from locust import User, between, events, task
from locust.exception import StopUser
from locust.runners import WORKER_REPORT_INTERVAL, MasterRunner

_message_numbers = itertools.count(1)


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("SMTP load (loadtest/locustfile.py)")
    group.add_argument("--rcpts", type=int, default=1, help="recipients per message [1]")
    group.add_argument("--body-bytes", type=int, default=2048, help="message body size in bytes [2048]")
    group.add_argument("--messages-dir", default="",
                       help="send the files of this directory (real messages, cycled) instead of made-up ones")
    group.add_argument("--sender", default="loadtest@client.test", help="envelope sender [loadtest@client.test]")
    group.add_argument("--recipient-domain", default="example.test",
                       help="recipients are userN@DOMAIN; the server must accept it [example.test]")
    group.add_argument("--helo", default="client.test", help="the name given in EHLO [client.test]")
    group.add_argument("--tls", action="store_true", default=False, help="STARTTLS after EHLO (certificate not verified)")
    group.add_argument("--auth", default="", help="AUTH as USER:PASSWORD after EHLO (after STARTTLS with --tls)")
    group.add_argument("--pipelining", action="store_true", default=False,
                       help="send MAIL, RCPTs and DATA in one write (RFC 2920) when the server offers PIPELINING")
    group.add_argument("--messages-per-connection", type=int, default=100,
                       help="BulkSender: messages before QUIT and a new connection [100]")
    group.add_argument("--spam-recipient", default="someone@not-accepted.invalid",
                       help="Spammer: a recipient the server refuses [someone@not-accepted.invalid]")
    group.add_argument("--slow-delay", type=float, default=0.5, help="SlowClient: seconds between chunks [0.5]")
    group.add_argument("--slow-chunk", type=int, default=16, help="SlowClient: bytes per chunk [16]")
    group.add_argument("--slow-max-seconds", type=float, default=60,
                       help="SlowClient: give up (QUIT) after this long [60]")
    group.add_argument("--idle-seconds", type=float, default=30, help="IdleHolder: seconds to hold idle [30]")
    group.add_argument("--smtp-timeout", type=float, default=30, help="socket timeout in seconds [30]")
    group.add_argument("--error-pause", type=float, default=0.5, help="seconds a user waits after a failure [0.5]")
    group.add_argument("--think-seconds", type=float, default=0,
                       help="a pause between a user's transactions, uniform in 0..2x this (mean this); "
                            "0: a closed loop, each user sends as fast as the server answers [0]")
    group.add_argument("--send-for", type=float, default=0,
                       help="seconds after the start past which no user begins a new transaction: each finishes "
                            "the one under way and stops; then a (master) Locust quits. 0: until -t [0]")


#: When users stop beginning transactions (--send-for); None: never.
_deadline: list[float | None] = [None]


@events.test_start.add_listener
def _send_for(environment, **_) -> None:
    """--send-for: set the deadline; on a master, quit once every worker's users have ended.

    Locust's own -t is no way to end a distributed run with every message counted: at the time
    limit a master quits within half a second, and the workers' last statistics (and the
    messages their users are still sending) are lost. Users that end themselves are counted
    in the workers' regular reports; the master waits for two of them before it quits.
    """
    seconds = getattr(environment.parsed_options, "send_for", 0) if environment.parsed_options else 0
    if not seconds:
        return
    _deadline[0] = time.monotonic() + seconds
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        def quit_when_done() -> None:
            gevent.sleep(seconds)
            while runner.user_count > 0:
                gevent.sleep(0.5)
            gevent.sleep(2 * WORKER_REPORT_INTERVAL + 1)   # the workers' last reports
            runner.quit()
        gevent.spawn(quit_when_done)


class SmtpFailure(smtplib.SMTPException):
    """A reply other than the one the step expects."""

    def __init__(self, step: str, code: int, text: bytes | str) -> None:
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        super().__init__(f"{step}: {code} {text}")
        self.code = code


class Options:
    """The parsed options, with defaults when the file is imported outside a Locust run."""

    def __init__(self, parsed) -> None:
        get = (lambda name, default: getattr(parsed, name, default)) if parsed else (lambda name, default: default)
        self.rcpts = max(1, get("rcpts", 1))
        self.body_bytes = max(0, get("body_bytes", 2048))
        self.sender = get("sender", "loadtest@client.test")
        self.recipients = [f"user{n}@{get('recipient_domain', 'example.test')}" for n in range(self.rcpts)]
        self.helo = get("helo", "client.test")
        self.tls = get("tls", False)
        user, _, password = get("auth", "").partition(":")
        self.auth = (user, password) if user else None
        self.pipelining = get("pipelining", False)
        self.per_connection = max(1, get("messages_per_connection", 100))
        self.spam_recipient = get("spam_recipient", "someone@not-accepted.invalid")
        self.slow_delay = get("slow_delay", 0.5)
        self.slow_chunk = max(1, get("slow_chunk", 16))
        self.slow_max = get("slow_max_seconds", 60)
        self.idle_seconds = get("idle_seconds", 30)
        self.timeout = get("smtp_timeout", 30)
        self.error_pause = get("error_pause", 0.5)
        self.think = max(0.0, get("think_seconds", 0))
        folder = get("messages_dir", "")
        self.files = [wire_format(path.read_bytes()) for path in sorted(Path(folder).iterdir())
                      if path.is_file()] if folder else []
        if folder and not self.files:
            raise ValueError(f"--messages-dir {folder}: no files in it")
        self._cycle = itertools.cycle(self.files) if self.files else None

    def message(self) -> bytes:
        """The next message, CRLF line ends, not yet dot-stuffed."""
        if self._cycle is not None:
            return next(self._cycle)
        number = next(_message_numbers)
        header = (f"From: <{self.sender}>\r\nTo: <{self.recipients[0]}>\r\nSubject: locust message {number}\r\n"
                  f"Message-ID: <{number}.{os.getpid()}.{time.time():.6f}@{self.helo}>\r\n\r\n").encode("ascii")
        line = b"x" * 76 + b"\r\n"
        full, rest = divmod(self.body_bytes, len(line))
        return header + line * full + (b"y" * (rest - 2) + b"\r\n" if rest > 2 else b"")


_options: dict[int, Options] = {}


def options_for(parsed) -> Options:
    """One Options (and one read of --messages-dir) per Locust run, shared by its users."""
    if id(parsed) not in _options:
        _options[id(parsed)] = Options(parsed)
    return _options[id(parsed)]


def wire_format(message: bytes) -> bytes:
    """A message file as it goes on the wire: CRLF line ends, ending in CRLF."""
    message = re.sub(rb"\r?\n", b"\r\n", message)
    return message if message.endswith(b"\r\n") else message + b"\r\n"


def dot_stuffed(message: bytes) -> bytes:
    """RFC 5321 4.5.2: a leading dot doubled; then the terminating dot line."""
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


class SmtpUser(User):
    """Base of the scenarios: a timed SMTP client. Not run by itself."""

    abstract = True
    host = "smtp://127.0.0.1:2525"    # --host overrides it

    def on_start(self) -> None:
        url = urlsplit(self.host)
        if url.scheme != "smtp" or not url.hostname:
            raise ValueError(f"--host must be smtp://HOST:PORT, not {self.host!r}")
        self.address = (url.hostname, url.port or 25)
        self.options = options_for(self.environment.parsed_options)
        self.client: smtplib.SMTP | None = None
        self.sent = 0

    def on_stop(self) -> None:
        self.close(quit=True)

    def wait_time(self) -> float:
        """--think-seconds: a pause between transactions, uniform in 0..2x; 0: a closed loop."""
        think = self.options.think
        return random.uniform(0, 2 * think) if think else 0.0

    # -- reporting --------------------------------------------------------------------------

    def fire(self, kind: str, name: str, started: float, length: int, exception: BaseException | None) -> None:
        self.environment.events.request.fire(
            request_type=kind, name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=exception, context={})

    def step(self, name: str, call, *args, expect: tuple[int, ...] = (250,)):
        """Run one SMTP step, report it, and raise SmtpFailure unless its reply code is expected."""
        started = time.perf_counter()
        try:
            code, text = call(*args)
            if code not in expect:
                raise SmtpFailure(name, code, text)
        except (smtplib.SMTPException, OSError) as error:
            self.fire("SMTP", name, started, 0, error)
            raise
        self.fire("SMTP", name, started, 0, None)
        return code, text

    def transaction(self, name: str, body) -> None:
        """Time ``body()`` as one TXN; on failure drop the connection and pause."""
        if _deadline[0] is not None and time.monotonic() > _deadline[0]:
            raise StopUser()   # --send-for is over: no new transaction
        started = time.perf_counter()
        try:
            length = body()
        except (smtplib.SMTPException, OSError) as error:
            self.fire("TXN", name, started, 0, error)
            self.close(quit=False)
            gevent.sleep(self.options.error_pause)
            return
        self.fire("TXN", name, started, length or 0, None)

    # -- the steps ----------------------------------------------------------------------------

    def connect(self) -> smtplib.SMTP:
        """CONNECT (to the 220 greeting), EHLO, and STARTTLS + EHLO, AUTH as the options say."""
        options = self.options
        client = smtplib.SMTP(timeout=options.timeout, local_hostname=options.helo)
        client._host = self.address[0]  # STARTTLS's server_hostname; only SMTP(host) would set it
        self.client = client
        self.step("CONNECT", client.connect, *self.address, expect=(220,))
        self.step("EHLO", client.ehlo)
        if options.tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            self.step("STARTTLS", client.starttls, None, None, context, expect=(220,))
            self.step("EHLO", client.ehlo)
        if options.auth:
            self.step("AUTH", client.login, *options.auth, expect=(235,))
        return client

    def send_message(self, recipients: list[str], message: bytes, expect_rcpt=(250, 251)) -> None:
        """MAIL, RCPT.., DATA on the open connection: pipelined if asked and offered."""
        client, sender = self.client, self.options.sender
        if self.options.pipelining and client.has_extn("pipelining"):
            started, replies = time.perf_counter(), []
            try:
                client.send(f"MAIL FROM:<{sender}>\r\n".encode()
                            + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients) + b"DATA\r\n")
                replies += [client.getreply() for _ in range(len(recipients) + 2)]
                for name, (code, text), expect in zip(["MAIL"] + ["RCPT"] * len(recipients) + ["DATA"], replies,
                                                      [(250,)] + [expect_rcpt] * len(recipients) + [(354,)]):
                    if code not in expect:
                        raise SmtpFailure(name, code, text)
            except (smtplib.SMTPException, OSError) as error:
                self.fire("SMTP", "PIPELINE", started, 0, error)
                if replies and replies[-1][0] == 354:
                    client.send(b".\r\n")  # DATA was accepted anyway: end it empty, then RSET
                    client.getreply()
                raise
            self.fire("SMTP", "PIPELINE", started, 0, None)
            self.step("DATA", lambda: (client.send(dot_stuffed(message)), client.getreply())[1])
            return
        self.step("MAIL", client.mail, sender)
        for recipient in recipients:
            self.step("RCPT", client.rcpt, recipient, expect=expect_rcpt)
        self.step("DATA", client.data, message)

    def quit(self) -> None:
        client, self.client = self.client, None
        try:
            self.step("QUIT", client.quit, expect=(221,))
        finally:
            client.close()

    def close(self, quit: bool) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if quit:
                client.quit()
        except (smtplib.SMTPException, OSError):
            pass  # closing anyway: the messages it carried were already counted
        finally:
            client.close()

    # -- the scenarios' sessions (each returns the bytes of message it sent) ------------------

    def clean_session(self) -> int:
        message = self.options.message()
        self.connect()
        self.send_message(self.options.recipients, message)
        self.quit()
        return len(message)

    def bulk_message(self) -> int:
        if self.client is None:
            self.connect()
            self.sent = 0
        message = self.options.message()
        self.send_message(self.options.recipients, message)
        self.sent += 1
        if self.sent >= self.options.per_connection:
            self.quit()
        return len(message)

    def burst_session(self, count: int = 10) -> int:
        self.connect()
        size = 0
        for _ in range(count):
            message = self.options.message()
            self.send_message(self.options.recipients, message)
            size += len(message)
        self.quit()
        return size

    def spam_session(self) -> int:
        client = self.connect()
        self.step("MAIL", client.mail, self.options.sender)
        self.step("RCPT", client.rcpt, self.options.spam_recipient, expect=(550, 551, 553, 554))
        self.quit()
        return 0

    def trickle(self, data: bytes, deadline: float) -> None:
        chunk = self.options.slow_chunk
        for offset in range(0, len(data), chunk):
            if time.monotonic() > deadline:
                raise TimeoutError("--slow-max-seconds reached")
            self.client.send(data[offset:offset + chunk])
            gevent.sleep(self.options.slow_delay)

    def slow_step(self, name: str, data: bytes, deadline: float, expect: tuple[int, ...]) -> None:
        def call():
            self.trickle(data, deadline)
            return self.client.getreply()
        self.step(name, call, expect=expect)

    def slow_session(self) -> int:
        options = self.options
        deadline = time.monotonic() + options.slow_max
        client = smtplib.SMTP(timeout=options.timeout, local_hostname=options.helo)
        self.client = client
        self.step("CONNECT", client.connect, *self.address, expect=(220,))
        self.slow_step("EHLO", f"EHLO {options.helo}\r\n".encode(), deadline, (250,))
        self.slow_step("MAIL", f"MAIL FROM:<{options.sender}>\r\n".encode(), deadline, (250,))
        self.slow_step("RCPT", f"RCPT TO:<{options.recipients[0]}>\r\n".encode(), deadline, (250, 251))
        self.slow_step("DATA", b"DATA\r\n", deadline, (354,))
        message = options.message()[:4096]   # bounded: a slow client sends a small message
        self.slow_step("DATA", dot_stuffed(message), deadline, (250,))
        self.quit()
        return len(message)

    def idle_session(self) -> int:
        client = self.connect()
        gevent.sleep(self.options.idle_seconds)
        self.step("NOOP", client.noop)
        self.quit()
        return 0


class CleanSender(SmtpUser):
    """One connection per message, the whole exchange timed as TXN 'clean'."""

    weight = 4

    @task
    def clean(self) -> None:
        self.transaction("clean", self.clean_session)


class BulkSender(SmtpUser):
    """One connection for --messages-per-connection messages; each message is a TXN 'bulk'."""

    weight = 1

    @task
    def bulk(self) -> None:
        self.transaction("bulk", self.bulk_message)


class Spammer(SmtpUser):
    """RCPT to a recipient the server must refuse: TXN 'spam rejected' succeeds on the refusal."""

    weight = 1

    @task
    def spam(self) -> None:
        self.transaction("spam rejected", self.spam_session)


class SlowClient(SmtpUser):
    """Slowloris-style: every byte trickles in, bounded by --slow-max-seconds; TXN 'slow'."""

    weight = 1

    @task
    def slow(self) -> None:
        self.transaction("slow", self.slow_session)


class IdleHolder(SmtpUser):
    """Connects, EHLO, holds the connection idle --idle-seconds, NOOP, QUIT; TXN 'idle hold'."""

    weight = 1
    wait_time = between(0, 1)

    @task
    def hold(self) -> None:
        self.transaction("idle hold", self.idle_session)


class MixedProfile(SmtpUser):
    """A realistic mix in one user: mostly clean one-message sessions, some bulk, spam, slow."""

    weight = 2

    @task(70)
    def clean(self) -> None:
        self.transaction("clean", self.clean_session)

    @task(15)
    def burst(self) -> None:
        self.transaction("burst of 10", self.burst_session)

    @task(10)
    def spam(self) -> None:
        self.transaction("spam rejected", self.spam_session)

    @task(5)
    def slow(self) -> None:
        self.transaction("slow", self.slow_session)
