"""The outbound queue on disk: messages, their envelopes, per-recipient state, written durably.

Owns the queue folder that ``queue/outbound`` writes and the queue runner
(``queue_runner``) reads. Layout, under ``queue_dir``::

    tmp/          files being written; never read (left-overs of a crash are removed)
    msg/ID        the message, exactly as it will go out (our Received line included)
    env/ID.json   its envelope: sender, recipients with their state, DSN parameters,
                  attempts, next attempt, hold flag

Durability. ``enqueue`` writes the message into ``tmp/``, fsyncs it, renames it into
``msg/``, then does the same for the envelope into ``env/``, then fsyncs both folders:
only then does it return, and only then does the plugin answer 250. A message exists
for the runner when its envelope does; a ``msg/`` file without an envelope is the
left-over of a crash between the two renames (the client got no 250) and is removed.
Enqueued for a caller that may give up meanwhile (queue/outbound, in
``disk.run_blocking_undoable``: its hook's timeout on a sick disk), it stops just before the
envelope's rename if that caller is gone; ``take_back`` removes, durably, a message whose
client hears 4xx after all. Such a caller enqueues ``settling``: the envelope enters ``env/``
under an exclusive ``flock``, held until the caller's answer is decided (``settle`` after a
250, ``take_back`` before a 4xx), and the runner does not try a message whose envelope it
cannot lock (``settled``): a scan that finds it while the fsync of ``env/`` is held by a
sick disk must not deliver a message whose client will hear 4xx and send it again.
Every change of state (a recipient delivered, failed, deferred) rewrites the envelope
the same way (tmp, fsync, rename, fsync the folder): a rename is atomic, so a crash
leaves either the old envelope or the new one, never a torn one.

A recipient is ``pending`` (not delivered yet), ``delivered``, or ``failed`` (for good:
5xx, expired, no route); ``notified`` says a failed recipient's bounce is queued (or,
for a ``relayed`` one, its success notice).
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import gevent.monkey

from . import disk

__all__ = ["Envelope", "Queue", "QueueError", "Recipient", "State", "new_id"]

#: Message ids: time-ordered, unique across processes (16 hex digits of time, 8 random).
_ID_TIME_DIGITS = 13


class QueueError(Exception):
    """The queue folder cannot be written or read (disk full, permissions, a corrupt file)."""


class State(str, enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass
class Recipient:
    """One recipient of a queued message and what became of it."""

    address: str
    state: State = State.PENDING
    notify: str | None = None  #: RFC 3461 NOTIFY as given (``SUCCESS,FAILURE``, ``NEVER``), or None
    orcpt: str | None = None  #: RFC 3461 ORCPT as given (``rfc822;user@example.test``), or None
    reply: str = ""  #: the last answer about it (the next hop's words, or ours)
    remote_mta: str = ""  #: the server that gave that answer
    notified: bool = False  #: a failure notice for it is queued (or none is due)
    #: Delivered to a hop without DSN while it asked NOTIFY=SUCCESS: a "relayed" notice is
    #: due (RFC 3461 5.2.2.3), queued once (then ``notified``).
    relayed: bool = False
    updated: float = 0.0

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower() if "@" in self.address else ""


@dataclass
class Envelope:
    """Everything about a queued message but its content."""

    id: str
    sender: str  #: "" is the null sender (a bounce)
    recipients: list[Recipient]
    arrived: float = field(default_factory=time.time)
    ret: str | None = None  #: RFC 3461 RET (FULL or HDRS), or None
    envid: str | None = None  #: RFC 3461 ENVID, or None
    attempts: int = 0
    next_attempt: float = 0.0
    held: bool = False
    size: int = 0
    received_from: str = ""  #: the client, for the bounce's Received-From-MTA
    delay_warned: bool = False  #: a "still trying" notice went out
    kind: str = "message"  #: message, bounce (a notice we made), double-bounce (one to postmaster), tlsrpt
    requiretls: bool = False  #: RFC 8689: only over verified TLS to a hop offering REQUIRETLS

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state is State.PENDING]

    def unnotified_failures(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state is State.FAILED and not r.notified]

    def unnotified_relays(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state is State.DELIVERED and r.relayed and not r.notified]

    @property
    def done(self) -> bool:
        """Nothing is left to do: every recipient delivered or failed, and notices queued."""
        return not self.pending() and not self.unnotified_failures() and not self.unnotified_relays()

    def to_json(self) -> str:
        data = asdict(self)
        for recipient in data["recipients"]:
            recipient["state"] = recipient["state"].value
        return json.dumps(data, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Envelope:
        data = json.loads(text)
        data["recipients"] = [Recipient(**dict(r, state=State(r["state"]))) for r in data["recipients"]]
        return cls(**data)


def new_id() -> str:
    return f"{int(time.time() * 1000):0{_ID_TIME_DIGITS}X}{secrets.token_hex(4).upper()}"


class Queue:
    """The folder; every method does blocking disk I/O (call it from a thread in a worker)."""

    def __init__(self, directory: str, fsync: bool = True) -> None:
        self.directory = directory
        self.fsync = fsync
        self.tmp, self.msg, self.env = (os.path.join(directory, name) for name in ("tmp", "msg", "env"))
        for folder in (self.directory, self.tmp, self.msg, self.env):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        #: Envelopes of ``settling`` enqueues not decided yet: the descriptor holding each one's flock.
        self._settling: dict[str, int] = {}

    # -- writing ------------------------------------------------------------------
    def enqueue(self, sender: str, recipients: Iterable[Recipient], chunks: Iterable[bytes],
                settling: bool = False, **fields: Any) -> Envelope:
        """Store a message and its envelope durably; the envelope once both are safe.
        ``settling``: not for the runner until ``settle`` (or ``take_back``)."""
        envelope = Envelope(id=new_id(), sender=sender, recipients=list(recipients), **fields)
        if not envelope.recipients:
            raise QueueError("a message without recipients cannot be queued")
        temporary = os.path.join(self.tmp, envelope.id + ".msg")
        try:
            size = 0
            with open(temporary, "xb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    size += len(chunk)
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
            os.rename(temporary, self.message_path(envelope.id))
            envelope.size = size
            self.save(envelope, sync_msg=True, settling=settling)
        except (OSError, QueueError, disk.Abandoned) as error:
            for path in (temporary, self.message_path(envelope.id)):
                _unlink(path)  # no 250 follows: take back what was written
            if isinstance(error, disk.Abandoned):
                raise
            raise QueueError(f"cannot queue {envelope.id}: {error}") from None
        return envelope

    def take_back(self, envelope: Envelope) -> None:
        """Remove a message just enqueued whose client hears 4xx after all, durably: a crash
        must not bring it back (the client's retry would be a second copy)."""
        self.remove(envelope.id)
        if self.fsync:
            _fsync_dir(self.env)
        self.settle(envelope)  # gone for good: a runner waiting on it finds nothing

    def settle(self, envelope: Envelope) -> None:
        """The answer to a ``settling`` enqueue is decided: the runner may take the message."""
        held = self._settling.pop(envelope.id, None)
        if held is not None:
            _close(held)  # the flock goes with the last descriptor of its file

    def save(self, envelope: Envelope, sync_msg: bool = False, settling: bool = False) -> None:
        """Replace the envelope atomically (tmp, fsync, rename, fsync the folder)."""
        temporary = os.path.join(self.tmp, envelope.id + ".json")
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                if settling:  # locked before its name is in env/: the runner never sees it unlocked
                    self._settling[envelope.id] = held = os.dup(handle.fileno())
                    fcntl.flock(held, fcntl.LOCK_EX)
                handle.write(envelope.to_json())
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
            # Enqueuing for a caller that may give up (disk.run_blocking_undoable): from here on
            # the runner can see the message; a caller gone by now stops us here (disk.Abandoned).
            disk.point_of_no_return()
            os.rename(temporary, self.envelope_path(envelope.id))
            if self.fsync:
                if sync_msg:
                    _fsync_dir(self.msg)
                _fsync_dir(self.env)
        except (OSError, disk.Abandoned) as error:
            _unlink(temporary)
            self.settle(envelope)
            if isinstance(error, disk.Abandoned):
                raise
            raise QueueError(f"cannot write the envelope of {envelope.id}: {error}") from None

    def remove(self, message_id: str) -> None:
        """Forget a message: the envelope first (then it no longer exists), then its content.

        Not fsynced (Postfix does not either): a process that dies after this sees it gone;
        only a power failure can bring back the messages removed in the last seconds, whose
        recipients then get them once more (at most one duplicate, still never a loss).
        """
        _unlink(self.envelope_path(message_id))
        _unlink(self.message_path(message_id))

    # -- reading ------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Every queued message, oldest first."""
        names = sorted(name[:-5] for name in os.listdir(self.env) if name.endswith(".json"))
        return names

    def settled(self, message_id: str) -> bool:
        """Whether the message is the runner's to try: False while the answer to its
        ``settling`` enqueue is not decided. FileNotFoundError once it is gone (taken back)."""
        fd = os.open(self.envelope_path(message_id), os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if os.fstat(fd).st_nlink == 0:  # taken back while we waited for the lock
                raise FileNotFoundError(self.envelope_path(message_id))
            return True
        finally:
            _close(fd)

    def load(self, message_id: str) -> Envelope:
        try:
            with open(self.envelope_path(message_id), encoding="utf-8") as handle:
                return Envelope.from_json(handle.read())
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise QueueError(f"cannot read the envelope of {message_id}: {error}") from None

    def message_chunks(self, message_id: str, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        with open(self.message_path(message_id), "rb") as handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def message_head(self, message_id: str, limit: int = 1 << 16) -> bytes:
        """The header block of the message (up to ``limit`` octets): for bounces with RET=HDRS."""
        with open(self.message_path(message_id), "rb") as handle:
            head = handle.read(limit)
        end = head.find(b"\r\n\r\n")
        return head[:end + 2] if end >= 0 else head

    def clean(self, older_than: float = 3600.0) -> list[str]:
        """Remove left-overs of crashes: old tmp files, messages without an envelope."""
        removed = []
        now = time.time()
        known = set(self.ids())
        for folder, orphan in ((self.tmp, lambda name: True),
                               (self.msg, lambda name: name not in known)):
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                try:
                    if orphan(name) and now - os.stat(path).st_mtime > older_than:
                        os.unlink(path)
                        removed.append(path)
                except FileNotFoundError:
                    continue
        return removed

    def envelope_path(self, message_id: str) -> str:
        return os.path.join(self.env, message_id + ".json")

    def message_path(self, message_id: str) -> str:
        return os.path.join(self.msg, message_id)

    @property
    def kick_path(self) -> str:
        """The runner's datagram socket: a byte there says "look at the queue now"."""
        return os.path.join(self.directory, "runner.sock")

    def kick(self, message_id: str = "") -> bool:
        """Tell the runner to look now (at one message: read its envelope again).

        False when no runner listens; it finds the message on its next scan anyway.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            try:
                sock.sendto(message_id.encode("ascii") or b"\n", self.kick_path)
            except OSError:
                return False
        return True


#: The real close(2): gevent's patched os.close defers the close to the next turn of the
#: event loop, and a loop enqueuing thousands of messages without yielding ran out of fds.
_close = gevent.monkey.get_original("os", "close")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        _close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
