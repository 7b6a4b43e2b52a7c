"""queue/maildir: deliver each message into a Maildir, safely, before saying 250.

Written the Maildir way: into ``tmp/``, flushed to disk with fsync, renamed into ``new/``,
and the ``new/`` folder fsynced so the link itself survives a crash. Only then does the
client get ``250 2.0.0 Queued as <file name>``. A crash at any point leaves either nothing
in ``new/`` or the whole message; a half-written file can only ever be in ``tmp/``
(files there older than 36 hours are removed at start, as the Maildir convention says).

Sessions that finish together share the fsync of ``new/`` (group commit): one fsync
covers every message renamed in before it began, each client is answered after the fsync
that covers its file, and a lone session waits for nobody. If that fsync fails, every
message it was to cover is taken back out of ``new/`` (and ``new/`` fsynced again, so that a
crash cannot bring it back) and refused with 451, so that the retries deliver each message
once. The files themselves are shared the same way: the small messages that finish together
are flushed by one ``syncfs`` of their file system before any of them is renamed, and their
``new/`` then joins the next syncfs, with the files written meanwhile (``syncfs``, below: a
flush of the disk's cache per batch, not two per message). A syncfs that fails refuses every
message it was to cover, as a failed fsync does.

A disk that holds an fsync past the hook's ``timeout`` (a sick disk, a stalled network file
system): a message still in ``tmp/`` gets its 451 at once and never enters ``new/``, not
even once the disk lets the fsync go (its file is removed then), and the other sessions are
served meanwhile; a message already renamed into ``new/`` (its fsync of ``new/`` held) is
taken back out before its 451, which therefore waits for the disk. No 451 is sent while the
message is in ``new/``.

On Linux the fsyncs of a small message (up to 256 KiB, one Maildir) are handed to the
kernel (Linux AIO: the kernel runs the same fsync and tells the event loop when it is done),
not to a worker thread, whose hand-overs of the interpreter lock cost more CPU than the fsync
itself; elsewhere, or where the system refuses AIO, worker threads do them, as before.
Not on a FUSE file system (fuse-overlayfs, as rootless containers often run on; sshfs;
virtiofs: checked once per Maildir): there the kernel locks ``new/`` while its fsync runs,
and a rename into it waits, so a worker thread writes, fsyncs and renames each message, and
a disk that holds that fsync stalls the sessions waiting for it, never the others.

The file holds ``Return-Path: <sender>`` (RFC 5321 4.4: added at final delivery), then
the message as received, our Received header on top, CRLF line endings as sent.

One Maildir for everything (``path``), or one per recipient (``mailbox``, for virtual
users): ``mailbox = %d/%l`` puts bob@example.test's mail in ``<path>/example.test/bob/``.
  %d  the domain        %l  the local part        %u  the local part up to a ``+``
  %%  a percent sign
Both are lower-cased; characters other than letters, digits and ``.-_+=`` become
``%XX``, and a part may not start with a dot, so no address can name a path outside
``path``. The bare ``<postmaster>`` has the server's own name as its domain.

Several recipients, one file: the message is written and fsynced once, in the first
recipient's ``tmp/``, then hard-linked into every recipient's ``new/`` (renamed into the
last one), and each ``new/`` folder is fsynced; then the client gets 250.
Linking keeps the disk work at one copy however many recipients there are (a message to
200 people at a domain is written once, not 200 times) and the copies cannot differ. The
price: the copies share their bytes, so there is no per-recipient ``Delivered-To``
header (unless ``delivered_to``, below), and Maildirs on different file systems cannot share; there (``EXDEV``), or past
the file system's link limit (``EMLINK``), that recipient gets a copy of its own, written
and fsynced the same way. Recipients that name the same Maildir get one file.
A crash or an error half-way leaves the message in some of the Maildirs and the client
without a 250: its retry duplicates the message there, it never loses it (RFC 5321 6.1).
A full file system (ENOSPC, EDQUOT, EFBIG) answers ``452 4.3.1``, any other write error
``451 4.3.0``; what was written is removed either way.
A recipient an earlier queue plugin already gave a result of its own (in
``transaction.notes["recipient_results"]``, as on an LMTP listener: docs/lmtp.md) is
not delivered here. On an LMTP listener each Maildir is written on its own, and one that
fails (a 4xx, as above) is the result of its recipients only: the others get their 250.

Options:
  path     the Maildir, or the root of the per-recipient Maildirs (default
           ``spool/Maildir``, relative to the ini file); created if missing
  mailbox  the per-recipient sub-path under ``path`` (default: empty, one Maildir)
  create   create a recipient's Maildir on first delivery (default yes). With ``no``, a
           recipient whose Maildir does not exist is refused at RCPT time with
           ``550 5.1.1`` (list this plugin before rcpt_ok); if it vanishes before the
           message ends, the message gets 451
  fsync    fsync files and folders before answering (default true; turn off only to
           measure, never in production). Off, messages up to 256 KiB are written in the
           session's greenlet instead of a worker thread (cheaper than the hand-off)
  syncfs   small messages that finish together share one ``syncfs`` of their file system
           instead of one fsync each (default yes; ext4, XFS and btrfs on Linux 5.8 or
           later, and while the system has under 64 MiB waiting to be written: syncfs
           writes others' files too). ``no``: each file fsynced on its own
  delivered_to  add ``Delivered-To: <recipient>`` on top of each file, as Postfix's and
           qmail's local delivery do, and refuse a message that already carries a
           ``Delivered-To:`` naming one of its recipients: ``554 5.4.6`` (a mail loop, say
           a forward that comes back), nothing delivered (default no). Each Maildir then
           gets a file of its own, naming only its own recipients (no hard links)

Example::

    [[queue/maildir]]
      path = /var/mail/virtual
      mailbox = %d/%l
      create = no
"""

import errno
import functools
import os
import re

from qpgevent import disk, maildir
from qpgevent.plugin import DECLINED, DENY, DENYSOFT, OK, Plugin

#: With fsync = no, messages up to this size are written without a worker thread.
INLINE_BYTES = 256 * 1024
_PATTERN = re.compile(r"%(.)")


class Maildir(Plugin):
    configspec = """
    path = path(default="spool/Maildir")
    mailbox = string(default="")
    create = boolean(default=True)
    fsync = boolean(default=True)
    syncfs = boolean(default=True)
    delivered_to = boolean(default=False)
    """

    def setup(self):
        pattern = self.config["mailbox"].strip().strip("/")
        bad = sorted({m for m in _PATTERN.findall(pattern) if m not in "dlu%"})
        if bad:
            raise ValueError(f"mailbox: unknown %{', %'.join(bad)} (known: %d %l %u %%)")
        if pattern and not _PATTERN.search(pattern.replace("%%", "")):
            raise ValueError("mailbox: name a part of the address (%d, %l or %u)")
        self.pattern = pattern
        root = self.config["path"]
        if not pattern or self.config["create"]:
            os.makedirs(root, mode=0o700, exist_ok=True)
        if not pattern:
            maildir.make(root)
            maildir.remove_stale_tmp(os.path.join(root, "tmp"))
        self.host = maildir.this_host()
        self.folders = disk.FolderSync()
        self.files = disk.FileSystemSync(share=self.config["syncfs"])
        #: Per Maildir, once: whether the event loop may create and rename in it (not on FUSE).
        self._loop_may_rename = functools.lru_cache(maxsize=4096)(lambda mailbox: not disk.on_fuse(mailbox))
        self._storing = 0  #: deliveries under way in this worker (without AIO a lone one takes one thread trip)

    def hook_rcpt(self, session, recipient, params):
        if not self.pattern or self.config["create"]:
            return DECLINED
        if os.path.isdir(os.path.join(self.mailbox(recipient, session.me), "new")):
            return DECLINED  # it exists; whether we may take mail for it is rcpt_ok's call
        return DENY, "5.1.1 mailbox unavailable"

    def mailbox(self, recipient, me):
        """The Maildir of ``recipient``: ``path``, or ``path/<mailbox pattern>``."""
        if not self.pattern:
            return self.config["path"]
        domain = (recipient.host or me).lower()
        local = recipient.user.lower()
        parts = {"d": domain, "l": local, "u": local.split("+", 1)[0], "%": "%"}
        # Each value is made safe on its own (no "/", no leading dot); the pattern around
        # them is the operator's.
        relative = _PATTERN.sub(lambda m: "%" if m.group(1) == "%" else maildir.safe_part(parts[m.group(1)]),
                                self.pattern)
        return os.path.join(self.config["path"], *[p for p in relative.split("/") if p])

    def hook_queue(self, session):
        name = maildir.unique_name(self.host)
        transaction = session.transaction
        failed = transaction.notes.get("recipient_results") or {}
        recipients = [r for r in transaction.recipients or [] if r.address not in failed]
        if transaction.recipients and not recipients:
            return OK, "nothing to deliver: every recipient has a result of its own"
        mailboxes = list(dict.fromkeys(self.mailbox(r, session.me) for r in recipients))
        if not mailboxes:
            mailboxes = [self.config["path"]]
        batches = [(mailboxes, b"")]
        if self.config["delivered_to"]:
            looped = _looped(transaction)
            if looped:
                self.log.warning("mail loop: the message was delivered to %s before", looped)
                return DENY, f"554 5.4.6 mail loop: this message was delivered to {looped} before"
            batches = [([mailbox], b"".join(f"Delivered-To: {r.address}\r\n".encode("utf-8")
                                             for r in recipients if self.mailbox(r, session.me) == mailbox))
                       for mailbox in mailboxes]
        results = transaction.notes.get("recipient_results")
        if results is not None and len(mailboxes) > 1:
            return self._each_mailbox(session, name, recipients, results, batches)
        refusal = self._store(transaction, name, batches)
        if refusal is not None:
            return refusal
        if len(mailboxes) > 1:
            self.log.info("delivered %s to %d Maildirs", name, len(mailboxes))
        return OK, f"Queued as {name}"

    def _each_mailbox(self, session, name, recipients, results, batches):
        """LMTP: each Maildir on its own, a failure the result of its recipients only.

        The same unique name in every Maildir, as the linked copies have."""
        if len(batches) == 1:
            batches = [([mailbox], b"") for mailbox in batches[0][0]]
        stored = 0
        for batch in batches:
            refusal = self._store(session.transaction, name, [batch])
            if refusal is None:
                stored += 1
                continue
            for recipient in recipients:
                if self.mailbox(recipient, session.me) == batch[0][0]:
                    results[recipient.address] = refusal
        return OK, f"Queued as {name}" if stored else "nothing delivered: every Maildir failed"

    def _store(self, transaction, name, batches):
        """Deliver ``batches`` all or nothing: None, or the refusal to give."""
        self._storing += 1
        try:
            return self._store_now(transaction, name, batches)
        finally:
            self._storing -= 1

    def _store_now(self, transaction, name, batches):
        try:
            if (self.config["fsync"] and transaction.data_size <= INLINE_BYTES and _one_file(batches)
                    and (disk.without_threads() or self._storing > 1)
                    and self._loop_may_rename(batches[0][0][0])):
                # Without AIO, a lone delivery is cheaper in one trip to a thread (below); on
                # FUSE a rename into new/ may wait for the disk: a thread does every delivery.
                (mailboxes, prefix), = batches
                delivered, unsynced = self._deliver_small(transaction, name, mailboxes[0], prefix)
                # new/ joins the sync of the files written meanwhile (one syncfs for both).
                shared = self.files.sync_folders
            elif self.config["fsync"] or transaction.data_size > INLINE_BYTES:
                # The hook's timeout may give up on the thread: before the rename into new/
                # the thread stops there; after it, the 4xx waits until the message is taken
                # back out (never both a 4xx and a delivery).
                delivered, unsynced = disk.run_blocking_undoable(self._deliver_all, _take_back_delivery,
                                                                 transaction, name, batches)
                shared = self.folders.fsync
            else:
                # No fsync and a small message: the write lands in the page cache in
                # microseconds, less than the trip to a worker thread and back costs
                # (docs/benchmarks.md, "Profile").
                delivered, unsynced = self._deliver_all(transaction, name, batches)
                shared = self.folders.fsync
            if unsynced:
                self._fsync_new_folders(delivered, unsynced, shared)
        except _Missing as missing:
            self.log.warning("Maildir %s is gone (create = no)", missing)
            return DENYSOFT, "4.2.1 mailbox unavailable, try again later"
        except OSError as error:
            self.log.error("cannot write %s: %s", name, error)
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # RFC 3463 X.3.1
                return DENYSOFT, "452 4.3.1 insufficient system storage, try again later"
            return DENYSOFT, "4.3.0 cannot store the message right now, try again later"
        return None

    def _fsync_new_folders(self, delivered, folders, shared):
        """fsync new/ folders, shared with the sessions that finish alongside (group commit):
        ``shared`` is ``self.folders.fsync`` (per folder) or ``self.files.sync_folders``."""
        try:
            shared(folders)
        except BaseException:
            # A failed fsync, or the hook's timeout: the client will hear 4xx, so the
            # message must not stay where a crash could bring it back. The fsync after
            # the take-back is shared too, with the others taken back alongside.
            disk.run_blocking(maildir.take_back, delivered, False)
            try:
                shared(folders)
            except OSError as error:
                self.log.error("taking back %s: the fsync of new/ failed: %s", os.path.basename(delivered[0]), error)
            raise

    def _deliver_small(self, transaction, name, mailbox, prefix):
        """One small message into one Maildir, durably, from the session's greenlet.

        A worker thread hands the GIL back and forth around every system call it makes,
        and each hand-over is futex calls on both sides: the whole delivery in a thread
        cost about 60 futex calls per message at concurrency 100, the fsync alone in a
        thread 24. So the writes land in the page cache from the greenlet (microseconds,
        as with fsync off), the fsync is handed to the kernel (``disk.fsync_file``: Linux
        AIO, no thread of ours; a worker thread where that is not to be had), and the
        rename follows from the greenlet: the order is the Maildir's, file fsynced, then
        renamed, then ``new/`` fsynced (with the sessions that finish alongside) before
        the 250. The new/ paths, and the folders left to fsync.
        """
        if not os.path.isdir(os.path.join(mailbox, "new")):
            if not self.config["create"]:
                raise _Missing(mailbox)
            maildir.make(mailbox)
        tmp, target = os.path.join(mailbox, "tmp", name), os.path.join(mailbox, "new", name)
        fd = maildir.write(tmp, transaction, prefix, self.config["fsync"], keep_open=True)
        try:
            # Interrupted (the hook's timeout, a BaseException) while a sick disk holds the
            # fsync: the file is closed and removed once the kernel is done with it (before,
            # both could block the whole process on the file's lock). It is only in tmp/: the
            # client hears 4xx at once.
            self.files.sync_file(fd, abandoned=lambda: maildir.close_and_remove(fd, tmp))
        except Exception:  # the fsync failed (or never started): nothing holds the file
            maildir.close_and_remove(fd, tmp)
            raise
        try:
            disk.close_file(fd)
            os.rename(tmp, target)
        except BaseException:
            maildir.remove(tmp)
            raise
        return [target], [os.path.join(mailbox, "new")]

    # -- in a worker thread (inline for small messages when fsync is off) ---------
    def _deliver_all(self, transaction, name, batches):
        """``_deliver`` for each (mailboxes, header lines of their own); all or nothing."""
        delivered, unsynced = [], []
        try:
            for mailboxes, prefix in batches:
                paths, folders = self._deliver(transaction, name, mailboxes, prefix)
                delivered += paths
                unsynced += folders
        except BaseException:
            maildir.take_back(delivered, self.config["fsync"])
            raise
        return delivered, unsynced

    def _deliver(self, transaction, name, mailboxes, prefix=b""):
        """Write once, fsync, into every new/, fsync each new/ unless others are at it.

        The new/ paths, and the new/ folders left to fsync together with other sessions.
        """
        for mailbox in mailboxes:
            if not os.path.isdir(os.path.join(mailbox, "new")):
                if not self.config["create"]:
                    raise _Missing(mailbox)
                maildir.make(mailbox)
        first = os.path.join(mailboxes[0], "tmp", name)
        maildir.write(first, transaction, prefix, self.config["fsync"])
        delivered = []
        try:
            # Past here the message can be seen in new/: a hook that timed out meanwhile stops
            # us here (disk.Abandoned), or waits for us and the take-back before its 4xx.
            disk.point_of_no_return()
            # Hard links into all new/ folders but the last, and a rename into the last:
            # with one Maildir, that is the classic tmp/ -> new/ rename.
            for i, mailbox in enumerate(mailboxes):
                target = os.path.join(mailbox, "new", name)
                try:
                    (os.rename if i == len(mailboxes) - 1 else os.link)(first, target)
                except OSError as error:
                    if error.errno not in (errno.EXDEV, errno.EMLINK):
                        raise
                    self._copy_into(mailbox, name, transaction, prefix)
                delivered.append(target)
            unsynced = []
            if self.config["fsync"]:
                unsynced = [folder for folder in dict.fromkeys(os.path.dirname(t) for t in delivered)
                            if not self.folders.fsync_if_alone(folder)]
        except BaseException:
            maildir.take_back(delivered, self.config["fsync"])
            raise
        finally:
            if os.path.lexists(first):
                os.unlink(first)  # new/ holds the message now, or nothing does
        return delivered, unsynced

    def _copy_into(self, mailbox, name, transaction, prefix):
        """A copy of its own for a Maildir we cannot link into (another file system)."""
        tmp = os.path.join(mailbox, "tmp", name)
        maildir.write(tmp, transaction, prefix, self.config["fsync"])
        try:
            os.rename(tmp, os.path.join(mailbox, "new", name))
        except BaseException:
            os.unlink(tmp)
            raise


class _Missing(Exception):
    """A recipient's Maildir does not exist and may not be created."""


def _looped(transaction):
    """A recipient the message already names in a ``Delivered-To:`` header, or None."""
    seen = {value.strip().strip("<>").lower() for value in transaction.headers.get_all("Delivered-To")}
    for recipient in transaction.recipients:
        address = recipient.address
        if address.lower() in seen:
            return address
    return None


def _take_back_delivery(result):
    maildir.take_back(result[0])


def _one_file(batches):
    """One Maildir, one file: no links, no copies of its own."""
    return len(batches) == 1 and len(batches[0][0]) == 1
