"""``qpgevent store``: look into the policy plugins' shared state, and release an entry.

What qpsmtpd's ``karma_tool`` does for karma, for every policy plugin and both backends
(the embedded SQLite file and Redis, as ``[store]`` of the config says): ``list`` the
live keys (optionally under a prefix), ``show`` one, ``release`` one (a client out of the
karma penalty box, a greylisting triplet forgotten, a rate counter reset). The keys are
the plugins' own (``greylist:<ip> <sender> <recipient>``, ``karma:penalty:IP``,
``karma:nice:IP``, ``karma:naughty:IP``, ``limit:conn:IP``, ``limit:concurrency:IP``,
``limit:rcpt_host:IP``, ``limit:rcpt_sender:<address>``), without the ``[store] prefix``.

It talks to the store directly, not to a running server: it works whether or not the
server runs, and what it releases is gone for every worker at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable

from .. import config as config_module
from ..core.errors import ConfigError
from ..backends.store import open_store
from ..backends.store_base import Entry, Store, StoreUnavailable

#: The prefixes of the bundled policy plugins' keys, for ``--help``.
PLUGIN_PREFIXES = ("greylist:", "karma:", "limit:")


def add_commands(parser: argparse.ArgumentParser) -> None:
    """``store list | show KEY | release KEY`` on the ``store`` command's parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default="qpsmtpd.ini",
                        help="the ini file whose [store] to open (default: %(default)s)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text, for scripts")
    commands = parser.add_subparsers(dest="store_command", title="commands", metavar="COMMAND", required=True)
    listing = commands.add_parser("list", parents=[common], help="the live keys, by key",
                                  description="The live keys of the store, by key: kind (value, events "
                                  "of a rate window, leases of a concurrency limit), value or count, "
                                  "and when each lapses.")
    listing.add_argument("--prefix", default="", metavar="PREFIX",
                         help=f"only keys starting with PREFIX (the plugins': {', '.join(PLUGIN_PREFIXES)})")
    listing.add_argument("--limit", type=int, default=10000, metavar="N", help="at most N keys (default: %(default)s)")
    listing.set_defaults(handler=lambda args: run_on_store(args, _list))
    show = commands.add_parser("show", parents=[common], help="one key: what lives under it",
                               description="What lives under one key. Exit status 1 when nothing does.")
    show.add_argument("key", metavar="KEY", help="a key as list prints it: karma:penalty:192.0.2.1")
    show.set_defaults(handler=lambda args: run_on_store(args, _show))
    release = commands.add_parser("release", parents=[common], help="remove one key: value, events and leases",
                                  description="Remove everything under one key: a client leaves the karma "
                                  "penalty box, a greylisting triplet is forgotten, a rate window starts "
                                  "again. Exit status 1 when nothing was there.")
    release.add_argument("key", metavar="KEY", help="a key as list prints it (quote the spaces of a "
                         "greylisting triplet)")
    release.set_defaults(handler=lambda args: run_on_store(args, _release))


def run_on_store(args: argparse.Namespace, command: Callable[[Store, argparse.Namespace], int],
                 create: bool = False) -> int:
    """Open the ``[store]`` of ``args.config``, run ``command`` on it, close it: the exit status.
    ``create``: an embedded store may be made (else its absence is an error)."""
    # The store logs its outages for a server's log; here our one line says it.
    logging.getLogger("qpgevent").addHandler(logging.NullHandler())
    try:
        settings = config_module.load(args.config)
        options = {key: value for key, value in settings.store.items() if key != "fail"}
        if options.get("backend") == "embedded" and not create and not os.path.exists(options["path"]):
            # Opening would create an empty one: a wrong -c must not look like an empty store.
            return fail(f"no store at {options['path']} (the server has stored nothing yet, or this "
                         f"is not its config)", 1)
        store = open_store(**options)
    except ConfigError as error:
        return fail(" ".join(str(error).splitlines()), 2)
    except ValueError as error:  # the redis package is missing
        return fail(f"{settings.path}: [store] {error}", 2)
    try:
        return command(store, args)
    except StoreUnavailable as error:
        return fail(f"the store cannot be reached: {error}", 1)
    finally:
        store.close()


def fail(message: str, status: int) -> int:
    print(f"qpgevent: {message}", file=sys.stderr)
    return status


def _list(store: Store, args: argparse.Namespace) -> int:
    _print(store.entries(args.prefix, args.limit), args.json)
    return 0


def _show(store: Store, args: argparse.Namespace) -> int:
    found = store.entry(args.key)
    if not found:
        return fail(f"no such key: {args.key}", 1)
    _print(found, args.json)
    return 0


def _release(store: Store, args: argparse.Namespace) -> int:
    gone = store.forget(args.key)
    if args.json:
        print(json.dumps({"key": args.key, "released": gone}))
    elif gone:
        print(f"released {args.key}")
    if not gone:
        return fail(f"no such key: {args.key}", 1)
    return 0


def _print(entries: list[Entry], as_json: bool) -> None:
    if as_json:
        print(json.dumps([entry.as_dict() for entry in entries], indent=1))
        return
    now = time.time()
    for entry in entries:
        what = entry.value if entry.kind == "value" else f"{entry.count} {entry.kind}"
        print(f"{entry.key}\t{entry.kind}\t{what}\t{_lapses(entry.expires, now)}")


def _lapses(expires: float | None, now: float) -> str:
    if expires is None:
        return "never lapses"
    seconds = max(0.0, expires - now)
    return f"lapses in {seconds:.0f}s" if seconds < 3600 else f"lapses in {seconds / 3600:.1f}h"


__all__ = ["add_commands", "run_on_store", "fail", "PLUGIN_PREFIXES"]
