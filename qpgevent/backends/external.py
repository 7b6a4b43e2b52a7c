"""What plugins that ask an outside service or run a program share: what to answer when it fails.

A service (rspamd, a Postfix policy server, a qmail-queue program) has *failed* when it
refuses the connection, does not answer within the plugin's ``call_timeout``, closes in
the middle of an answer, or answers something that is not its protocol. The plugin's
``on_failure`` option then decides, and the failure is logged with its reason:

  tempfail  (default) ``451 4.3.0 <service> unavailable, try again later``: the client
            keeps the message and retries; nothing gets past a check that was not made
  accept    go on as if the service had no opinion (the check is skipped)
  reject    ``554 5.3.0 <service> unavailable``: refuse for good (rarely what you want)

Keep ``call_timeout`` below the plugin's ``timeout`` (the plugins make it so when
``timeout`` is not set), so that ``on_failure``, not the hook runner's generic 451, decides.

For programs (queue/pipe, queue/qmail_queue): CRLF to LF while streaming, reading their
output without ever blocking them, killing them with their children.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Iterator
from typing import Any

from ..plugin import DECLINED, DENY, DENYSOFT

__all__ = ["CONFIGSPEC", "configspec", "failed", "unix_line_ends", "drain_output", "kill_group", "first_line"]

#: Output of a program kept for the logs and the reply text.
OUTPUT_KEPT = 4096


def configspec(call_timeout: float = 10, modes: tuple[str, ...] = ("tempfail", "accept", "reject")) -> list[str]:
    """The ``on_failure`` and ``call_timeout`` options, with this plugin's default and choices."""
    choices = ", ".join(f'"{mode}"' for mode in modes)
    return [f'on_failure = option({choices}, default="tempfail")',
            f"call_timeout = float(min=0.01, default={call_timeout})"]


CONFIGSPEC = configspec()


def failed(plugin: Any, service: str, error: Exception) -> Any:
    """The verdict for a call to ``service`` that failed with ``error``, as ``on_failure`` says."""
    mode = plugin.config["on_failure"]
    plugin.log.warning("%s failed (%s), on_failure = %s", service, error, mode)
    if mode == "accept":
        return DECLINED
    if mode == "reject":
        return DENY, f"554 5.3.0 {service} unavailable"
    return DENYSOFT, f"451 4.3.0 {service} unavailable, try again later"


def unix_line_ends(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """CRLF to LF, streaming (a CR at the end of a chunk waits for the next one)."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        carry = b"\r" if data.endswith(b"\r") else b""
        if carry:
            data = data[:-1]
        yield data.replace(b"\r\n", b"\n")
    if carry:
        yield carry


def drain_output(stream: Any, output: bytearray) -> None:
    """Read a program's output to its end (so it never blocks on a full pipe); keep 4 KiB."""
    while True:
        data = stream.read(OUTPUT_KEPT)
        if not data:
            return
        if len(output) < OUTPUT_KEPT:
            output += data[:OUTPUT_KEPT - len(output)]


def kill_group(process: Any) -> None:
    """Kill a program started with ``start_new_session=True``, and its children; reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def first_line(output: bytes | bytearray) -> str:
    """The first non-empty line of a program's output, printable, at most 200 characters."""
    for line in bytes(output).decode("utf-8", "replace").splitlines():
        line = "".join(c if c.isprintable() else "?" for c in line.strip())
        if line:
            return line[:200]
    return ""
