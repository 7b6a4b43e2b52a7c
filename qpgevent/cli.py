"""The command line: ``qpgevent -c qpsmtpd.ini``, ``--check-config``, signals, exit codes.

Exit status: 0 after a clean stop, 2 for a configuration or plugin error (one line on
standard error naming file, line and key; no traceback), 1 when the server cannot start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import gevent
from gevent.event import Event

from . import __version__
from . import config as config_module
from . import log as log_module
from .errors import ConfigError
from .hooks import HOOKS, HookRunner
from .loader import load_plugins
from .server import SmtpServer

log = logging.getLogger("qpgevent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qpgevent", description="A plugin-driven SMTP server.")
    parser.add_argument("-c", "--config", default="qpsmtpd.ini", help="the ini file (default: %(default)s)")
    parser.add_argument("-l", "--listen", action="append", metavar="HOST:PORT",
                        help="listen here instead of [server] listen (repeatable; [::1]:25 for IPv6)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="override [logging] level")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config and plugins, print the hook order, exit")
    parser.add_argument("--version", action="version", version=f"qpgevent {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = config_module.load(args.config, listen_override=args.listen)
        # Logging first, so what plugins say while they set up goes where the rest goes.
        if not args.check_config:
            try:
                log_module.configure(args.log_level or settings.log_level, settings.log_file)
            except OSError as error:
                raise ConfigError(f"{settings.path}: [logging] file: cannot open: {error.strerror}") from None
        plugins = load_plugins(settings)
    except ConfigError as error:
        print(f"qpgevent: {' '.join(str(error).splitlines())}", file=sys.stderr)  # one line, always
        return 2
    if args.check_config:
        print_check(settings, HookRunner(plugins))
        return 0
    try:
        os.makedirs(settings.spool_dir, mode=0o700, exist_ok=True)
    except OSError as error:
        print(f"qpgevent: cannot create spool_dir {settings.spool_dir}: {error.strerror}", file=sys.stderr)
        return 1
    server = SmtpServer(settings, plugins)
    try:
        server.start()
    except OSError as error:
        print(f"qpgevent: cannot listen: {error.strerror} ({error})", file=sys.stderr)
        return 1
    stopping = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    log.info("qpgevent %s ready (pid %d, %d plugins)", __version__, os.getpid(), len(plugins))
    stopping.wait()
    log.info("signal received: stopping")
    server.stop()
    log.info("stopped")
    return 0


def print_check(settings: config_module.Settings, runner: HookRunner) -> None:
    print(f"{settings.path}: OK")
    print("listen: " + ", ".join(str(listen) for listen in settings.listen))
    print("plugins: " + ", ".join(spec.label for spec in settings.plugins))
    for hook, plugins in runner.order().items():
        note = "" if HOOKS[hook].fired else " (reserved, not fired yet)"
        print(f"  {hook}: {' -> '.join(plugins)}{note}")
