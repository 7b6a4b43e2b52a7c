"""``qpgevent kick``, ``drain-worker``, ``block``, ``release``, ``blocks``: steer a live server.

``kick CONN_ID`` and ``drain-worker PID`` ask the running server, through its admin
server (``--url``, ``--token`` as for ``qpgevent status``; the token is required): a
session is known by its ``conn=`` id (the logs, ``qpgevent status --sessions``, the
status page), a worker by its pid. ``block``, ``release`` and ``blocks`` write and read
the ``[store]`` of the config directly (``-c``), as ``qpgevent store`` does: they work
whether or not the server runs, and with a Redis store a block holds for every host
that shares it, at once for the next connection on each (within
``qpgevent.backends.blocks.CHECK_EVERY`` seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from ..backends import blocks
from ..backends.store_base import Store
from . import store_cli


def add_commands(commands: Any) -> None:
    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument("--url", default=os.environ.get("QPGEVENT_ADMIN_URL", "http://127.0.0.1:8025"),
                       help="the admin URL (default: $QPGEVENT_ADMIN_URL, else %(default)s)")
    admin.add_argument("--token", default=os.environ.get("QPGEVENT_ADMIN_TOKEN", ""),
                       help="the [admin] token, required (default: $QPGEVENT_ADMIN_TOKEN)")
    admin.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default: %(default)s)")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("-c", "--config", default="qpsmtpd.ini",
                       help="the ini file whose [store] holds the blocks (default: %(default)s)")
    store.add_argument("--json", action="store_true", help="print JSON instead of text, for scripts")

    kick = commands.add_parser("kick", parents=[admin], help="close a live session with 421 (by its conn= id)",
                               description="Asks the running server, through its admin server: the worker "
                               "holding the session (parked or not) says 421 4.7.0 "
                               "and closes it; the log says it was kicked by the operator. Exit status 0 "
                               "once the session is gone, 1 when there is no such session or it is still "
                               "there, 2 without a token.")
    kick.add_argument("conn_id", metavar="CONN_ID", help="the session's conn= id, as the logs and "
                      "'qpgevent status --sessions' show it")
    kick.set_defaults(handler=lambda args: _post(args, "/kick", {"id": args.conn_id}))
    drain = commands.add_parser("drain-worker", parents=[admin], help="replace one worker, its sessions finished",
                                description="Asks the running server, through its admin server: the worker "
                                "stops accepting, finishes its sessions (up to "
                                "shutdown_timeout) and exits; the master starts a new one in its place at "
                                "once. No client is refused meanwhile. Exit status 0 when the master took "
                                "the request, 1 when it refused (no such worker, a reload under way).")
    drain.add_argument("pid", type=int, metavar="PID", help="the worker's pid ('qpgevent status --json')")
    drain.set_defaults(handler=lambda args: _post(args, "/drain", {"pid": args.pid}))

    block = commands.add_parser("block", parents=[store], help="refuse an address (or network) at connect for a while",
                                description="Every worker refuses the address at connect, before any plugin, "
                                "with 421 4.7.0 (a temporary refusal: its mail is retried later, not "
                                "bounced), until the duration ends or 'qpgevent release'. Written into the "
                                "config's [store] directly: the server need not run, and a Redis store "
                                "shared by several hosts blocks on all of them.")
    block.add_argument("address", metavar="ADDRESS", help="an IP address or network: 192.0.2.1, 2001:db8::/64")
    block.add_argument("--for", dest="duration", default="1h", metavar="DURATION",
                       help="how long: 90s, 15m, 1h, 2d, 1w (default: %(default)s)")
    block.add_argument("--reason", default="", help="why, for the log and the list")
    block.set_defaults(handler=lambda args: store_cli.run_on_store(args, _block, create=True))
    release = commands.add_parser("release", parents=[store], help="lift a block before it ends",
                                  description="Lift a block. Exit status 1 when there was none.")
    release.add_argument("address", metavar="ADDRESS", help="as it was blocked")
    release.set_defaults(handler=lambda args: store_cli.run_on_store(args, _release))
    listing = commands.add_parser("blocks", parents=[store], help="the addresses blocked now, and until when",
                                  description="The live blocks: address or network, until when, why.")
    listing.set_defaults(handler=lambda args: store_cli.run_on_store(args, _list))


def _post(args: argparse.Namespace, path: str, params: dict[str, Any]) -> int:
    if not args.token:
        return store_cli.fail("steering needs the [admin] token: --token or $QPGEVENT_ADMIN_TOKEN", 2)
    request = urllib.request.Request(args.url.rstrip("/") + path, data=json.dumps(params).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {args.token}"})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            result = json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            said = json.loads(error.read()).get("error", "")
        except ValueError:
            said = ""
        return store_cli.fail(f"{path[1:]}: HTTP {error.code} {said}".rstrip(), 2 if error.code == 401 else 1)
    except (OSError, ValueError) as error:
        return store_cli.fail(f"cannot reach {args.url}: {getattr(error, 'reason', error)}", 1)
    if path == "/kick":
        print(f"kicked {result['kicked']} (worker {result['pid']})" if result["gone"] else
              f"asked worker {result['pid']} to kick {result['kicked']}; it is still listed")
        return 0 if result["gone"] else 1
    print(f"draining worker {result['draining']}; a new worker takes its place")
    return 0


def _block(store: Store, args: argparse.Namespace) -> int:
    try:
        made = blocks.block(store, args.address, blocks.parse_duration(args.duration), args.reason)
    except ValueError as error:
        return store_cli.fail(str(error), 2)
    _print([made], args.json)
    return 0


def _release(store: Store, args: argparse.Namespace) -> int:
    try:
        gone = blocks.release(store, args.address)
    except ValueError as error:
        return store_cli.fail(str(error), 2)
    if args.json:
        print(json.dumps({"address": blocks.normalize(args.address), "released": gone}))
    elif gone:
        print(f"released {blocks.normalize(args.address)}")
    return 0 if gone else store_cli.fail(f"{args.address} is not blocked", 1)


def _list(store: Store, args: argparse.Namespace) -> int:
    _print(blocks.listing(store), args.json)
    return 0


def _print(found: list[blocks.Block], as_json: bool) -> None:
    if as_json:
        print(json.dumps([b.as_dict() for b in found], indent=1))
        return
    for entry in found:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.until))
        print(f"{entry.network}\tuntil {until}\t{entry.reason or '-'}")
