"""The command line: ``qpgevent -c qpsmtpd.ini``, ``--check-config``, exit codes.

The server itself is the pre-fork master (``master``): signals, workers, reloads.
Exit status: 0 after a clean stop, 2 for a configuration or plugin error, or for serving
as root without ``allow_root`` (one line on standard error naming file, line and key; no
traceback), 1 when the server cannot start (cannot listen, cannot create a folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .. import __version__
from . import privileges
from .. import config as config_module
from ..backends import log as log_module
from ..core.errors import ConfigError, StartError
from ..engine.aliases import deprecation_note
from ..engine.hooks import HOOKS, HookRunner
from ..engine.loader import load_plugins
from .master import Master

log = logging.getLogger("qpgevent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qpgevent", description="A plugin-driven SMTP server.")
    parser.add_argument("-c", "--config", default="qpsmtpd.ini", help="the ini file (default: %(default)s)")
    parser.add_argument("-l", "--listen", action="append", metavar="HOST:PORT",
                        help="listen here instead of [server] listen (repeatable; [::1]:25 for IPv6)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="override [logging] level")
    parser.add_argument("-w", "--workers", type=int, metavar="N",
                        help="worker processes, overriding [server] workers (0: one per CPU core)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config and plugins, print the hook order, exit")
    parser.add_argument("--version", action="version", version=f"qpgevent {__version__}")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["plugin"]:  # a subcommand; every other command line is the server's, as before
        from .dryrun import plugin_main

        return plugin_main(words[1:])
    args = parse_args(argv)
    try:
        settings = config_module.load(args.config, listen_override=args.listen)
        if args.workers is not None:
            settings = dataclasses.replace(settings, workers=args.workers)
        if args.check_config:
            privileges.resolve(settings)  # an unknown user or group is a config mistake too
            print_check(settings, HookRunner(load_plugins(settings)))
            return 0
        # Logging first, so what plugins say while they set up goes where the rest goes.
        try:
            log_module.configure(args.log_level or settings.log_level, settings.log_file, settings.log_format,
                                 settings.log_syslog, settings.log_syslog_facility, settings.log_syslog_address)
        except OSError as error:
            key = "file" if error.filename or not settings.log_syslog else "syslog_address"
            raise ConfigError(f"{settings.path}: [logging] {key}: cannot open: {error.strerror}") from None
        # The master checks who we run as, binds, loads the plugins (the resolver first),
        # forks the workers and supervises them until TERM/INT.
        return Master(settings, listen_override=args.listen, workers_override=args.workers).run()
    except ConfigError as error:
        print(f"qpgevent: {' '.join(str(error).splitlines())}", file=sys.stderr)  # one line, always
        return 2
    except StartError as error:
        print(f"qpgevent: {error}", file=sys.stderr)
        return 1


def print_check(settings: config_module.Settings, runner: HookRunner) -> None:
    print(f"{settings.path}: OK")
    print("listen: " + ", ".join(str(listen) for listen in settings.listen))
    print("plugins: " + ", ".join(plugin.name for plugin in runner.plugins))
    for plugin in runner.plugins:
        if plugin.written_as != plugin.name:  # qpsmtpd's old name, loaded as ours
            print(f"deprecated: {deprecation_note(plugin.written_as, plugin.name)}")
    if settings.admin_listen is not None:
        print(f"admin: http://{settings.admin_listen}/status" + (" (token required)" if settings.admin_token else ""))
    for hook, plugins in runner.order().items():
        note = "" if HOOKS[hook].fired else " (reserved, not fired yet)"
        print(f"  {hook}: {' -> '.join(plugins)}{note}")
