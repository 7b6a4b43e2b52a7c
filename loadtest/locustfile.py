"""Locust load test for an SMTP server: each task sends one message with smtplib.

Run it headless against a local qpgevent (see loadtest/README.md for the whole recipe)::

    locust -f loadtest/locustfile.py --headless -u 100 -r 20 -t 30s --host smtp://127.0.0.1:2525

Every message is reported to Locust as a request of type ``SMTP`` named ``sendmail``
(response time = MAIL FROM to the reply after the final dot, response length = message
size), so Locust's statistics, CSV (``--csv PREFIX``) and HTML (``--html FILE``)
reports work as for HTTP. Opening a connection (connect, greeting, EHLO) is reported
separately as ``SMTP`` / ``connect``. A refused command (4xx/5xx), a timeout or a broken
connection is a failure; the user then drops its connection and opens a new one for
the next message, after a short pause so that a server refusing connections does not
make the users spin.

Each user is a closed loop: it keeps one connection open for several messages (MAIL,
RCPT, DATA, again), sends QUIT and reconnects. Settings, from the environment:

  SMTP_MESSAGES_PER_CONNECTION  messages before QUIT and a new connection (default 10;
                                1 = a new connection for every message)
  SMTP_BODY_BYTES               message body size in bytes (default 1000)
  SMTP_SENDER                   envelope sender (default loadtest@client.test)
  SMTP_RECIPIENTS               envelope recipients, comma separated
                                (default someone@example.test)
  SMTP_HELO                     the name given in EHLO (default client.test)
  SMTP_TIMEOUT                  socket timeout in seconds (default 30)
  SMTP_WAIT                     seconds each user waits between messages (default 0)
  SMTP_ERROR_PAUSE              seconds a user waits after a failure (default 0.5)

``--host`` is ``smtp://HOST:PORT`` (port 25 if left out). Locust runs on gevent and
monkey-patches sockets when it is imported, so smtplib here is cooperative: hundreds of
users fit in one process.
"""

from __future__ import annotations

import itertools
import os
import smtplib
import time
from urllib.parse import urlsplit

import gevent
from locust import User, constant, task

MESSAGES_PER_CONNECTION = max(1, int(os.environ.get("SMTP_MESSAGES_PER_CONNECTION", "10")))
BODY_BYTES = max(0, int(os.environ.get("SMTP_BODY_BYTES", "1000")))
SENDER = os.environ.get("SMTP_SENDER", "loadtest@client.test")
RECIPIENTS = [r.strip() for r in os.environ.get("SMTP_RECIPIENTS", "someone@example.test").split(",") if r.strip()]
HELO = os.environ.get("SMTP_HELO", "client.test")
TIMEOUT = float(os.environ.get("SMTP_TIMEOUT", "30"))
WAIT = float(os.environ.get("SMTP_WAIT", "0"))
ERROR_PAUSE = float(os.environ.get("SMTP_ERROR_PAUSE", "0.5"))

_message_numbers = itertools.count(1)


def make_message(number: int) -> bytes:
    """A small RFC 5322 message, CRLF line ends, a body of BODY_BYTES bytes in 78-octet lines."""
    header = (f"From: <{SENDER}>\r\nTo: <{RECIPIENTS[0]}>\r\nSubject: locust message {number}\r\n"
              f"Message-ID: <{number}.{os.getpid()}.{time.time():.6f}@{HELO}>\r\n\r\n").encode("ascii")
    line = b"x" * 76 + b"\r\n"
    full, rest = divmod(BODY_BYTES, len(line))
    body = line * full + (b"y" * (rest - 2) + b"\r\n" if rest > 2 else b"")
    return header + body


class SmtpFailure(Exception):
    """Some recipients refused: sendmail() returned instead of raising."""


class SmtpUser(User):
    """One SMTP client: one connection reused for MESSAGES_PER_CONNECTION messages."""

    wait_time = constant(WAIT)
    host = "smtp://127.0.0.1:2525"  # --host overrides it

    def on_start(self) -> None:
        url = urlsplit(self.host)
        if url.scheme != "smtp" or not url.hostname:
            raise ValueError(f"--host must be smtp://HOST:PORT, not {self.host!r}")
        self.address = (url.hostname, url.port or 25)
        self.client: smtplib.SMTP | None = None
        self.sent_on_connection = 0

    def on_stop(self) -> None:
        self._close(quit=True)

    @task
    def sendmail(self) -> None:
        if self.client is None and not self._connect():
            gevent.sleep(ERROR_PAUSE)
            return
        message = make_message(next(_message_numbers))
        started = time.perf_counter()
        exception: BaseException | None = None
        try:
            refused = self.client.sendmail(SENDER, RECIPIENTS, message)
            if refused:
                exception = SmtpFailure(f"recipients refused: {refused}")
        except (smtplib.SMTPException, OSError) as error:
            exception = error
        self._fire("sendmail", started, len(message), exception)
        if exception is not None:
            # A refusal leaves the session usable, but a timeout or a broken connection
            # does not: start again from a new connection in every case.
            self._close(quit=False)
            gevent.sleep(ERROR_PAUSE)
            return
        self.sent_on_connection += 1
        if self.sent_on_connection >= MESSAGES_PER_CONNECTION:
            self._close(quit=True)

    def _connect(self) -> bool:
        started = time.perf_counter()
        client = smtplib.SMTP(timeout=TIMEOUT, local_hostname=HELO)
        try:
            code, text = client.connect(*self.address)
            if code != 220:
                raise smtplib.SMTPConnectError(code, text)
            code, text = client.ehlo()
            if code != 250:
                raise smtplib.SMTPHeloError(code, text)
        except (smtplib.SMTPException, OSError) as error:
            client.close()
            self._fire("connect", started, 0, error)
            return False
        self._fire("connect", started, 0, None)
        self.client, self.sent_on_connection = client, 0
        return True

    def _close(self, quit: bool) -> None:
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

    def _fire(self, name: str, started: float, length: int, exception: BaseException | None) -> None:
        self.environment.events.request.fire(
            request_type="SMTP", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=exception, context={})
