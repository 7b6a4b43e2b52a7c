"""The plugin API: the base class every plugin subclasses, and the return codes.

A plugin is a module in a plugin folder (``plugins/rcpt_ok.py``, ``plugins/queue/maildir.py``)
holding one ``Plugin`` subclass. Its ``hook_<name>(self, session, ...)`` methods are found
and checked against the hook table when it loads; its options come validated against
``configspec`` plus the standard options below. One instance serves every session of a
worker at once, so nothing that belongs to one connection may live on ``self``: use
``session.connection.notes`` or ``session.transaction.notes`` (free data), and record
verdicts in ``session.connection.results`` / ``session.transaction.results``.

Standard options every plugin has (qpsmtpd's names):
  loglevel     this plugin's log level (debug, info, warning, error)
  timeout      seconds for one hook call (default: [limits] plugin_timeout)

and those a plugin that refuses on its own judgement declares (``reject_options``),
all applied by ``self.reject``:
  reject       1 (refuse), 0 (only log), or naughty (refuse later, at a later hook)
  reject_type  perm (5xx), temp (4xx), disconnect (5xx and close), temp_disconnect
               (default perm, or the plugin's ``default_reject_type``)
A plugin that does not declare them refuses them at load: an option that would be
silently ignored is a configuration mistake.

The configspec a plugin is validated against is composed, not edited: the standard
options, then the declared reject options, then the plugin's own (configobj's ``merge``:
a plugin may declare a standard key again to change it).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, ClassVar

import gevent
from configobj import ConfigObj

from .core.codes import (DECLINED, DENY, DENY_DISCONNECT, DENYSOFT, DENYSOFT_DISCONNECT, DONE, OK, ReturnCode, Verdict)
from .core.errors import ConfigError

__all__ = ["Plugin", "OK", "DENY", "DENYSOFT", "DENY_DISCONNECT", "DENYSOFT_DISCONNECT",
           "DECLINED", "DONE", "ReturnCode", "Verdict", "run_blocking", "ip_in", "reject_code",
           "same_network", "REJECT_OPTIONS", "REJECT_TYPES"]

#: Options every plugin has.
STANDARD_CONFIGSPEC = [
    'loglevel = option("debug", "info", "warning", "error", default=None)',
    "timeout = float(min=0.01, default=None)",
]
#: The refusal options, for the plugins that declare them in ``reject_options``.
REJECT_OPTIONS = ("reject", "reject_type")

_REJECT_TYPES = {
    "perm": DENY, "hard": DENY, "temp": DENYSOFT, "soft": DENYSOFT,
    "disconnect": DENY_DISCONNECT, "temp_disconnect": DENYSOFT_DISCONNECT,
}
#: The ``reject_type`` names, and the temporary ones (a 4xx: the status class is 4).
REJECT_TYPES = tuple(_REJECT_TYPES)
_TEMPORARY = {"temp", "soft", "temp_disconnect"}
#: A code as a ``reject_type`` name: for refusals whose code comes from elsewhere (a map).
_TYPE_OF_CODE = {DENY: "perm", DENYSOFT: "temp", DENY_DISCONNECT: "disconnect",
                 DENYSOFT_DISCONNECT: "temp_disconnect"}


def _reject_spec(option: str, default_type: str) -> str:
    if option == "reject":
        return 'reject = option("0", "1", "naughty", default="1")'
    names = ", ".join(f'"{name}"' for name in REJECT_TYPES)
    return f'reject_type = option({names}, default="{default_type}")'


def _spec(lines: list[str]) -> ConfigObj:
    return ConfigObj(lines, _inspec=True, list_values=False, interpolation=False)


class Plugin:
    #: This plugin's own options, as configspec lines (configobj's ``validate`` syntax).
    configspec: ClassVar[str | list[str]] = ""
    #: The standard refusal options this plugin honours (all through ``self.reject``):
    #: ``("reject", "reject_type")``; ``("reject",)`` when its codes come from elsewhere (a
    #: map file); none (the default) for a plugin that refuses nothing on its own judgement.
    reject_options: ClassVar[tuple[str, ...]] = ()
    #: ``reject_type`` when the operator gives none: "temp" for checks whose refusals are
    #: temporary by nature (greylisting, rate limits, load).
    default_reject_type: ClassVar[str] = "perm"

    def __init__(self, name: str, config: dict[str, Any], path: str = "") -> None:
        self.name = name  #: the label in qpsmtpd.ini: "queue/maildir", "dnsbl:2"
        #: The label as written, when it was qpsmtpd's old name (``check_earlytalker``).
        self.written_as = name
        self.config = config  #: validated options, defaults filled in
        self.path = path  #: the file the plugin came from
        self.log = logging.getLogger("qpgevent.plugin." + name)
        if config.get("loglevel"):
            self.log.setLevel(config["loglevel"].upper())
        self.timeout: float | None = config.get("timeout")

    @classmethod
    def configspec_lines(cls) -> list[str]:
        """The whole configspec: standard options, declared reject options, then the plugin's own."""
        own = cls.configspec.splitlines() if isinstance(cls.configspec, str) else list(cls.configspec)
        # A mistake in the declarations is the plugin author's: a load error naming the class.
        if cls.default_reject_type not in REJECT_TYPES:
            raise ConfigError(f"{cls.__module__}.{cls.__name__}: default_reject_type "
                              f"{cls.default_reject_type!r} is not one of {', '.join(REJECT_TYPES)}")
        if not set(cls.reject_options) <= set(REJECT_OPTIONS):
            raise ConfigError(f"{cls.__module__}.{cls.__name__}: reject_options {cls.reject_options!r} "
                              f"may name only {', '.join(REJECT_OPTIONS)}")
        composed = _spec(STANDARD_CONFIGSPEC + [_reject_spec(option, cls.default_reject_type)
                                                for option in REJECT_OPTIONS if option in cls.reject_options])
        composed.merge(_spec([line.strip() for line in own if line.strip()]))
        return list(composed.write())

    @classmethod
    def own_configspec_lines(cls) -> list[str]:
        """The configspec without the options every plugin has: the plugin's own, and the
        reject options it declares (its page of docs/plugins.md shows them)."""
        every = {line.split("=", 1)[0].strip() for line in STANDARD_CONFIGSPEC}
        return [line for line in cls.configspec_lines() if line.split("=", 1)[0].strip() not in every]

    @classmethod
    def unused_options(cls, options: dict[str, Any]) -> list[str]:
        """The standard refusal options given in ``options`` that this plugin does not honour."""
        return [key for key in REJECT_OPTIONS if key in options and key not in cls.reject_options]

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
               reject_type: str | ReturnCode | None = None) -> tuple[ReturnCode, str] | ReturnCode:
        """Refuse as the ``reject`` / ``reject_type`` options say.

        ``reject = 0`` logs and passes; ``reject = naughty`` records the refusal in this
        plugin's connection result (evidence ``naughty``, the text, and
        ``naughty_reject_type``) for the naughty plugin to act on later, and passes.
        ``reject_type`` overrides the option for this one refusal: "temp" when the check
        could not be made (the DNS did not answer), whatever the operator chose for a
        fail; or a code, when the plugin's code comes from elsewhere (a map file).
        """
        if isinstance(reject_type, ReturnCode):
            reject_type = _TYPE_OF_CODE[reject_type]
        reject_type = reject_type or self.config.get("reject_type", self.default_reject_type)
        mode = self.config.get("reject", "1")
        if mode == "0":
            self.log.info("fail, tolerated: %s", message)
            return DECLINED
        if mode == "naughty":
            if session is None:
                raise ValueError("reject = naughty needs the session: self.reject(msg, session)")
            results = session.connection.results
            found = results.get(self)
            if found is None or "naughty" not in found.evidence:  # the first refusal stays
                results.add(self, naughty=message, naughty_reject_type=reject_type)
            return DECLINED
        return reject_code(reject_type), message

    def enhanced_status(self, detail: str) -> str:
        """``"7.1"`` -> ``"5.7.1"``, or ``"4.7.1"`` when ``reject_type`` is temporary (RFC 3463:
        the class of the enhanced status goes with the reply's)."""
        temporary = self.config.get("reject_type", self.default_reject_type) in _TEMPORARY
        return f"{'4' if temporary else '5'}.{detail}"

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
