#!/usr/bin/env python3
"""Print the live scoreboard of a running qpgevent in the terminal, read from its /status.json.

    tools/scoreboard.py                          # once, from http://127.0.0.1:8025
    tools/scoreboard.py --watch 2                # every 2 seconds until Ctrl-C
    tools/scoreboard.py --watch 1 --count 10     # ten times, a second apart
    tools/scoreboard.py --url http://[::1]:8025 --token "$TOKEN"

The admin pages must be on ([admin] listen in qpsmtpd.ini). The URL and the token may
also come from QPGEVENT_ADMIN_URL and QPGEVENT_ADMIN_TOKEN. Standard library only, so it
runs with any python3 on the host. Exit status: 0, or 1 when the server cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from typing import Any

COLUMNS = (("PID", "pid", 7), ("REMOTE IP", "remote_ip", 15), ("RDNS", "rdns", 24), ("HELO", "helo", 24),
           ("STATE", "state", 10), ("DOING", "doing", 22), ("SENDER", "sender", 28), ("RCPTS", "recipients", 5),
           ("BYTES", "bytes", 9), ("AGE", "age", 7))


def fetch(url: str, token: str, timeout: float = 5.0) -> dict[str, Any]:
    request = urllib.request.Request(url.rstrip("/") + "/status.json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def size(octets: float) -> str:
    for unit in ("B", "K", "M"):
        if octets < 1024:
            return f"{octets:.0f}{unit}" if unit == "B" else f"{octets:.1f}{unit}"
        octets /= 1024
    return f"{octets:.1f}G"


def cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "age":
        return age(value or 0)
    if key == "bytes":
        return size(value or 0)
    text = "-" if value is None or value == "" else str(value)
    return "".join(c if c.isprintable() else "?" for c in text)  # HELO and sender are the client's words


def render(data: dict[str, Any], width: int) -> str:
    totals, since, server = data["totals"], data.get("since_start", {}), data.get("server", {})
    states = ", ".join(f"{count} {state}" for state, count in totals["by_state"].items())
    when = time.strftime("%H:%M:%S", time.localtime(data["time"]))
    lines = [f"qpgevent {server.get('version', '')} on {server.get('me', '')}: {totals['sessions']} sessions "
             f"in {totals['processes']} processes" + (f" ({states})" if states else "") + f"  {when}"]
    if since:
        lines.append(f"since start: {since['connections']} connections, {since['messages_queued']} messages "
                     f"queued, {since['rejections']} refusals, {since['worker_restarts']} worker restarts")
    lines.append("  ".join(title.ljust(w) for title, _, w in COLUMNS).rstrip())
    for row in data["sessions"]:
        cells = []
        for _, key, w in COLUMNS:
            text = cell(row, key)
            text = text if len(text) <= w else text[:w - 1] + "…"
            cells.append(text.rjust(w) if key in ("recipients", "bytes", "age") else text.ljust(w))
        lines.append("  ".join(cells).rstrip())
    if not data["sessions"]:
        lines.append("(no sessions)")
    return "\n".join(line[:width] for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print qpgevent's live sessions from its admin port.")
    parser.add_argument("--url", default=os.environ.get("QPGEVENT_ADMIN_URL", "http://127.0.0.1:8025"),
                        help="the admin address ([admin] listen; default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get("QPGEVENT_ADMIN_TOKEN", ""),
                        help="[admin] token, when the server has one")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="print again every SECONDS")
    parser.add_argument("--count", type=int, default=0,
                        help="with --watch: stop after this many prints (default: until Ctrl-C)")
    args = parser.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        parser.error("--watch needs a positive number of seconds")
    count = 1 if args.watch is None else args.count
    # Cut lines to the terminal's width; into a pipe or a file, keep them whole.
    width = shutil.get_terminal_size((160, 40)).columns if sys.stdout.isatty() else 1 << 16
    clear = sys.stdout.isatty() and args.watch is not None
    printed = 0
    try:
        while True:
            try:
                data = fetch(args.url, args.token)
            except urllib.error.HTTPError as error:
                hint = " (give --token)" if error.code == 401 else ""
                print(f"scoreboard: {args.url}: HTTP {error.code} {error.reason}{hint}", file=sys.stderr)
                return 1
            except (urllib.error.URLError, OSError, ValueError) as error:
                print(f"scoreboard: cannot read {args.url}/status.json: {error}", file=sys.stderr)
                return 1
            if clear:
                sys.stdout.write("\033[H\033[2J")
            print(render(data, width), flush=True)
            printed += 1
            if count and printed >= count:
                return 0
            print(flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
