"""``qpgevent status``: one view of several hosts, from their admin pages.

For each admin URL given (a cluster's hosts), it reads ``/health`` (up, draining,
stopping) and ``/status.json`` (live sessions, worker processes, counts since start),
and prints a line per host and the cluster's totals; ``--sessions`` adds every live
session (with its ``conn=`` id, which ``qpgevent kick`` takes), ``--json`` prints it all
for scripts and dashboards. The token (``[admin] token``) is sent as a bearer token;
hosts of one cluster share it. Exit status 0 when every host answered and is up, 1
otherwise (a script's "is the cluster whole?").
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any

#: The counters summed over the hosts (``/status.json``'s ``since_start``).
COUNTERS = ("connections", "messages_queued", "rejections", "worker_restarts")


def add_command(commands: Any) -> None:
    status = commands.add_parser(
        "status", help="live sessions and health of one host or a cluster, from their admin pages",
        description="Health, live sessions and counts of one or several hosts, read from their admin "
        "pages ([admin] listen). Exit status 0 when every host answered and is up, 1 otherwise.")
    status.add_argument("--url", action="append", metavar="URL",
                        help="a host's admin URL, repeatable (default: $QPGEVENT_ADMIN_URL, else "
                        "http://127.0.0.1:8025)")
    status.add_argument("--token", default=os.environ.get("QPGEVENT_ADMIN_TOKEN", ""),
                        help="the [admin] token (default: $QPGEVENT_ADMIN_TOKEN)")
    status.add_argument("--sessions", action="store_true", help="also list every live session")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default: %(default)s)")
    status.set_defaults(handler=run)


def _get(url: str, token: str, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def read_host(url: str, token: str, timeout: float) -> dict[str, Any]:
    """One host's health and status; ``error`` says why it could not be read."""
    host: dict[str, Any] = {"url": url.rstrip("/")}
    try:
        _, health = _get(host["url"] + "/health", "", timeout)
        host["health"] = health.decode(errors="replace").strip() or "?"
        code, body = _get(host["url"] + "/status.json", token, timeout)
        if code != 200:
            host["error"] = f"/status.json: HTTP {code} {body.decode(errors='replace').strip()[:80]}"
        else:
            host["status"] = json.loads(body)
    except (OSError, ValueError) as error:
        host["health"] = "unreachable"
        host["error"] = str(getattr(error, "reason", error))
    return host


def summary(hosts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"hosts": len(hosts), "up": sum(h.get("health") == "up" for h in hosts),
                             "sessions": 0, "processes": 0}
    for counter in COUNTERS:
        total[counter] = 0
    for host in hosts:
        status = host.get("status") or {}
        total["sessions"] += status.get("totals", {}).get("sessions", 0)
        total["processes"] += status.get("totals", {}).get("processes", 0)
        for counter in COUNTERS:
            total[counter] += status.get("since_start", {}).get(counter, 0)
    return total


def run(args: argparse.Namespace) -> int:
    urls = args.url or [os.environ.get("QPGEVENT_ADMIN_URL", "http://127.0.0.1:8025")]
    hosts = [read_host(url, args.token, args.timeout) for url in urls]
    total = summary(hosts)
    if args.json:
        print(json.dumps({"hosts": hosts, "total": total}, indent=1))
    else:
        print(f"{'HOST':32} {'HEALTH':11} {'SESSIONS':>8} {'WORKERS':>7} {'CONNECTIONS':>11} {'QUEUED':>8} "
              f"{'REJECTED':>8}")
        for host in hosts:
            status = host.get("status") or {}
            totals, since = status.get("totals", {}), status.get("since_start", {})
            print(f"{host['url'][:32]:32} {host['health'][:11]:11} {totals.get('sessions', '-'):>8} "
                  f"{totals.get('processes', '-'):>7} {since.get('connections', '-'):>11} "
                  f"{since.get('messages_queued', '-'):>8} {since.get('rejections', '-'):>8}"
                  + (f"  ({host['error']})" if "error" in host else ""))
        print(f"{'total: ' + str(total['up']) + ' of ' + str(total['hosts']) + ' up':32} {'':11} "
              f"{total['sessions']:>8} {total['processes']:>7} {total['connections']:>11} "
              f"{total['messages_queued']:>8} {total['rejections']:>8}")
        if args.sessions:
            for host in hosts:
                for row in (host.get("status") or {}).get("sessions", []):
                    print(f"  {host['url']}  conn={row.get('id')} pid={row.get('pid')} {row.get('remote_ip')} "
                          f"{row.get('state')} "
                          f"helo={row.get('helo') or '-'} sender={row.get('sender') or '-'} age={row.get('age')}s")
    whole = all(host.get("health") == "up" and "error" not in host for host in hosts)
    return 0 if whole else 1
