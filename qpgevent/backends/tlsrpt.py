"""TLS-RPT (RFC 8460) for the outbound queue: TLS sessions counted on disk, reports sent per period.

Owns ``TlsReports``, which the queue runner keeps when ``tlsrpt = yes``:

- ``count(policy, result, ...)``: one TLS session to a recipient domain's server, a
  success or a failure by RFC 8460 result type, under the policy in force (``sts``,
  ``tlsa``, ``no-policy-found``: see ``tls_policy``). Counts are kept in memory and
  written to ``queue_dir/tlsrpt/current.json`` (replaced atomically) at most every
  ``FLUSH_INTERVAL`` seconds and when the runner stops: a crash loses at most those
  seconds' counts, never a closed period.
- Periods are ``period`` seconds long (a day by default), aligned to midnight UTC. When
  one ends, or when ``qpgevent queue tlsrpt`` asks (the period then ends now), its tally
  is closed: written as ``closed-START-END.json``, a new one begun.
- For each closed tally and each policy domain in it, the domain's ``_smtp._tls`` TXT
  record names where reports go (RFC 8460 3): each ``mailto:`` gets the report as a
  mail put into this same queue (From the reporter address; durable before the domain is
  marked done), each ``https:`` a POST of the gzipped JSON (certificate checked, as for
  MTA-STS). A domain whose look-up fails for now is tried again after ``RETRY_INTERVAL``;
  a closed tally older than ``KEEP`` is dropped, sent or not.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from ..core import tlsrpt
from ..core.tlsrpt import Policy, Tally
from . import dns as qdns
from . import https_client
from .outqueue import Queue, QueueError, Recipient

__all__ = ["TlsReports"]

log = logging.getLogger("qpgevent.tlsrpt")

FLUSH_INTERVAL = 5.0  #: seconds between writes of the current counts
RETRY_INTERVAL = 300.0  #: seconds before a domain whose TXT look-up failed is tried again
KEEP = 7 * 86400.0  #: seconds a closed tally waits at most for its reports to go out
#: Policies (about one per recipient domain) counted at most per period: the tally stays
#: small enough to write every few seconds; sessions under further policies are not counted.
MAX_POLICIES = 10000
POST_TIMEOUT = 60.0  #: seconds an https: rua may take to connect, and then to answer


class TlsReports:
    def __init__(self, directory: str, queue: Queue, *, me: str, sender: str = "", organization: str = "",
                 period: float = 86400.0, ca_file: str = "") -> None:
        self.directory, self.queue, self.me = directory, queue, me
        self.sender = sender or f"postmaster@{me}"
        self.organization, self.period, self.ca_file = organization or me, period, ca_file
        os.makedirs(directory, exist_ok=True)
        self.tally = self._load_current() or Tally(time.time())
        self.flushed = self.last_send = 0.0
        self.dirty, self.asked = False, False
        self.post_timeout = POST_TIMEOUT
        self.max_policies = MAX_POLICIES
        self.full = False  #: max_policies reached in this period

    # -- counting ------------------------------------------------------------------------------
    def count(self, policy: Policy, result: str, mx: str = "", ip: str = "", reason: str = "") -> None:
        if not self.tally.count(policy, result, mx, ip, reason, self.max_policies):
            if not self.full:
                self.full = True  # said once a period
                log.warning("TLS-RPT: %d policies counted this period: sessions under others are not",
                            self.max_policies)
            return
        self.dirty = True
        log.debug("TLS-RPT %s %s: %s %s %s", policy.domain, policy.type, result, mx, reason)

    def ask(self) -> None:
        """``qpgevent queue tlsrpt``: end the period now and send its reports."""
        self.asked = True

    def _end(self) -> float:
        return (self.tally.start // self.period + 1) * self.period

    def due(self, now: float) -> bool:
        """Whether ``turn`` has something to do."""
        if self.asked or now >= self._end() or (self.dirty and now - self.flushed >= FLUSH_INTERVAL):
            return True
        if now - self.last_send >= RETRY_INTERVAL:
            if self._closed():
                return True
            self.last_send = now  # nothing waits: look at the folder again in RETRY_INTERVAL
        return False

    # -- the turn (the runner calls it in a greenlet of its own) -----------------------------------
    def turn(self, now: float, blocking: Callable[..., Any]) -> list[str]:
        """Flush, close a period that ended, send what is closed: the ids of the report mails queued."""
        if self.asked or now >= self._end():
            end = now if self.asked else self._end()
            self.asked = False
            closed, self.tally, self.full = self.tally, Tally(end), False
            if closed.policies:
                blocking(self._write, self._path(f"closed-{int(closed.start)}-{int(end)}.json"),
                         json.dumps(dict(closed.to_json(), end=end, sent=[])))
            self.dirty = True
            self.last_send = 0.0
        if self.dirty:
            self.dirty, self.flushed = False, now
            # Serialized here, on the hub: deliveries count into the tally while the thread writes.
            blocking(self._write, self._path("current.json"), json.dumps(self.tally.to_json()))
        queued: list[str] = []
        if now - self.last_send >= RETRY_INTERVAL or self.last_send == 0.0:
            self.last_send = now
            for name in self._closed():
                queued += self._send_closed(name, now, blocking)
        return queued

    def turn_safely(self, blocking: Callable[..., Any], queued: Callable[[str], None]) -> None:
        """``turn`` now, each report mail queued told to ``queued``; a failure is logged, retried later."""
        try:
            for message_id in self.turn(time.time(), blocking):
                queued(message_id)
        except (OSError, QueueError) as error:
            log.error("TLS-RPT: %s; trying again later", error)

    def flush(self) -> None:
        if self.dirty:
            self.dirty = False
            self._write(self._path("current.json"), json.dumps(self.tally.to_json()))

    def _send_closed(self, name: str, now: float, blocking: Callable[..., Any]) -> list[str]:
        path = self._path(name)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            tally = Tally.from_json(data)
        except (OSError, ValueError, KeyError) as error:
            log.error("TLS-RPT: cannot read %s: %s; dropped", path, error)
            blocking(os.unlink, path)
            return []
        queued: list[str] = []
        for domain in [d for d in tally.domains() if d not in data["sent"]]:
            try:
                uris = tlsrpt.parse_record(qdns.txt(f"_smtp._tls.{domain}"))
            except qdns.TemporaryFailure as error:
                log.warning("TLS-RPT %s: cannot look up where reports go: %s; later", domain, error)
                continue
            if uris:
                queued += self._send(tally, data["end"], domain, uris, blocking)
            data["sent"].append(domain)
            blocking(self._write, path, json.dumps(data))
        if set(data["sent"]) >= set(tally.domains()) or now - data["end"] > KEEP:
            blocking(os.unlink, path)
        return queued

    def _send(self, tally: Tally, end: float, domain: str, uris: list[str], blocking: Callable[..., Any]) -> list[str]:
        unique = f"{int(tally.start)}-{int(end)}.{domain}"
        data = tlsrpt.report(tally, end - 1 if not tally.start % self.period and not end % self.period else end,
                             domain, self.organization, self.sender, f"{unique}@{self.me}")
        name = tlsrpt.filename(self.me, domain, tally.start, end, unique)
        queued = []
        for uri in uris:
            if uri.startswith("mailto:"):
                to = unquote(uri[len("mailto:"):].split("?")[0])
                mail = tlsrpt.report_mail(data, domain, self.me, self.sender, to, name)
                envelope = blocking(self.queue.enqueue, self.sender, [Recipient(to)], [mail], kind="tlsrpt")
                queued.append(envelope.id)
                log.info("TLS-RPT report about %s queued as %s for <%s>", domain, envelope.id, to)
            else:
                self._post(uri, tlsrpt.gzipped(data), domain)
        return queued

    def _post(self, uri: str, body: bytes, domain: str) -> bool:
        """RFC 8460 5.2: POST, Content-Type application/tlsrpt+gzip; any 2xx is done."""
        parts = urlsplit(uri)
        try:
            response = https_client.request("POST", parts.hostname or "", parts.port or 443, parts.path or "/",
                                            ca_file=self.ca_file, timeout=self.post_timeout, limit=4096, body=body,
                                            content_type="application/tlsrpt+gzip")
        except https_client.HttpsError as error:
            log.warning("TLS-RPT report about %s not posted to %s: %s", domain, uri, error)
            return False
        log.info("TLS-RPT report about %s posted to %s: %s %s", domain, uri, response.status, response.reason)
        return 200 <= response.status < 300

    # -- the folder ----------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _closed(self) -> list[str]:
        return sorted(n for n in os.listdir(self.directory) if n.startswith("closed-") and n.endswith(".json"))

    def _load_current(self) -> Tally | None:
        try:
            with open(self._path("current.json"), encoding="utf-8") as handle:
                tally = Tally.from_json(json.load(handle))
        except (OSError, ValueError, KeyError):
            return None
        # Closed, then a crash before the new tally was written: those counts are reported already.
        if any(int(n.split("-")[2].split(".")[0]) > tally.start for n in self._closed()):
            return None
        return tally

    @staticmethod
    def _write(path: str, text: str) -> None:
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(path + ".tmp", path)
