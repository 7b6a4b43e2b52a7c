"""The one Authentication-Results header (RFC 8601) of a message, gathered from the plugins.

Authentication plugins (sender_permitted_from, dkim, dmarc) do not write the header
themselves: each calls ``record(transaction, method, result, ...)``; the session, once
every data_post plugin has run, calls ``finish(transaction, connection, me)``, which

1. removes every Authentication-Results field the message came with that claims our
   authserv-id (``me``): RFC 8601 5 — a forged "spf=pass" from outside must not be
   trusted by a mail client that trusts us; fields of other authserv-ids stay;
2. prepends ONE field with every recorded result, in the order recorded, plus
   ``iprev`` when a connection result has ``iprev`` evidence (fcrdns records it), e.g.::

       Authentication-Results: mx.example.test; iprev=pass policy.iprev=192.0.2.1;
           spf=pass smtp.mailfrom=alice@sender.test;
           dkim=pass header.d=sender.test header.s=sel header.b=Ab12Cd34;
           dmarc=pass header.from=sender.test

Why the session and not a last plugin: "one header, after all the others recorded" is an
ordering rule, and a rule that depends on the plugin list being written right breaks
silently; removing forged fields must happen even when no authentication plugin runs.
Nothing is prepended when nothing was recorded.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["record", "results", "finish", "header_value", "authserv_id"]

NOTE = "authentication_results"
HEADER = "Authentication-Results"
_PLAIN = re.compile(r"^[A-Za-z0-9.@_+=/:-]+$")


def record(transaction: Any, method: str, result: str, reason: str | None = None,
           **properties: str) -> None:
    """Note one result: ``record(t, "spf", "pass", smtp_mailfrom="a@b.test")``.

    Property names use ``_`` for the dot: ``header_d`` is ``header.d``.
    """
    entry = {"method": method, "result": result, "reason": reason,
             "properties": {name.replace("_", ".", 1): value for name, value in properties.items()
                            if value is not None}}
    transaction.notes.setdefault(NOTE, []).append(entry)


def results(transaction: Any) -> list[dict[str, Any]]:
    return list(transaction.notes.get(NOTE, []))


def _quote(value: str) -> str:
    if _PLAIN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _entry_text(entry: dict[str, Any]) -> str:
    parts = [f"{entry['method']}={entry['result']}"]
    if entry.get("reason"):
        parts.append(f"reason={_quote(entry['reason'])}")
    parts += [f"{name}={_quote(str(value))}" for name, value in entry["properties"].items()]
    return " ".join(parts)


def header_value(me: str, entries: list[dict[str, Any]]) -> str:
    """``me; method=result ...; ...`` folded one result per line."""
    return ";\n\t".join([me] + [_entry_text(entry) for entry in entries])


def authserv_id(value: str) -> str:
    """The authserv-id an Authentication-Results value starts with (comments dropped)."""
    text = re.sub(r"\([^()]*\)", " ", value)
    first = text.split(";", 1)[0].split()
    return first[0].lower() if first else ""


def finish(transaction: Any, connection: Any, me: str) -> int:
    """Drop fields forged with our id, prepend ours; returns how many forged ones were dropped."""
    forged = transaction.headers.remove_if(HEADER, lambda value: authserv_id(value) == me.lower())
    entries = results(transaction)
    # fcrdns records the iprev result (RFC 8601 2.7.3) as evidence in the connection's results.
    iprev = next((result.get("iprev") for result in connection.results if result.get("iprev")), None)
    if iprev:
        entries.insert(0, {"method": "iprev", "result": iprev, "reason": None,
                           "properties": {"policy.iprev": connection.remote_ip}})
    if entries:
        transaction.headers.prepend(HEADER, header_value(me, entries))
    return forged
