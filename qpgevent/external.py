"""What plugins that ask an outside service share: what to answer when it cannot answer.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .plugin import DECLINED, DENY, DENYSOFT

__all__ = ["CONFIGSPEC", "failed", "unix_line_ends"]

CONFIGSPEC = [
    'on_failure = option("tempfail", "accept", "reject", default="tempfail")',
    "call_timeout = float(min=0.01, default=10)",
]


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
