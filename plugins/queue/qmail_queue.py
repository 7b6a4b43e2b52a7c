"""queue/qmail_queue: hand each message to qmail's qmail-queue (or notqmail's, or a wrapper).

qmail-queue(8) takes the message on descriptor 0 and then the envelope on descriptor 1:
``F`` + the sender + ``\\0``, then ``T`` + a recipient + ``\\0`` for each recipient, then
one more ``\\0``. The message is streamed from the spool (never read whole into memory)
with LF line endings, as qmail stores mail; the sender of a bounce is empty (``F\\0``).

Its exit status is the answer, as qmail-queue(8) documents it:

  0        queued: ``250 2.0.0 Queued``, and only then
  11-40    permanent: ``554 5.3.0 <why>`` (11 address too long, 31 refused for good)
  others   temporary: ``451 4.3.0 <why>`` (51 out of memory, 52 timeout, 53 write error or
           disk full, 54 cannot read the message or envelope, 55 cannot read a config
           file, 56 network trouble, 61-66 trouble with the queue, 71-74 the mail server
           refused for now or could not be reached, 81 internal bug, 91 envelope format
           error...)

The reason is the first line the program wrote on its standard error (qmail-queue writes
none; wrappers such as simscan or qmail-qfilter may), else the meaning of the code above.

When the program cannot be started, is killed by a signal, or is still running after
``call_timeout`` seconds (it is then killed with its process group), ``on_failure``
decides: ``tempfail`` (default: ``451 4.3.0 qmail-queue unavailable, try again later``)
or ``reject``. A program killed that late may have queued the message already: the
client's retry then duplicates it, which is better than losing it. There is no
``accept``: a 250 for a message nobody queued would lose it.

Options:
  program       the qmail-queue command line, split like a shell would, no shell
                involved (default /var/qmail/bin/qmail-queue)
  on_failure    tempfail (default) or reject
  call_timeout  seconds the program may take (default 120)

Example::

    [[queue/qmail_queue]]
      program = /var/qmail/bin/qmail-queue
"""

import os
import shlex

import gevent
from gevent import subprocess
from gevent.fileobject import FileObjectPosix

from qpgevent import external
from qpgevent.plugin import DENY, DENYSOFT, OK, Plugin

#: What qmail-queue's exit codes mean (qmail-queue(8)); the reply text when it said nothing.
MEANINGS = {
    11: "address too long", 31: "mail server permanently refuses the message",
    51: "out of memory", 52: "timeout", 53: "write error or disk full", 54: "unable to read the message or envelope",
    55: "unable to read a configuration file", 56: "problem making a network connection",
    61: "problem with the qmail home directory", 62: "problem with the queue directory",
    63: "problem with queue/pid", 64: "problem with queue/mess", 65: "problem with queue/intd",
    66: "problem with queue/todo", 71: "mail server temporarily refuses the message",
    72: "connection to mail server timed out", 73: "connection to mail server rejected",
    74: "communication with mail server failed", 81: "internal bug", 91: "envelope format error",
}


def envelope(sender, recipients):
    """The envelope of qmail-queue(8): ``F``sender``\\0``, ``T``rcpt``\\0`` each, ``\\0``."""
    parts = [b"F" + sender.encode("utf-8") + b"\0"]
    parts += [b"T" + recipient.encode("utf-8") + b"\0" for recipient in recipients]
    return b"".join(parts) + b"\0"


class QmailQueue(Plugin):
    configspec = [
        'program = string(default="/var/qmail/bin/qmail-queue")',
        *external.configspec(call_timeout=120, modes=("tempfail", "reject")),
    ]

    def setup(self):
        try:
            self.argv = shlex.split(self.config["program"])
        except ValueError as error:
            raise ValueError(f"program: {error}") from None
        if not self.argv:
            raise ValueError("program is empty")
        if self.timeout is None:
            self.timeout = self.config["call_timeout"] + 10  # our own timer fires first

    def hook_queue(self, session):
        transaction = session.transaction
        sender = transaction.sender
        data = envelope(sender.address if sender and not sender.is_null else "",
                        [recipient.address for recipient in transaction.recipients])
        status, said = self._run(transaction, data)
        if isinstance(status, Exception):
            return external.failed(self, "qmail-queue", status)
        if status == 0:
            self.log.info("queued by %s for %d recipient(s)", self.argv[0], len(transaction.recipients))
            return OK, "2.0.0 Queued"
        why = said or MEANINGS.get(status, f"qmail-queue exit code {status}")
        self.log.warning("%s exited with %d: %s", self.argv[0], status, why)
        if 11 <= status <= 40:
            return DENY, f"554 5.3.0 {why}"
        return DENYSOFT, f"451 4.3.0 {why}"

    def _run(self, transaction, data):
        """(exit status, first line of its standard error), or (an exception, "") when it failed."""
        envelope_in, envelope_out = os.pipe()
        try:
            process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=envelope_in,
                                       stderr=subprocess.PIPE, start_new_session=True)
        except OSError as error:
            os.close(envelope_out)
            return OSError(f"cannot run {self.argv[0]}: {error}"), ""
        finally:
            os.close(envelope_in)  # the child's descriptor 1 now
        errors = bytearray()
        reader = gevent.spawn(external.drain_output, process.stderr, errors)
        status = None
        envelope_pipe = FileObjectPosix(envelope_out, "wb", buffering=0)
        try:
            with gevent.Timeout(self.config["call_timeout"], False):
                self._feed(process.stdin, envelope_pipe, transaction, data)
                status = process.wait()
                reader.join()
        finally:
            _close_quietly(envelope_pipe)
            if status is None:  # timed out, or our hook was cancelled: leave nothing behind
                external.kill_group(process)
                reader.kill()
        if status is None:
            return TimeoutError(f"still running after {self.config['call_timeout']}s, killed"), ""
        if status < 0:
            return OSError(f"killed by signal {-status}"), ""
        return status, external.first_line(errors)

    def _feed(self, stdin, envelope_pipe, transaction, data):
        try:
            for chunk in external.unix_line_ends(transaction.message_chunks()):
                stdin.write(chunk)
            stdin.close()
            envelope_pipe.write(data)
            envelope_pipe.close()
        except BrokenPipeError:
            # It stopped reading (refused early, or died): its exit status says which.
            self.log.info("%s closed its input before the end", self.argv[0])


def _close_quietly(stream):
    try:
        stream.close()
    except BrokenPipeError:
        pass  # the program is gone; its exit status tells
