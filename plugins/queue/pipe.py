"""queue/pipe: hand each message to a command on its standard input, e.g. Postfix's sendmail.

The command runs without a shell: ``command`` is split like a shell would (quotes work,
nothing else does), then macros are expanded in each argument, Postfix pipe(8) style:

  ${sender}            the envelope sender ("" for the null sender; see ``null_sender``)
  ${recipient}         each recipient: an argument holding it is repeated once per
                       recipient, so ``-- ${recipient}`` gives ``-- a@x b@y``
  ${user}, ${domain}   the local part / domain of each recipient (repeated likewise)
  ${client_address}, ${client_helo}, ${queue_id}, ${size}

The message goes to the command's standard input streamed from the spool (never read
whole into memory), with LF line endings (``line_ending = crlf`` keeps CRLF). Its exit
status decides:

  0        accepted: ``250``, once the command is done (it must have stored the message
           safely by then: sendmail has, in Postfix's queue)
  75       EX_TEMPFAIL: ``451``, the client retries
  other    ``554`` (``failure = temp`` makes it 451); killed by a signal, or still running
           after ``command_timeout`` (then it is killed, with its process group): 451.
           A command killed that late may have done its work already: the client's
           retry then duplicates the message, which is better than losing it

The first line of what the command printed (standard output and error together, 4 KiB at
most kept) is the text of a refusal, and is logged.

Options:
  command          the command line (required), e.g.
                   ``/usr/sbin/sendmail -i -f ${sender} -- ${recipient}``
  command_timeout  seconds the command may take (default 60)
  failure          perm (default) or temp: what an exit status other than 0 and 75 means
  line_ending      lf (default) or crlf
  null_sender      what ${sender} becomes for the null sender <> (default: empty)
  user             run the command as this user (default: as the server)

Example::

    [[queue/pipe]]
      command = /usr/sbin/sendmail -i -f ${sender} -- ${recipient}
"""

import re
import shlex

import gevent
from gevent import subprocess

from qpgevent import external
from qpgevent.plugin import DENY, DENYSOFT, OK, Plugin

EX_TEMPFAIL = 75
_MACRO = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_PER_RECIPIENT = {"recipient", "user", "domain"}
_KNOWN = _PER_RECIPIENT | {"sender", "client_address", "client_helo", "queue_id", "size"}


class Pipe(Plugin):
    configspec = """
    command = string()
    command_timeout = float(min=0.01, default=60)
    failure = option("perm", "temp", default="perm")
    line_ending = option("lf", "crlf", default="lf")
    null_sender = string(default="")
    user = string(default="")
    """

    def setup(self):
        try:
            self.argv = shlex.split(self.config["command"])
        except ValueError as error:
            raise ValueError(f"command: {error}") from None
        if not self.argv:
            raise ValueError("command is empty")
        unknown = sorted({name for arg in self.argv for pair in _MACRO.findall(arg)
                          for name in pair if name} - _KNOWN)
        if unknown:
            raise ValueError(f"command: unknown macro(s) {', '.join(unknown)} (known: {', '.join(sorted(_KNOWN))})")
        if self.timeout is None:
            self.timeout = self.config["command_timeout"] + 10  # our own timer fires first

    def hook_queue(self, session):
        argv = self.expand(session)
        transaction = session.transaction
        output = bytearray()
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, user=self.config["user"] or None)
        except OSError as error:
            self.log.error("cannot run %s: %s", argv[0], error)
            return DENYSOFT, "4.3.0 cannot queue the message now, try again later"
        reader = gevent.spawn(external.drain_output, process.stdout, output)
        status = None
        try:
            with gevent.Timeout(self.config["command_timeout"], False):
                self._feed(process.stdin, transaction)
                status = process.wait()
                reader.join()
        finally:
            if status is None:  # timed out, or our hook was cancelled: leave nothing behind
                external.kill_group(process)
                reader.kill()
        text = external.first_line(output)
        if status is None:
            self.log.warning("%s still running after %ss: killed", argv[0], self.config["command_timeout"])
            return DENYSOFT, "4.3.0 queueing took too long, try again later"
        if status == 0:
            self.log.info("%s accepted the message%s", argv[0], f": {text}" if text else "")
            return OK, "Queued"
        self.log.warning("%s exited with status %s: %s", argv[0], status, text or "(no output)")
        if status == EX_TEMPFAIL or status < 0 or self.config["failure"] == "temp":
            return DENYSOFT, f"4.3.0 {text or 'temporary failure, try again later'}"
        return DENY, f"5.3.0 {text or 'message refused'}"

    def expand(self, session):
        """The argv for this transaction (macros expanded; no shell ever sees it)."""
        transaction, connection = session.transaction, session.connection
        sender = transaction.sender
        values = {
            "sender": sender.address if sender and not sender.is_null else self.config["null_sender"],
            "client_address": connection.remote_ip,
            "client_helo": connection.hello_host or "",
            "queue_id": transaction.id,
            "size": str(transaction.data_size),
        }
        argv = []
        for arg in self.argv:
            names = {name for pair in _MACRO.findall(arg) for name in pair if name}
            if names & _PER_RECIPIENT:
                for recipient in transaction.recipients:
                    each = dict(values, recipient=recipient.address, user=recipient.user,
                                domain=recipient.host)
                    argv.append(_substitute(arg, each))
            else:
                argv.append(_substitute(arg, values))
        return argv

    def _feed(self, stdin, transaction):
        crlf = self.config["line_ending"] == "crlf"
        chunks = transaction.message_chunks()
        try:
            for chunk in (chunks if crlf else external.unix_line_ends(chunks)):
                stdin.write(chunk)
            stdin.close()
        except BrokenPipeError:
            # The command stopped reading early; its exit status says whether that is fine.
            self.log.info("the command closed its input before the end of the message")


def _substitute(arg, values):
    return _MACRO.sub(lambda m: values[m.group(1) or m.group(2)], arg)
