"""virus/clamdscan: scan each message with ClamAV's clamd; refuse infected mail with the virus name.

After the message is received (data_post), the whole message (header and body, so clamd
decodes the MIME parts) is streamed to clamd with ``zINSTREAM`` in chunks straight from
the spool, never held in memory. clamd answers ``stream: OK`` or ``stream: <name> FOUND``:

- infected: ``554 5.7.1 Virus found: Eicar-Signature`` (``reject`` / ``reject_type`` as
  usual); with ``deny_viruses = no`` the message passes with ``X-Virus-Found: <name>``;
- clean: ``X-Virus-Checked: Checked by ClamAV on <me>`` is added;
- ``transaction.results.get("virus/clamdscan")`` fails with the virus name, or passes
  ``clean``.

Messages larger than ``max_size`` octets are not scanned (logged; skip ``size``
recorded). Set clamd's ``StreamMaxLength`` at least as large: clamd refuses a longer
stream, which counts as clamd being unavailable.

When clamd is down, hangs or answers nonsense, ``on_error`` decides: ``defer`` (451) or
``accept`` with ``X-Virus-Checker-Error: not scanned (clamd unavailable: ...)``; the
whole scan runs within ``scan_timeout`` seconds (keep it below ``timeout``).

Options:
  clamd_socket            host:port, [v6]:port or a unix socket path
                          (default /run/clamav/clamd.ctl, Debian's)
  max_size                largest message scanned, octets (default 26214400, clamd's 25M)
  deny_viruses            refuse infected mail; no: add X-Virus-Found (default yes)
  on_error, scan_timeout  see above (defer; 20 s)
  plus the standard reject, reject_type, loglevel, timeout

Example::

    [[virus/clamdscan]]
      clamd_socket = 127.0.0.1:3310
      max_size = 52428800
"""

import struct

from qpgevent import scanner
from qpgevent.plugin import DECLINED, Plugin

CHUNK = 1 << 16


class ClamdScan(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = [
        'clamd_socket = string(default="/run/clamav/clamd.ctl")',
        "max_size = integer(min=0, default=26214400)",
        "deny_viruses = boolean(default=yes)",
        *scanner.CONFIGSPEC,
    ]

    def setup(self):
        scanner.check_address(self.config["clamd_socket"])

    def hook_data_post(self, session):
        transaction = session.transaction
        if transaction.data_size > self.config["max_size"]:
            self.log.info("not scanned: %d octets is over max_size %d", transaction.data_size,
                          self.config["max_size"])
            transaction.results.add(self, skip="size")
            return DECLINED
        try:
            with scanner.scan_deadline(self.config["scan_timeout"], "clamd"):
                virus = self._scan(transaction)
        except scanner.ScannerError as error:
            return scanner.unavailable(self, session, "clamd", error, "X-Virus-Checker-Error")
        if virus is None:
            transaction.results.add(self, pass_="clean")
            transaction.headers.add("X-Virus-Checked", f"Checked by ClamAV on {session.me}")
            return DECLINED
        transaction.results.add(self, fail=virus)
        self.log.info("virus found: %s", virus)
        if not self.config["deny_viruses"]:
            transaction.headers.add("X-Virus-Found", virus)
            return DECLINED
        return self.reject(f"Virus found: {virus}", session)

    def _scan(self, transaction):
        with scanner.connect(self.config["clamd_socket"], self.config["scan_timeout"]) as sock:
            sock.sendall(b"zINSTREAM\0")
            for chunk in transaction.message_chunks(CHUNK):
                for start in range(0, len(chunk), CHUNK):  # the header comes as one piece
                    part = chunk[start:start + CHUNK]
                    sock.sendall(struct.pack("!L", len(part)) + part)
            sock.sendall(struct.pack("!L", 0))
            answer = scanner.read_all(sock, 4096)
        return parse_answer(answer)


def parse_answer(answer: bytes):
    """``stream: OK`` -> None; ``stream: <name> FOUND`` -> the name; anything else: ScannerError."""
    text = answer.rstrip(b"\0").decode("utf-8", "replace").strip()
    if text == "stream: OK":
        return None
    if text.startswith("stream: ") and text.endswith(" FOUND"):
        return text[len("stream: "):-len(" FOUND")]
    raise scanner.ScannerError(f"clamd answered {text[:200]!r}")
