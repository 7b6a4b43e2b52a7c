"""``qpgevent queue ...``: look at the outbound queue and act on its messages.

Owns the command line the operator uses on the queue of ``queue/outbound``::

    qpgevent queue [-c INI] [--json] list
    qpgevent queue [-c INI] [--json] show ID
    qpgevent queue [-c INI] flush [ID]        try now (all, or one message)
    qpgevent queue [-c INI] hold ID           no attempts until released
    qpgevent queue [-c INI] release ID        attempts again, the next one now
    qpgevent queue [-c INI] delete ID         forget it, no notice to anyone
    qpgevent queue [-c INI] bounce ID         fail its pending recipients; the sender gets a notice
    qpgevent queue [-c INI] tlsrpt            end the TLS-RPT period now: its reports go out

The queue folder is the ``queue_dir`` of ``[[queue/outbound]]`` in the ini (or
``--queue-dir``). A command that changes a message is sent to the running queue runner,
which applies it (after the attempt in flight, if one is), so the two never write the
same envelope at once; the tool then waits until the change is on disk. With no runner,
the tool applies it itself, holding the folder's runner lock meanwhile (a runner starting
then waits for it; while a runner holds the lock but does not listen yet, in a reload
say, the tool tries again). Exit status: 0 done, 1 no such message (or not applied in
time), 2 a configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from .. import config as config_module
from ..backends.delivery import COMMANDS, Options, Runner
from ..core.errors import ConfigError
from ..backends.outqueue import Envelope, Queue, State
from .children import close_now
from .queue_runner import lock_queue, plugin_config, options_from_config

__all__ = ["main", "summary"]

APPLY_TIMEOUT = 30.0  #: seconds the tool waits for the runner to apply a command


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qpgevent queue", description="The outbound queue of queue/outbound.")
    parser.add_argument("-c", "--config", default="qpsmtpd.ini", help="the ini file (default: %(default)s)")
    parser.add_argument("--queue-dir", help="the queue folder (default: queue_dir of [[queue/outbound]])")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("command", choices=("list", "show", *COMMANDS, "tlsrpt"))
    parser.add_argument("id", nargs="?")
    args = parser.parse_args(argv)
    if args.command not in ("list", "flush", "tlsrpt") and not args.id:
        parser.error(f"{args.command} needs a message ID")
    return args


def summary(envelope: Envelope, now: float) -> dict[str, Any]:
    """One message in ``list``: what an operator looks at first."""
    pending = envelope.pending()
    return {"id": envelope.id, "sender": envelope.sender, "size": envelope.size, "arrived": envelope.arrived,
            "age": round(now - envelope.arrived, 3), "attempts": envelope.attempts, "held": envelope.held,
            "next_attempt": envelope.next_attempt, "kind": envelope.kind,
            "recipients": len(envelope.recipients), "pending": [r.address for r in pending],
            "last_reply": next((r.reply for r in pending if r.reply), "")}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        queue, options = _open(args)
    except (ConfigError, ValueError) as error:
        print(f"qpgevent queue: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return 2
    if args.command == "list":
        return _list(queue, args.json)
    if args.command == "show":
        return _show(queue, args.id, args.json)
    if args.command == "tlsrpt":
        if options.tls is None or options.tls.reports is None:
            print("qpgevent queue: tlsrpt is off in [[queue/outbound]]", file=sys.stderr)
            return 1
        if not queue.kick("tlsrpt"):
            print("qpgevent queue: no queue runner is running; it reports when it runs", file=sys.stderr)
            return 1
        return 0
    return _act(queue, options, args.command, args.id)


def _open(args: argparse.Namespace) -> tuple[Queue, Options]:
    me = "localhost"
    if args.queue_dir:
        return Queue(args.queue_dir), Options(me=me)
    settings = config_module.load(args.config)
    config = plugin_config(settings)
    if config is None:
        raise ConfigError(f"{settings.path}: no [[queue/outbound]] in [plugins], and no --queue-dir")
    return Queue(config["queue_dir"], fsync=config["fsync"]), options_from_config(config, settings.me)


def _list(queue: Queue, as_json: bool) -> int:
    now = time.time()
    rows = []
    for message_id in queue.ids():
        try:
            rows.append(summary(queue.load(message_id), now))
        except FileNotFoundError:
            continue  # delivered while we looked
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    for row in rows:
        flags = " held" if row["held"] else ""
        print(f"{row['id']} {row['size']:>9} {_when(row['age'])} <{row['sender']}>{flags}")
        for address in row["pending"]:
            print(f"    {address}")
        if row["last_reply"]:
            print(f"    ({row['last_reply']})")
    print(f"-- {len(rows)} message(s)")
    return 0


def _show(queue: Queue, message_id: str, as_json: bool) -> int:
    try:
        envelope = queue.load(message_id)
    except FileNotFoundError:
        print(f"qpgevent queue: no message {message_id}", file=sys.stderr)
        return 1
    data = dataclasses.asdict(envelope)
    data["recipients"] = [dict(r, state=r["state"].value) for r in data["recipients"]]
    data["header"] = queue.message_head(message_id).decode("utf-8", "replace")
    if as_json:
        print(json.dumps(data, indent=1))
        return 0
    for key, value in data.items():
        if key not in ("recipients", "header"):
            print(f"{key}: {value}")
    for recipient in data["recipients"]:
        print(f"recipient: <{recipient['address']}> {recipient['state']} {recipient['reply']}".rstrip())
    print()
    print(data["header"].rstrip())
    return 0


def _act(queue: Queue, options: Options, verb: str, message_id: str | None) -> int:
    if verb == "flush" and not message_id:
        if not queue.kick("flush"):
            print("qpgevent queue: no queue runner is running; messages wait for it", file=sys.stderr)
            return 1
        return 0
    assert message_id is not None
    if message_id not in queue.ids():
        print(f"qpgevent queue: no message {message_id}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + APPLY_TIMEOUT
    while not queue.kick(f"{verb} {message_id}"):
        lock = lock_queue(queue.directory)
        if lock is not None:  # no runner: nothing else writes the envelope; apply it here
            try:
                found = Runner(queue, options, blocking=lambda function, *a, **k: function(*a, **k)).command(
                    verb, message_id)
            finally:
                close_now(lock)
            if not found:
                print(f"qpgevent queue: no message {message_id}", file=sys.stderr)
            return 0 if found else 1
        if time.monotonic() > deadline:
            print(f"qpgevent queue: {verb} {message_id}: the queue runner did not listen within "
                  f"{APPLY_TIMEOUT:.0f}s", file=sys.stderr)
            return 1
        time.sleep(0.05)  # a runner holds the folder but does not listen yet (starting, stopping)
    while time.monotonic() < deadline:
        if _applied(queue, verb, message_id):
            return 0
        time.sleep(0.05)  # the runner applies it in its own time; poll the folder
    print(f"qpgevent queue: {verb} {message_id}: not applied within {APPLY_TIMEOUT:.0f}s "
          "(no such message, or the runner is busy with it)", file=sys.stderr)
    return 1


def _applied(queue: Queue, verb: str, message_id: str) -> bool:
    try:
        envelope = queue.load(message_id)
    except FileNotFoundError:
        return verb in ("delete", "bounce", "flush", "release")  # gone: deleted, or delivered meanwhile
    if verb == "hold":
        return envelope.held
    if verb == "release":
        return not envelope.held
    if verb == "bounce":
        return not any(r.state is State.PENDING for r in envelope.recipients)
    if verb == "flush":
        return True
    return False


def _when(age: float) -> str:
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= seconds:
            return f"{age / seconds:5.1f}{unit}"
    return f"{age:5.1f}s"
