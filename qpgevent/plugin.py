"""The plugin API: the base class every plugin subclasses, and the return codes.

A plugin is a module in a plugin folder (``plugins/rcpt_ok.py``, ``plugins/queue/maildir.py``)
holding one ``Plugin`` subclass. Its ``hook_<name>(self, session, ...)`` methods are found
and checked against the hook table when it loads; its options come validated against
``configspec`` plus the standard options below. One instance serves every session of a
worker at once, so nothing that belongs to one connection may live on ``self``: use
``session.connection.notes`` or ``session.transaction.notes``.

Standard options every plugin has (qpsmtpd's names):
  reject       1 (refuse), 0 (only log), or naughty (refuse later, at a later hook)
  reject_type  perm (5xx), temp (4xx), disconnect (5xx and close), temp_disconnect
  loglevel     this plugin's log level (debug, info, warning, error)
  timeout      seconds for one hook call (default: [limits] plugin_timeout)
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, ClassVar

import gevent

from .core.codes import (DECLINED, DENY, DENY_DISCONNECT, DENYSOFT, DENYSOFT_DISCONNECT, DONE, OK, ReturnCode, Verdict)

__all__ = ["Plugin", "OK", "DENY", "DENYSOFT", "DENY_DISCONNECT", "DENYSOFT_DISCONNECT",
           "DECLINED", "DONE", "ReturnCode", "Verdict", "run_blocking", "ip_in", "reject_code",
           "same_network"]

STANDARD_CONFIGSPEC = [
    'reject = option("0", "1", "naughty", default="1")',
    'reject_type = option("perm", "hard", "temp", "soft", "disconnect", "temp_disconnect", default="perm")',
    'loglevel = option("debug", "info", "warning", "error", default=None)',
    "timeout = float(min=0.01, default=None)",
]

_REJECT_TYPES = {
    "perm": DENY, "hard": DENY, "temp": DENYSOFT, "soft": DENYSOFT,
    "disconnect": DENY_DISCONNECT, "temp_disconnect": DENYSOFT_DISCONNECT,
}


class Plugin:
    #: This plugin's own options, as configspec lines (configobj's ``validate`` syntax).
    configspec: ClassVar[str | list[str]] = ""

    def __init__(self, name: str, config: dict[str, Any], path: str = "") -> None:
        self.name = name  #: the label in qpsmtpd.ini: "queue/maildir", "dnsbl:2"
        self.config = config  #: validated options, defaults filled in
        self.path = path  #: the file the plugin came from
        self.log = logging.getLogger("qpgevent.plugin." + name)
        if config.get("loglevel"):
            self.log.setLevel(config["loglevel"].upper())
        self.timeout: float | None = config.get("timeout")

    @classmethod
    def configspec_lines(cls) -> list[str]:
        own = cls.configspec.splitlines() if isinstance(cls.configspec, str) else list(cls.configspec)
        return STANDARD_CONFIGSPEC + [line for line in own if line.strip()]

    @classmethod
    def implemented_hooks(cls) -> list[str]:
        return [attr[5:] for attr in dir(cls) if attr.startswith("hook_") and callable(getattr(cls, attr))]

    def setup(self) -> None:
        """Called once in the master after loading, before the workers are forked (and again at
        each SIGHUP reload): read files, check options; the workers inherit what it made.

        Sockets and connection pools belong in ``hook_post_fork``, once in each worker. An
        ``OSError`` or ``ValueError`` here is a load error naming the plugin. Override at will.
        """

    # -- helpers for hooks ---------------------------------------------------
    def reject(self, message: str, session: Any = None,
               reject_type: str | None = None) -> tuple[ReturnCode, str] | ReturnCode:
        """Refuse as the ``reject`` / ``reject_type`` options say.

        ``reject = 0`` logs and passes; ``reject = naughty`` notes the refusal on the
        connection (``notes["naughty"]``) for a later plugin to act on, and passes.
        ``reject_type`` overrides the option for this one refusal: "temp" when the check
        could not be made (the DNS did not answer), whatever the operator chose for a fail.
        """
        reject_type = reject_type or self.config.get("reject_type", "perm")
        mode = self.config.get("reject", "1")
        if mode == "0":
            self.log.info("fail, tolerated: %s", message)
            return DECLINED
        if mode == "naughty":
            if session is None:
                raise ValueError("reject = naughty needs the session: self.reject(msg, session)")
            notes = session.connection.notes
            notes.setdefault("naughty", message)
            notes.setdefault("naughty_reject_type", reject_type)
            return DECLINED
        return reject_code(reject_type), message

    def is_immune(self, session: Any) -> bool:
        """Relay clients and whitelisted hosts or senders are not checked (qpsmtpd's rule)."""
        connection = session.connection
        if connection.relay_client or connection.notes.get("whitelisthost"):
            return True
        transaction = session.current_transaction
        return bool(transaction is not None and transaction.notes.get("whitelistsender"))


def reject_code(reject_type: str) -> ReturnCode:
    """The return code of a ``reject_type`` name: perm/hard, temp/soft, disconnect, temp_disconnect."""
    return _REJECT_TYPES[reject_type]


def run_blocking(function: Any, *args: Any) -> Any:
    """Run a call that would block the whole process (disk fsync, CPU work) in a thread.

    Sockets are cooperative under gevent; disk I/O is not. A plugin that fsyncs or
    crunches calls it through here so other sessions keep running meanwhile. What the
    call raises is raised here, in the caller, and only here: gevent's pool would also
    print it with a traceback to standard error (a full disk is an answer, not a crash).
    """
    failed, value = gevent.get_hub().threadpool.apply(_outcome, (function, args))
    if failed:
        raise value
    return value


def _outcome(function: Any, args: tuple[Any, ...]) -> tuple[bool, Any]:
    try:
        return False, function(*args)
    except Exception as error:
        return True, error


def same_network(ip: str, other: str, ipv4_prefix: int = 32, ipv6_prefix: int = 128) -> bool:
    """Whether two addresses share their first ``ipv4_prefix`` / ``ipv6_prefix`` bits (32/128: equal).

    IPv4-mapped IPv6 addresses count as IPv4; addresses of different families never match.
    """
    try:
        first, second = (_unmapped(ipaddress.ip_address(value)) for value in (ip, other))
    except ValueError:
        return False
    if first.version != second.version:
        return False
    prefix = ipv4_prefix if first.version == 4 else ipv6_prefix
    return second in ipaddress.ip_network(f"{first}/{prefix}", strict=False)


def _unmapped(address: Any) -> Any:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def ip_in(ip: str, networks: list[Any]) -> bool:
    """Whether ``ip`` falls in one of ``networks`` (ipaddress networks)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)
