"""queue/maildir: deliver each message into a Maildir, safely, before saying 250.

One file per message (whatever the number of recipients), written the Maildir way:
into ``tmp/``, flushed to disk with fsync, renamed into ``new/``, and the ``new/``
folder fsynced so the rename itself survives a crash. Only then does the client get
``250 2.0.0 Queued as <file name>``. A crash at any point leaves either nothing in
``new/`` or the whole message; a half-written file can only ever be in ``tmp/``
(files there older than 36 hours are removed at start, as the Maildir convention says).

The file holds ``Return-Path: <sender>`` (RFC 5321 4.4: added at final delivery), then
the message as received, our Received header on top, CRLF line endings as sent.

Options:
  path   the Maildir (default ``spool/Maildir``, relative to the ini file); created if missing
  fsync  fsync files and folder before answering (default true; turn off only to
         measure, never in production)

Example::

    [[queue/maildir]]
      path = /var/mail/inbound
"""

import itertools
import os
import socket
import time

from qpgevent.plugin import DENYSOFT, OK, Plugin, run_blocking

STALE_TMP_SECONDS = 36 * 3600
_deliveries = itertools.count(1)


class Maildir(Plugin):
    configspec = """
    path = path(default="spool/Maildir")
    fsync = boolean(default=True)
    """

    def setup(self):
        root = self.config["path"]
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
        self._remove_stale_tmp(os.path.join(root, "tmp"))
        self.host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def hook_queue(self, session):
        name = self._unique_name()
        try:
            run_blocking(self._deliver, session.transaction, name)
        except OSError as error:
            self.log.error("cannot write %s: %s", name, error)
            return DENYSOFT, "4.3.0 cannot store the message right now, try again later"
        return OK, f"Queued as {name}"

    def _deliver(self, transaction, name):
        """Write, fsync, rename into new/, fsync new/ (runs in a worker thread)."""
        root = self.config["path"]
        tmp, new = os.path.join(root, "tmp", name), os.path.join(root, "new", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            sender = transaction.sender.format() if transaction.sender else "<>"
            _write_all(fd, f"Return-Path: {sender}\r\n".encode("utf-8"))
            for chunk in transaction.message_chunks():
                _write_all(fd, chunk)
            if self.config["fsync"]:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, new)
        except BaseException:
            os.unlink(tmp)  # new/ is unusable: leave no copy behind in tmp/
            raise
        if self.config["fsync"]:
            directory = os.open(os.path.join(root, "new"), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def _unique_name(self):
        # The Maildir naming convention: time, then what makes it unique on this host.
        now = time.time()
        seconds, micros = int(now), int((now % 1) * 1_000_000)
        return f"{seconds}.M{micros}P{os.getpid()}Q{next(_deliveries)}.{self.host}"

    def _remove_stale_tmp(self, tmp):
        cutoff = time.time() - STALE_TMP_SECONDS
        for entry in os.scandir(tmp):
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
