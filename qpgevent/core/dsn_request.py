"""What a client asks of delivery status notifications (RFC 3461): the DSN parameters.

Owns the xtext codec (RFC 3461 4) and the syntax of RET and ENVID on MAIL, NOTIFY and
ORCPT on RCPT. Pure: the protocol core calls ``problem`` to refuse a bad value (501
5.5.4), the mail transaction keeps the decoded values on the Transaction and on each
recipient Address, and the SMTP client writes them back (``mail_parameters``,
``rcpt_parameters``: the request passed on to a next hop that offers DSN).
"""

from __future__ import annotations

import re

__all__ = ["XtextError", "xtext", "unxtext", "problem", "notify_of", "orcpt_of", "mail_parameters",
           "rcpt_parameters", "MAIL", "RCPT"]

MAIL = frozenset({"RET", "ENVID"})
RCPT = frozenset({"NOTIFY", "ORCPT"})
_SAFE = frozenset(range(0x21, 0x7F)) - {ord("+"), ord("=")}
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # RFC 3461 4.2: an atom, e.g. rfc822
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
MAX_ENVID = 100  # RFC 3461 4.4: at most 100 characters (as xtext)


class XtextError(ValueError):
    pass


def xtext(value: str) -> str:
    """``value`` as xtext: printable ASCII except ``+`` and ``=``, other octets as ``+XX``."""
    return "".join(chr(b) if b in _SAFE else f"+{b:02X}" for b in value.encode("utf-8"))


def unxtext(text: str) -> str:
    """The text an xtext stands for; XtextError when it is not xtext (lower-case hex too)."""
    if not _XTEXT.fullmatch(text):
        raise XtextError(f"not xtext: {text!r}")
    raw = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise XtextError(f"xtext is not UTF-8: {text!r}") from None


def notify_of(value: str) -> tuple[str, ...]:
    """NOTIFY's value: ("NEVER",) or some of SUCCESS, FAILURE, DELAY, each once."""
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return ("NEVER",)
    if not words or any(w not in _NOTIFY_WORDS for w in words) or len(set(words)) != len(words):
        raise XtextError(f"NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY: {value!r}")
    return tuple(words)


def orcpt_of(value: str) -> str:
    """ORCPT's value, decoded: "rfc822;user@example.test" (RFC 3461 4.2 addr-type;xtext)."""
    addr_type, semicolon, address = value.partition(";")
    if not semicolon or not _ADDR_TYPE.fullmatch(addr_type) or not address:
        raise XtextError(f"ORCPT must be addr-type;xtext: {value!r}")
    return f"{addr_type.lower()};{unxtext(address)}"


def problem(key: str, value: str | None) -> str | None:
    """Why ``key=value`` on MAIL or RCPT is not valid, or None when it is."""
    try:
        if value is None:
            return f"{key} needs a value"
        if key == "RET":
            if value.upper() not in ("FULL", "HDRS"):
                return "RET must be FULL or HDRS"
        elif key == "ENVID":
            if len(value) > MAX_ENVID:
                return "ENVID is too long"
            unxtext(value)
        elif key == "NOTIFY":
            notify_of(value)
        elif key == "ORCPT":
            orcpt_of(value)
    except XtextError as error:
        return str(error)
    return None


def mail_parameters(ret: str | None, envid: str | None) -> list[str]:
    """RET and ENVID for MAIL, as a next hop that offers DSN reads them (RFC 3461 4.3, 4.4)."""
    return ([f"RET={ret.upper()}"] if ret else []) + ([f"ENVID={xtext(envid)}"] if envid else [])


def rcpt_parameters(notify: tuple[str, ...] | None, orcpt: str | None) -> list[str]:
    """NOTIFY and ORCPT for RCPT (RFC 3461 4.1, 4.2): ORCPT's address re-encoded as xtext."""
    params = [f"NOTIFY={','.join(notify)}"] if notify else []
    if orcpt:
        addr_type, _, address = orcpt.partition(";")
        params.append(f"ORCPT={addr_type};{xtext(address)}")
    return params
