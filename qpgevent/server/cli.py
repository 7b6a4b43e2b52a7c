"""The command line: ``qpgevent -c qpsmtpd.ini``, ``--check-config``, the commands, exit codes.

One argument parser (``build_parser``) holds every option and command, so ``--help`` lists
them all and ``docs/cli.md`` is generated from it (``tools/gen_docs.py``). The commands
live beside what they drive: ``plugin test`` in ``dryrun``, ``store ...`` in ``store_cli``.
The server itself is the pre-fork master (``master``): signals, workers, reloads.
The exit status of every command is ``EXIT_CODES``: errors are one line on standard
error (naming file, line and key, or the option), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import textwrap

from .. import __version__
from . import privileges
from .. import config as config_module
from ..backends import log as log_module
from ..core.errors import ConfigError, StartError
from ..engine.aliases import deprecation_note
from ..engine.chains import listener_chains
from ..engine.hooks import HOOKS, HookRunner
from ..engine.loader import load_plugins
from ..core.codes import ReturnCode, Verdict
from .master import Master
from .tls import TlsContexts
from ..core.reply import answer
from ..backends.services import configure_services

log = logging.getLogger("qpgevent")


#: The exit status of every command, documented from here (docs/cli.md is generated).
EXIT_CODES = {
    0: "success: the server stopped cleanly; the config is valid; the dry run's message was "
       "accepted; the store command did what it was asked; the session was kicked, the worker is "
       "draining, the address blocked or released",
    1: "the command ran and the answer is no: the server cannot start (cannot listen, cannot "
       "create a folder) or killed a worker that would not stop; the dry run's message was not "
       "accepted; no such store key; the store cannot be reached; no such session or worker (or the "
       "admin server cannot be reached); the address was not blocked",
    2: "a usage or configuration error (one line on standard error naming the file, line and "
       "key, or the option): a bad command line, a config or plugin mistake, serving as root "
       "without allow_root; a steering command without the admin token",
}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the server's options, then the commands (``plugin``, ``store``)."""
    from . import dryrun, status_cli, steer_cli, store_cli  # the commands' own options live beside what they do

    epilog = "exit status:\n" + "\n".join(
        textwrap.fill(text, 78, initial_indent=f"  {code}  ", subsequent_indent="     ")
        for code, text in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="qpgevent", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="A plugin-driven SMTP server. Without a command: serve (or check) the config.")
    parser.add_argument("-c", "--config", default="qpsmtpd.ini", help="the ini file (default: %(default)s)")
    parser.add_argument("-l", "--listen", action="append", metavar="HOST:PORT",
                        help="listen here instead of [server] listen (repeatable; [::1]:25 for IPv6)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="override [logging] level")
    parser.add_argument("-w", "--workers", type=int, metavar="N",
                        help="worker processes, overriding [server] workers (0: one per CPU core)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config, plugins and TLS certificates, print the hook order, exit")
    parser.add_argument("--version", action="version", version=f"qpgevent {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    plugin = commands.add_parser("plugin", help="plugin tools: 'qpgevent plugin test' (a dry run)",
                                 description="Plugin tools.")
    plugin_commands = plugin.add_subparsers(dest="plugin_command", title="commands", metavar="COMMAND",
                                            required=True)
    dryrun.add_test_command(plugin_commands)
    store = commands.add_parser("store", help="inspect and release the policy plugins' shared state "
                                "(greylisting, karma, limit): 'store list', 'store show', 'store release'",
                                description="The [store] of the config, embedded or Redis, as the "
                                "policy plugins see it.")
    store_cli.add_commands(store)
    status_cli.add_command(commands)
    queue = commands.add_parser("queue", add_help=False,
                                help="the outbound queue (queue/outbound): 'queue list|show|flush|hold|"
                                "release|delete|bounce', see 'qpgevent queue --help'")
    queue.add_argument("words", nargs=argparse.REMAINDER)
    queue.set_defaults(handler=_queue_after_options)
    steer_cli.add_commands(commands)
    return parser


def _queue_after_options(args: argparse.Namespace) -> int:
    """``qpgevent -c INI queue ...``: the command after the server's options (main() takes
    ``qpgevent queue ...`` itself, so that --help reaches the queue's own parser); the ini
    named before it is the one the queue tools read."""
    from .queue_tools import main as queue_main
    words = list(args.words)
    if not {"-c", "--config"} & set(words):
        words = ["-c", args.config, *words]
    return queue_main(words)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["queue-runner"]:  # started by the master for queue/outbound, not by hand
        from .queue_runner import main as queue_runner_main
        return queue_runner_main(words[1:])
    if words[:1] == ["queue"]:  # its own parser: argparse's REMAINDER would not pass on --help
        from .queue_tools import main as queue_main
        return queue_main(words[1:])
    args = parse_args(argv)
    if args.command is not None:
        return int(args.handler(args))
    try:
        settings = config_module.load(args.config, listen_override=args.listen)
        if args.workers is not None:
            settings = dataclasses.replace(settings, workers=args.workers)
        if args.check_config:
            privileges.resolve(settings)  # an unknown user or group is a config mistake too
            if settings.tls_certificate:
                TlsContexts(settings)  # a certificate that will not load fails the start: fail the check too
            print_check(settings, HookRunner(load_plugins(settings)))
            return 0
        # Logging first, so what plugins say while they set up goes where the rest goes.
        try:
            log_module.configure_from(settings, args.log_level)
        except OSError as error:
            key = "file" if error.filename or not settings.log_syslog else "syslog_address"
            raise ConfigError(f"{settings.path}: [logging] {key}: cannot open: {error.strerror}") from None
        # The master checks who we run as, binds, loads the plugins (the resolver first),
        # forks the workers and supervises them until TERM/INT.
        try:
            return Master(settings, listen_override=args.listen, workers_override=args.workers,
                          log_level_override=args.log_level).run()
        except StartError:
            # The master binds before it loads the plugins (as root it must: it drops root in
            # between). A mistake in a plugin is what the operator must fix first, and a busy
            # port hides it: so check the plugins now, and report their error first.
            check_plugins(settings)
            raise
    except ConfigError as error:
        print(f"qpgevent: {' '.join(str(error).splitlines())}", file=sys.stderr)  # one line, always
        return 2
    except StartError as error:
        print(f"qpgevent: {error}", file=sys.stderr)
        return 1


def check_plugins(settings: config_module.Settings) -> None:
    """Load the plugins once to find their mistakes (ConfigError), as ``--check-config`` does."""
    configure_services(settings)
    listener_chains(settings, load_plugins(settings))


def print_check(settings: config_module.Settings, runner: HookRunner) -> None:
    print(f"{settings.path}: OK")
    print("listen: " + ", ".join(f"{listen}/{listen.flags}" if listen.flags else str(listen)
                                 for listen in settings.listen))
    print("plugins: " + ", ".join(plugin.name for plugin in runner.plugins))
    for plugin in runner.plugins:
        if plugin.written_as != plugin.name:  # qpsmtpd's old name, loaded as ours
            print(f"deprecated: {deprecation_note(plugin.written_as, plugin.name)}")
    if settings.admin_listen is not None:
        print(f"admin: http://{settings.admin_listen}/status" + (" (token required)" if settings.admin_token else ""))
    order = runner.order()
    for hook, plugins in order.items():
        note = "" if HOOKS[hook].fired else " (reserved, not fired yet)"
        print(f"  {hook}: {' -> '.join(plugins)}{note}")
    for warning in check_warnings(settings, order):
        print(f"warning: {warning}")
    for listen, chain, _ in listener_chains(settings, runner.plugins):  # [listeners]
        print(f"listener {listen}: plugins: " + ", ".join(plugin.name for plugin in chain))
        for hook, plugins in HookRunner(chain).order().items():
            print(f"  {hook}: {' -> '.join(plugins)}")


def check_warnings(settings: config_module.Settings, order: dict[str, list[str]]) -> list[str]:
    """What is valid but surely not meant: a config under which no message can be accepted."""
    warnings = []
    if not order.get("queue"):
        refused = answer("queue", Verdict(ReturnCode.DECLINED), address="", me=settings.me).reply
        warnings.append(f"no queue plugin (such as queue/maildir): every message will get "
                        f"{refused.code} {refused.enhanced} {' '.join(refused.text)}")
    return warnings
