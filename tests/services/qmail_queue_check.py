"""A qmail-queue for tests: checks the fd protocol strictly, stores what it was given, exits as told.

    qmail_queue_check.py OUTDIR [EXIT_CODE] [--hang] [--die] [--say TEXT]

Reads the message on descriptor 0 to its end, then the envelope on descriptor 1 to its
end, as qmail-queue(8) does. The envelope must be exactly ``F<sender>\\0``, one or more
``T<recipient>\\0`` (recipients non-empty, an ``@`` in each, no control characters),
then ``\\0``; anything else exits 91 (envelope format error), as qmail-queue does. A
message with a CR LF line end exits 91 too: qmail stores LF-only mail, so we must send it
that way. With EXIT_CODE 0 (the default) it writes ``N.msg`` and ``N.env`` into OUTDIR
(each via a temporary name and a rename, so a reader never sees half a file) and exits
0: queued. Another EXIT_CODE exits with it and stores nothing. ``--say TEXT`` writes TEXT
on standard error first. ``--hang`` reads the message and then never reads the
envelope (stuck); ``--die`` kills itself with SIGKILL after reading the message.
Not a fake of a service: qmail is not packaged in Debian, and this is the protocol's
other end, written from qmail-queue(8).
"""

import os
import re
import signal
import sys
import time

ENVELOPE = re.compile(rb"F([^\0]*)\0((?:T[^\0]+\0)+)\0", re.S)


def read_all(fd):
    chunks = []
    while True:
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def main(argv):
    outdir, rest = argv[1], argv[2:]
    code = int(rest[0]) if rest and rest[0].isdigit() else 0
    message = read_all(0)
    if "--say" in rest:
        sys.stderr.write(rest[rest.index("--say") + 1] + "\n")
        sys.stderr.flush()
    if "--die" in rest:
        os.kill(os.getpid(), signal.SIGKILL)
    while "--hang" in rest:  # stuck: the caller's timeout must end it
        time.sleep(3600)
    envelope = read_all(1)
    match = ENVELOPE.fullmatch(envelope)
    if not match or b"\r\n" in message:
        return 91
    sender, recipients = match.group(1), match.group(2)[:-1].split(b"\0")
    addresses = [sender] + [r[1:] for r in recipients] if sender else [r[1:] for r in recipients]
    if any(b"@" not in a or re.search(rb"[\x00-\x1f\x7f]", a) for a in addresses):
        return 91
    if code:
        return code
    name = f"{time.time_ns()}.{os.getpid()}"
    for suffix, data in (("msg", message), ("env", envelope)):
        temporary = os.path.join(outdir, f".{name}.{suffix}")
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.rename(temporary, os.path.join(outdir, f"{name}.{suffix}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
