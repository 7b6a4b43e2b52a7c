"""Reading qpsmtpd.ini: configobj parsing, configspec validation, one-line errors.

Owns ``Settings`` (the validated server settings) and ``PluginSpec`` (one entry of the
ordered ``[plugins]`` list). Every error is a ``ConfigError`` whose text names the file,
the line and the key, so the CLI can print it as one line and exit 2. Relative paths
resolve against the folder of the ini file, so a copied config runs anywhere.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configobj import ConfigObj, ConfigObjError, flatten_errors, get_extra_values
from validate import ValidateError, Validator, VdtTypeError

from .config_checks import _first_sentence, _locate, _read_lines, check_of, line_of, problem_text
from .core.errors import ConfigError

CONFIGSPEC = Path(__file__).with_name("configspec.ini")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int
    #: Per-listener policy, from ``HOST:PORT/flag+flag`` (see [server] listen in configspec.ini).
    implicit_tls: bool = False  #: TLS from the first octet (SMTPS, RFC 8314 3.3)
    submission: bool = False  #: AUTH before MAIL; the sender must be the user's (RFC 6409)
    plain_auth: bool = False  #: AUTH offered without TLS on this listener
    lmtp: bool = False  #: LMTP (RFC 2033): LHLO, and one reply per recipient after the data

    @property
    def flags(self) -> str:
        """The flags as ``listen`` takes them back: ``smtps`` for implicit TLS with submission."""
        smtps = self.implicit_tls and self.submission
        names = [n for n, on in (("smtps", smtps), ("tls", self.implicit_tls and not smtps),
                                 ("submission", self.submission and not smtps),
                                 ("plainauth", self.plain_auth), ("lmtp", self.lmtp)) if on]
        return "+".join(names)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """One ``[[name]]`` section of ``[plugins]``: which plugin, and its raw options."""

    label: str  #: as written: "queue/maildir", "dnsbl:2"
    options: dict[str, Any]
    source: str  #: "qpsmtpd.ini" path, for error messages (or "plugin test": the command line)
    line: int | None
    #: Options given on the command line ("KEY=VALUE", ``plugin test -o``): a mistake in one
    #: is blamed on the option, not on a line of the ini.
    overrides: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """Where it was named, for error messages: ``qpsmtpd.ini:12: [[dnsbl]]``."""
        if self.line is None and not os.path.isfile(self.source):
            return f"{self.source}:"
        return f"{self.source}:{self.line or '?'}: [[{self.label}]]"

    @property
    def name(self) -> str:
        """The plugin's file name without the instance suffix: "dnsbl" for "dnsbl:2"."""
        return self.label.split(":", 1)[0]


@dataclass(frozen=True, slots=True)
class ListenerChain:
    """One ``[[HOST:PORT]]`` of ``[listeners]``: how that listener's plugins differ from ``[plugins]``."""

    host: str
    port: int
    plugins: tuple[PluginSpec, ...]  #: its own ``[[[name]]]`` plugins, asked before the common ones
    without: tuple[str, ...] = ()  #: labels of ``[plugins]`` not run on this listener
    only: bool = False  #: its own plugins replace ``[plugins]`` altogether

    def serves(self, listen: Listen) -> bool:
        return (self.host, self.port) == (listen.host, listen.port)


@dataclass(frozen=True)
class Settings:
    path: str  #: the ini file
    base_dir: str  #: its folder: relative paths start here
    me: str
    listen: tuple[Listen, ...]
    banner: str
    spool_dir: str
    plugin_dirs: tuple[str, ...]
    size_threshold: int
    shutdown_timeout: float
    drain_delay: float
    max_connections: int
    max_message_size: int
    max_recipients: int
    max_command_line: int
    max_text_line: int
    command_timeout: float
    data_timeout: float
    plugin_timeout: float
    max_bad_commands: int
    allow_bare_lf: bool
    log_level: str
    log_file: str
    plugins: tuple[PluginSpec, ...] = field(default=())
    listeners: tuple[ListenerChain, ...] = ()  #: [listeners]: per-listener plugin chains
    #: [proxy]: who may send a PROXY header (empty: nobody), and how long it may take.
    proxy_trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    proxy_timeout: float = 5.0
    #: [limits] park_after: seconds idle before a session waits with no greenlet (0: never).
    park_after: float = 0.25
    log_format: str = "text"  #: [logging] format: text or json
    max_header_size: int = 102400  #: [limits] max_header_size: octets of message header
    max_received: int = 100  #: [limits] max_received: Received headers before a message is a loop
    hung_worker_timeout: float = 60.0  #: [server] hung_worker_timeout: 0 = never
    nul_bytes: str = "reject"  #: [smtp] nul_bytes: reject, strip or accept NULs in message text
    session_timeout: float = 3600.0  #: [limits] session_timeout: seconds a session may last in all
    min_data_rate: float = 500.0  #: [limits] min_data_rate: octets/s that extend a request's deadline (0: off)
    max_junk_commands: int = 100  #: [limits] max_junk_commands: NOOP/RSET/VRFY/HELP before they count as errors
    stress_at: int = 90  #: [limits] stress_at: % of max_connections from which idle sessions are shed
    stress_command_timeout: float = 10.0  #: [limits] stress_command_timeout: command_timeout under stress
    log_syslog: bool = False
    log_syslog_facility: str = "mail"
    log_syslog_address: str = "/dev/log"
    #: [logging] trace, trace_clients: the protocol trace for every session, or for these clients.
    log_trace: bool = False
    log_trace_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: [store]: the policy plugins' shared state, as keyword arguments of qpgevent.store.from_options.
    store: dict[str, Any] = field(default_factory=dict)
    #: [admin]: the status/metrics HTTP listener (None: off), its token, the run folder.
    admin_listen: Listen | None = None
    admin_token: str = ""
    admin_run_dir: str = ""
    admin_refresh: float = 2.0
    admin_max_connections: int = 16  #: [admin] max_connections: served at once
    admin_timeout: float = 10.0  #: [admin] timeout: seconds a connection may stay open
    #: [dns]: the resolver (no nameservers: /etc/resolv.conf's), the per-session DNS time
    #: budget (0: none), and whether the client's name is looked up (FCrDNS) at connect.
    dns_nameservers: tuple[str, ...] = ()
    dns_port: int = 53
    dns_timeout: float = 5.0
    dns_session_budget: float = 30.0
    dns_cache_size: int = 10000
    reverse_lookup: bool = True
    #: [ident]: RFC 1413 at connect (off by default), its timeout and port.
    ident: bool = False
    ident_timeout: float = 2.0
    ident_port: int = 113
    #: [server] process settings: worker processes (0: one per core), who to run as after
    #: binding, whether serving as root is meant, and the pidfile ("" for none).
    workers: int = 0
    user: str = ""
    group: str = ""
    allow_root: bool = False
    pidfile: str = ""
    #: [tls]: the default certificate (PEM; key in it unless tls_key), SNI name -> (cert,
    #: key), minimum version, handshake timeout, seconds between certificate file checks.
    tls_certificate: str = ""
    tls_key: str = ""
    tls_sni: tuple[tuple[str, str, str], ...] = ()
    tls_min_version: str = "TLSv1.2"
    tls_handshake_timeout: float = 10.0
    tls_reload_check: float = 5.0
    #: [auth]: AUTH only over TLS unless a listener says plainauth; failure limits; senders.
    tls_before_auth: bool = True
    auth_max_failures_ip: int = 10
    auth_max_failures_user: int = 5
    auth_failure_window: float = 900.0
    auth_failure_delay: float = 1.0
    auth_max_delay: float = 10.0
    auth_senders: str = ""


#: Listener flags; ``smtps`` is implicit TLS for submission (RFC 8314 3.3, port 465).
_LISTEN_FLAGS = {"smtp": {}, "tls": {"implicit_tls": True}, "submission": {"submission": True},
                 "smtps": {"implicit_tls": True, "submission": True}, "plainauth": {"plain_auth": True},
                 "lmtp": {"lmtp": True}}


def parse_listen(text: str) -> Listen:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (all IPv4 addresses), then ``/flag+flag``."""
    text, _, flag_text = text.strip().partition("/")
    flags: dict[str, bool] = {}
    for flag in filter(None, flag_text.lower().split("+")):
        if flag not in _LISTEN_FLAGS:
            raise ValueError(f"listen flag {flag!r} unknown (known: {', '.join(_LISTEN_FLAGS)})")
        flags.update(_LISTEN_FLAGS[flag])
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"listen address {text!r}: put IPv6 addresses in brackets")
    return Listen(host or "0.0.0.0", int(port), **flags)


def _listeners(config: Any, path: str, lines: list[str], plugins: list[PluginSpec], listen: tuple[Listen, ...],
               overridden: bool) -> tuple[ListenerChain, ...]:
    """``[listeners]``: per listen address, ``without``, ``only`` and ``[[[plugin]]]`` sections."""
    chains = []
    section = config.get("listeners", {})
    labels = {spec.label for spec in plugins}
    for address in getattr(section, "sections", ()):
        where = f"{path}:{_locate(lines, ['listeners', address], None)}: [listeners] [[{address}]]"
        try:
            bound = parse_listen(address)
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
        if not overridden and not any((bound.host, bound.port) == (x.host, x.port) for x in listen):
            raise ConfigError(f"{where}: not one of [server] listen")
        options = section[address]
        unknown = sorted(set(options.scalars) - {"without", "only"})
        without = options.get("without", [])
        without = [without] if isinstance(without, str) else without
        missing = sorted(set(filter(None, without)) - labels)
        only = str(options.get("only", "no")).lower()
        if unknown or missing or only not in _BOOLEANS:
            problem = (f"{unknown[0]}: unknown key (known: without, only; plugins are [[[sections]]])" if unknown
                       else f"without: {missing[0]} is not in [plugins]" if missing else "only: not yes or no")
            raise ConfigError(f"{where}: {problem}")
        own = tuple(PluginSpec(label, options[label].dict(), path, _locate(lines, ["listeners", address, label], None))
                    for label in options.sections)
        chains.append(ListenerChain(bound.host, bound.port, own, tuple(filter(None, without)), _BOOLEANS[only]))
    return tuple(chains)


_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}


def make_validator(base_dir: str) -> Validator:
    """The configobj Validator with our extra checks: ``path`` and ``path_list``."""

    def check_path(value: Any, default: Any = None) -> str:
        if isinstance(value, list):
            raise VdtTypeError(value)
        value = os.path.expanduser(str(value))
        return os.path.normpath(os.path.join(base_dir, value)) if value else ""

    def check_path_list(value: Any, default: Any = None) -> list[str]:
        if isinstance(value, str):
            value = [value] if value else []
        return [check_path(v) for v in value]

    return Validator({"path": check_path, "path_list": check_path_list})


def load(path: str, listen_override: list[str] | None = None) -> Settings:
    """Read, validate and resolve ``path``; raise ConfigError with file, line and key."""
    path = os.path.abspath(path)
    base_dir = os.path.dirname(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    lines = text.splitlines()
    try:
        config = ConfigObj(lines, configspec=str(CONFIGSPEC), file_error=True,
                           interpolation=False, encoding="utf-8")
    except ConfigObjError as error:
        line = getattr(error, "line_number", None)
        raise ConfigError(f"{path}:{line or '?'}: {_first_sentence(error)}") from None
    result = config.validate(make_validator(base_dir), preserve_errors=True)
    if result is not True:
        for sections, key, problem in flatten_errors(config, result):
            where = _locate(lines, sections, key)
            check = check_of(config.configspec, sections, key)
            what = "missing" if problem is False else problem_text(problem or "invalid section", check)
            raise ConfigError(f"{path}:{where}: [{']['.join(sections)}] {key}: {what}")
    for sections, name in get_extra_values(config):
        if sections[:1] in (("plugins",), ("listeners",)) or (sections, name) == ((), "listeners"):
            continue
        parent = config
        for part in sections:
            parent = parent[part]
        if name in parent.sections:  # a whole unknown section, such as a misspelt [limts]
            where = _locate(lines, [*sections, name], None)
            raise ConfigError(f"{path}:{where}: [{name}]: unknown section")
        where = _locate(lines, list(sections), name)
        raise ConfigError(f"{path}:{where}: [{']['.join(sections) or 'top'}] {name}: unknown key")

    server, limits = config["server"], config["limits"]
    try:
        listen = tuple(parse_listen(item) for item in (listen_override or server["listen"]))
    except ValueError as error:
        if listen_override:
            raise ConfigError(f"--listen: {error}") from None
        raise ConfigError(f"{path}:{_locate(lines, ['server'], 'listen')}: [server] listen: {error}") from None
    plugins = []
    for label in config["plugins"].sections:
        options = config["plugins"][label].dict()
        plugins.append(PluginSpec(label, options, path, _locate(lines, ["plugins", label], None)))
    for key in config["plugins"].scalars:
        where = _locate(lines, ["plugins"], key)
        raise ConfigError(f"{path}:{where}: [plugins] {key}: plugins are sections, write [[{key}]]")
    proxy_trusted = _networks(config["proxy"]["trusted"], path, lines, ["proxy"], "trusted")
    return Settings(
        path=path, base_dir=base_dir,
        me=server["me"] or socket.getfqdn(),
        listen=listen,
        banner=server["banner"],
        spool_dir=server["spool_dir"],
        plugin_dirs=tuple(server["plugin_dirs"]),
        size_threshold=server["size_threshold"],
        shutdown_timeout=server["shutdown_timeout"],
        drain_delay=server["drain_delay"],
        hung_worker_timeout=server["hung_worker_timeout"],
        max_connections=limits["max_connections"],
        max_message_size=limits["max_message_size"],
        max_recipients=limits["max_recipients"],
        max_command_line=limits["max_command_line"],
        max_text_line=limits["max_text_line"],
        max_header_size=limits["max_header_size"],
        max_received=limits["max_received"],
        command_timeout=limits["command_timeout"],
        data_timeout=limits["data_timeout"],
        park_after=limits["park_after"],
        session_timeout=limits["session_timeout"],
        min_data_rate=limits["min_data_rate"],
        max_junk_commands=limits["max_junk_commands"],
        stress_at=limits["stress_at"],
        stress_command_timeout=limits["stress_command_timeout"],
        plugin_timeout=limits["plugin_timeout"],
        max_bad_commands=limits["max_bad_commands"],
        allow_bare_lf=config["smtp"]["allow_bare_lf"],
        nul_bytes=config["smtp"]["nul_bytes"],
        log_level=config["logging"]["level"],
        log_file=config["logging"]["file"],
        plugins=tuple(plugins),
        listeners=_listeners(config, path, lines, plugins, listen, bool(listen_override)),
        proxy_trusted=tuple(proxy_trusted),
        proxy_timeout=config["proxy"]["timeout"],
        log_format=config["logging"]["format"],
        log_syslog=config["logging"]["syslog"],
        log_syslog_facility=config["logging"]["syslog_facility"],
        log_syslog_address=config["logging"]["syslog_address"],
        log_trace=config["logging"]["trace"],
        log_trace_clients=_networks(config["logging"]["trace_clients"], path, lines, ["logging"], "trace_clients"),
        store=config["store"].dict(),
        admin_listen=_admin_listen(config["admin"], path, lines),
        admin_token=config["admin"]["token"],
        admin_run_dir=config["admin"]["run_dir"],
        admin_refresh=config["admin"]["refresh"],
        admin_max_connections=config["admin"]["max_connections"],
        admin_timeout=config["admin"]["timeout"],
        dns_nameservers=_nameservers(config["dns"]["nameservers"], path, lines),
        dns_port=config["dns"]["port"],
        dns_timeout=config["dns"]["timeout"],
        dns_session_budget=config["dns"]["session_budget"],
        dns_cache_size=config["dns"]["cache_size"],
        reverse_lookup=config["dns"]["reverse_lookup"],
        ident=config["ident"]["enabled"],
        ident_timeout=config["ident"]["timeout"],
        ident_port=config["ident"]["port"],
        workers=server["workers"],
        user=server["user"],
        group=server["group"],
        allow_root=server["allow_root"],
        pidfile=server["pidfile"],
        **_tls_settings(config, path, lines, listen),
    )


def _networks(items: list[str], path: str, lines: list[str], section: list[str],
              key: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses or networks (``192.0.2.10``, ``10.0.0.0/8``); an empty list (``key =``) is none."""
    networks = []
    for item in filter(None, (item.strip() for item in items)):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            where = _locate(lines, section, key)
            raise ConfigError(f"{path}:{where}: [{section[0]}] {key}: {item!r} is not an address or network") from None
    return tuple(networks)


def _tls_settings(config: Any, path: str, lines: list[str], listen: tuple[Listen, ...]) -> dict[str, Any]:
    """[tls] and [auth]; an implicit-TLS listener without a certificate is a config error."""
    tls, auth = config["tls"], config["auth"]
    sni = []
    for item in filter(None, (item.strip() for item in tls["sni"])):
        name, eq, files = item.partition("=")
        cert, _, key = files.partition(":")
        if not eq or not name.strip() or not cert.strip():
            where = _locate(lines, ["tls"], "sni")
            raise ConfigError(f"{path}:{where}: [tls] sni: {item!r} is not NAME=CERT.pem[:KEY.pem]")
        base = os.path.dirname(path)
        sni.append((name.strip().lower().rstrip("."), os.path.join(base, cert.strip()),
                    os.path.join(base, key.strip()) if key.strip() else ""))
    if not tls["certificate"]:
        for item in listen:
            if item.implicit_tls:
                where = _locate(lines, ["server"], "listen")
                raise ConfigError(f"{path}:{where}: [server] listen: {item}/{item.flags} needs [tls] certificate")
    return {"tls_certificate": tls["certificate"], "tls_key": tls["key"], "tls_sni": tuple(sni),
            "tls_min_version": tls["min_version"], "tls_handshake_timeout": tls["handshake_timeout"],
            "tls_reload_check": tls["reload_check"], "tls_before_auth": auth["tls_before_auth"],
            "auth_max_failures_ip": auth["max_failures_ip"],
            "auth_max_failures_user": auth["max_failures_user"],
            "auth_failure_window": auth["failure_window"], "auth_failure_delay": auth["failure_delay"],
            "auth_max_delay": auth["max_delay"], "auth_senders": auth["senders"]}


def _nameservers(items: list[str], path: str, lines: list[str]) -> tuple[str, ...]:
    """[dns] nameservers: IP addresses (a resolver needs no name to find its nameserver)."""
    servers = []
    for item in filter(None, (item.strip() for item in items)):
        try:
            servers.append(str(ipaddress.ip_address(item)))
        except ValueError:
            where = _locate(lines, ["dns"], "nameservers")
            raise ConfigError(f"{path}:{where}: [dns] nameservers: {item!r} is not an IP address") from None
    return tuple(servers)


def _admin_listen(admin: Any, path: str, lines: list[str]) -> Listen | None:
    """[admin] listen: off when empty; a non-loopback address only with a token."""
    if not admin["listen"].strip():
        return None
    try:
        listen = parse_listen(admin["listen"])
    except ValueError as error:
        raise ConfigError(f"{path}:{_locate(lines, ['admin'], 'listen')}: [admin] listen: {error}") from None
    if not is_loopback(listen.host) and not admin["token"]:
        raise ConfigError(f"{path}:{_locate(lines, ['admin'], 'listen')}: [admin] listen: {listen} is not "
                          "a loopback address; set [admin] token to expose the admin pages")
    return listen


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (and ::ffff:127.x), or the name localhost."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def validate_options(spec: PluginSpec, configspec: list[str], base_dir: str) -> dict[str, Any]:
    """Check one plugin's options against its configspec; return them typed, defaults filled."""
    lines = _read_lines(spec.source)
    section = ["plugins", spec.label]
    try:
        options = ConfigObj(spec.options, configspec=configspec, interpolation=False)
    except ConfigObjError as error:
        raise ConfigError(f"{spec.source}:{spec.line or '?'}: [[{spec.label}]] configspec: {_first_sentence(error)}") from None
    result = options.validate(make_validator(base_dir), preserve_errors=True)
    if result is not True:
        for _, key, problem in flatten_errors(options, result):
            what = "missing" if problem is False else problem_text(problem, check_of(options.configspec, [], key))
            raise ConfigError(f"{_option_where(spec, lines, key)} {key}: {what}")
    for _, name in get_extra_values(options):
        raise ConfigError(f"{_option_where(spec, lines, name)} {name}: unknown option")
    return options.dict()


def _option_where(spec: PluginSpec, lines: list[str], key: str) -> str:
    """The place to blame for a plugin option: the ``-o`` that gave it, or its line in the ini."""
    given = [item for item in spec.overrides if item.split("=", 1)[0] == key]
    if given:
        return f"--option {given[-1]}: [[{spec.label}]]"
    if not lines:
        return spec.where
    where = _locate(lines, ["plugins", spec.label], key) or spec.line
    return f"{spec.source}:{where}: [[{spec.label}]]"


__all__ = ["ConfigError", "Listen", "PluginSpec", "Settings", "load", "validate_options",
           "ValidateError"]
