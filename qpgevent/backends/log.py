"""Logging set-up, and the per-session logger that puts the connection id on every line.

Owns the output side of stdlib logging for the ``qpgevent`` logger tree:
- where lines go: standard error, a file, and/or syslog (``configure``); ``reopen``
  opens the file again by its name, for log rotation: the master does it on SIGUSR1 and
  passes the signal on to every worker, which does the same (HUP is taken: it reloads);
- how they look: plain text (``TEXT_FORMAT``) or one JSON object per line;
- which session a line belongs to: ``SessionLogger`` (the engine's, ``qpgevent.engine.session``)
  attaches ``conn`` (and ``txn`` inside a transaction) to each record it makes, and
  ``bind_session`` marks the running greenlet's session so that lines logged by plugins
  and services through their own loggers get the same ids;
- what must never be written: ``redact`` (also the engine's) hides the secret part of a
  command line (AUTH),
  and ``escape`` writes the control characters of a message (what clients wrote: HELO
  names, addresses, commands) as ``\\xNN``, so that no client can end a log line early,
  forge the next one, or send escape sequences to an operator's terminal. A traceback
  keeps its line breaks: it is ours.

Structured values ride on the record (``extra={"fields": {...}}``): the text format shows
the message as written, the JSON format adds the fields as typed keys.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import re
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from ..engine.session import SessionLogger, redact, session_ids  # noqa: F401 (their home is the engine)

if TYPE_CHECKING:
    from ..config import Settings

TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(context)s%(message)s"
#: Syslog adds its own time stamp and host; we add the program name and pid (RFC 3164 TAG).
SYSLOG_FORMAT = "qpgevent[%(process)d]: %(levelname)s %(name)s: %(context)s%(message)s"
FORMATS = ("text", "json")
#: C0 controls (CR and LF among them), DEL, C1 controls, and Unicode's line separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """``text`` with its control characters written as ``\\xNN`` (or ``\\uNNNN``)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)


class TextFormatter(logging.Formatter):
    """The stdlib formatter, with the message escaped (``escape``)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

#: The session the running greenlet serves (gevent gives each greenlet its own context).
_session: contextvars.ContextVar[Any] = contextvars.ContextVar("qpgevent_session", default=None)


def bind_session(session: Any) -> None:
    """Mark ``session`` as the one this greenlet serves: every line it logs gets its ids."""
    _session.set(session)


class SessionContext(logging.Filter):
    """Gives every record ``conn``/``txn`` (from the bound session when the logger did not)
    and ``context``, their text form ("conn=1a.2 txn=3 " or "")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "conn"):
            session = _session.get()
            for key, value in (session_ids(session) if session is not None else {}).items():
                setattr(record, key, value)
        context = ""
        conn, txn = getattr(record, "conn", None), getattr(record, "txn", None)
        if conn:
            context = f"conn={conn} "
            if txn:
                context += f"txn={txn} "
        record.context = context
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, pid, logger, conn, txn, msg,
    the record's ``fields``, and the traceback as ``exc`` when there is one."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "pid": record.process,
            "logger": record.name,
        }
        for key in ("conn", "txn"):
            if getattr(record, key, None):
                line[key] = getattr(record, key)
        line["msg"] = escape(record.getMessage())  # JSON would escape C0 only
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update({key: value for key, value in fields.items() if key not in line})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return self.prefix % {"process": record.process} + json.dumps(line, ensure_ascii=False, default=str)


def syslog_handler(address: str, facility: str) -> logging.Handler:
    """A SysLogHandler to a unix socket path (default /dev/log) or to ``host:port`` over UDP."""
    target: str | tuple[str, int]
    if "/" in address:
        target = address
        # The handler ignores a missing socket (and loses every line); at start it is a
        # mistake to report. Later outages are the handler's: it reconnects when it can.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
    else:
        host, _, port = address.rpartition(":")
        target = (host.strip("[]") or "127.0.0.1", int(port or 514))
    try:
        code = logging.handlers.SysLogHandler.facility_names[facility]
    except KeyError:
        raise ValueError(f"unknown syslog facility {facility!r}") from None
    return logging.handlers.SysLogHandler(target, code, socket.SOCK_DGRAM)


def configure(level: str = "info", path: str = "", format: str = "text", syslog: bool = False,
              syslog_facility: str = "mail", syslog_address: str = "/dev/log", trace: bool = False) -> None:
    """Send the ``qpgevent`` loggers to a file (or standard error) and/or syslog.

    Standard error is used when neither a file nor syslog is set. ``trace``: some sessions
    are traced (``qpgevent.engine.trace``): their lines are kept whatever ``level`` says.
    Raises OSError when
    the file or the syslog socket cannot be opened, ValueError for a bad facility.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown log format {format!r}")
    handlers: list[logging.Handler] = []
    if path or not syslog:
        stream = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
        stream.setFormatter(JsonFormatter() if format == "json" else TextFormatter(TEXT_FORMAT))
        handlers.append(stream)
    if syslog:
        to_syslog = syslog_handler(syslog_address, syslog_facility)
        to_syslog.setFormatter(JsonFormatter("qpgevent[%(process)d]: ") if format == "json"
                               else TextFormatter(SYSLOG_FORMAT))
        handlers.append(to_syslog)
    for handler in handlers:
        handler.addFilter(SessionContext())
    root = logging.getLogger("qpgevent")
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    root.propagate = False
    logging.getLogger("qpgevent.trace").setLevel(logging.DEBUG if trace else logging.NOTSET)


def configure_from(settings: Settings, level: str | None = None) -> None:
    """``configure`` as ``settings``' ``[logging]`` says; ``level`` (``--log-level``) overrides its level."""
    configure(level or settings.log_level, settings.log_file, settings.log_format, settings.log_syslog,
              settings.log_syslog_facility, settings.log_syslog_address,
              trace=settings.log_trace or bool(settings.log_trace_clients))


def reopen() -> int:
    """Open every log file of the ``qpgevent`` loggers again by its name (after logrotate
    moved it); how many. A file that cannot be opened keeps the old one, and says so."""
    reopened = 0
    for handler in logging.getLogger("qpgevent").handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        handler.acquire()
        try:
            try:
                stream = handler._open()
            except OSError as error:
                failed: OSError | None = error
            else:
                failed = None
                old, handler.stream = handler.stream, stream
                if old is not None:
                    old.close()
                reopened += 1
        finally:
            handler.release()
        if failed is not None:
            logging.getLogger("qpgevent.log").error("cannot reopen %s: %s", handler.baseFilename, failed)
    return reopened
