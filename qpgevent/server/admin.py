"""The admin HTTP server: the live status page, its JSON, the Prometheus metrics; and who may see them.

Routes (GET or HEAD; the POST routes that steer the server are ``admin_actions``'):
- ``/status``: an HTML page that reloads itself every ``[admin] refresh`` seconds, listing
  every live session of every process (worker pid, remote ip, rDNS, HELO, state, command
  or hook in progress, sender, recipients, bytes, age), with totals;
  and, with ``queue/outbound``, the outbound queue (``queue_metrics.summary``: messages and
  recipients pending, the oldest one's age, held, deferred and active messages,
  deliveries by outcome since start, failures by destination);
- ``/status.json``: the same data (the queue under ``outbound_queue``, null without one);
- ``/metrics``: the Prometheus text format, summed over every process;
- ``/blocks.json``: the addresses blocked for a while (``qpgevent block``).

Access: with ``[admin] token`` set, every request must carry it, as
``Authorization: Bearer <token>`` or as ``?token=<token>`` (for a browser); without a
token only loopback clients are served, and the config refuses a non-loopback
``[admin] listen`` (see ``config._admin_listen``). The pages show what clients wrote
(HELO, sender): everything is escaped, and a Content-Security-Policy forbids scripts.

Bounded: it runs in the master, whose file descriptors the workers' respawns need, so at
most ``[admin] max_connections`` connections are served at once (the rest wait in the
kernel's accept queue, costing the master nothing) and each is closed after ``[admin]
timeout`` seconds, idle or not: a client holding connections open cannot exhaust the
master's fd table.

Start-up, for the single process (``start_single_process``) or split for a pre-fork
master: ``prepare`` once in the master before forking (empties the run folder, turns the
metrics on), ``start_sessions`` in each process that serves SMTP sessions (after its
fork: it publishes that process's scoreboard), ``serve`` where the HTTP server should run
(the master), ``process_ended`` when the master reaps a worker.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from .. import __version__
from . import steering
from .admin_actions import Actions, Refused, redirect_to_status
from ..backends import metrics, queue_metrics, scoreboard
from ..config import Listen, Settings, is_loopback

log = logging.getLogger("qpgevent.admin")

StartResponse = Callable[..., Any]
HTML_HEADERS = [("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
                ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store")]


def scoreboard_dir(settings: Settings) -> str:
    return os.path.join(settings.admin_run_dir, "scoreboard")


def metrics_dir(settings: Settings) -> str:
    return os.path.join(settings.admin_run_dir, "metrics")


# -- start-up ------------------------------------------------------------------------------
def prepare(settings: Settings) -> bool:
    """Once, at start, in the master (before forking) or the single process: empty the run
    folder of a previous run's files and turn metrics on. False when [admin] is off."""
    if settings.admin_listen is None:
        return False
    os.makedirs(scoreboard_dir(settings), exist_ok=True)
    scoreboard.clear(scoreboard_dir(settings))
    steering.clear(settings.admin_run_dir)
    metrics.init(metrics_dir(settings), clear=True)
    return True


def start_sessions(settings: Settings) -> None:
    """In each process that serves sessions (a worker, after its fork): publish its scoreboard.

    A worker forked from a master that serves the admin pages inherits that server, its
    socket and its accept loop: it is closed here, in the worker only, or the worker would
    answer some of the requests (from its own, fresher, view of the board).
    """
    if _serving is not None and _serving.pid != os.getpid():
        _serving.close_inherited()
    if settings.admin_listen is not None:
        scoreboard.publish(scoreboard_dir(settings))


def process_ended(settings: Settings, pid: int) -> None:
    """The master reaped process ``pid``: drop its live gauges and its scoreboard."""
    if settings.admin_listen is not None:
        try:
            metrics.process_dead(pid)  # lists a folder: needs a file descriptor
            scoreboard.remove_process(scoreboard_dir(settings), pid)
            steering.forget_worker(settings.admin_run_dir, pid)
        except OSError as error:  # out of fds, say: a stale gauge, not a dead master
            log.warning("cannot clear the metrics of process %d: %s", pid, error)


def serve(settings: Settings) -> AdminServer | None:
    """Start the admin HTTP server on ``[admin] listen``; None when off. Raises OSError."""
    if settings.admin_listen is None:
        return None
    app = AdminApp(scoreboard_dir(settings), settings.admin_token, settings.admin_refresh, settings.me)
    app.actions = Actions(settings, scoreboard_dir(settings))
    server = AdminServer(settings.admin_listen, app, settings.admin_max_connections, settings.admin_timeout)
    server.start()
    global _serving
    _serving = server
    return server


def start_single_process(settings: Settings) -> AdminServer | None:
    """All of the above for one process serving SMTP itself (the CLI without a master)."""
    if not prepare(settings):
        return None
    start_sessions(settings)
    try:
        return serve(settings)
    except OSError:
        scoreboard.unpublish()
        raise


class AdminServer:
    """gevent's WSGI server on one address, no access log (errors go to our log);
    ``max_connections`` at once, each closed after ``timeout`` seconds."""

    def __init__(self, listen: Listen, app: AdminApp, max_connections: int = 16, timeout: float = 10.0) -> None:
        self.app = app
        self.pid = os.getpid()
        self.server = _BoundedWSGIServer((listen.host, listen.port), app, log=None, error_log=log,
                                         spawn=Pool(max_connections))
        self.server.connection_timeout = timeout

    @property
    def url(self) -> str:
        host, port = self.server.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        self.server.start()
        # Not "listening on": the test helper reads the SMTP port from that phrase.
        log.info("admin pages on %s/status (also /status.json, /metrics, /health)", self.url)

    def stop(self) -> None:
        self.server.stop(timeout=1)
        scoreboard.unpublish()

    def close_inherited(self) -> None:
        """In a forked child: stop accepting here (the parent's socket stays open)."""
        self.server.close()


class _BoundedWSGIServer(WSGIServer):
    connection_timeout = 10.0

    def handle(self, sock: Any, address: Any) -> None:
        # A Timeout is not an Exception: pywsgi's handlers let it through, and the server
        # closes the socket when this returns.
        with gevent.Timeout(self.connection_timeout, False):
            super().handle(sock, address)


_serving: AdminServer | None = None  #: the server this process started (or inherited by fork)


# -- the pages -----------------------------------------------------------------------------
class AdminApp:
    """The WSGI application: access check, then one of three routes."""

    def __init__(self, directory: str, token: str = "", refresh: float = 2.0, me: str = "") -> None:
        self.directory = directory
        self.token = token
        self.refresh = refresh
        self.me = me
        #: What ``/health`` says: "up" (200); "draining" or "stopping" (503) once a stop began.
        self.health = "up"
        #: Kick, drain, block (POST); None: the pages only.
        self.actions: Actions | None = None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/health":
            # For the balancer's health check, from any address and without the token: it
            # tells only whether to send new sessions here.
            status = "200 OK" if self.health == "up" else "503 Service Unavailable"
            return _respond(start_response, status, f"{self.health}\n".encode(), "text/plain",
                            [("Cache-Control", "no-store")])
        if environ.get("REQUEST_METHOD") == "POST" and self.actions is not None:
            return self.steer(environ, start_response)
        refusal = self.refusal(environ)
        if refusal is not None:
            status, text, extra = refusal
            log.warning("admin: refused %s %s from %s: %s", environ.get("REQUEST_METHOD"),
                        environ.get("PATH_INFO"), environ.get("REMOTE_ADDR"), text)
            return _respond(start_response, status, text.encode() + b"\n", "text/plain; charset=utf-8", extra)
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", b"GET only\n", "text/plain",
                            [("Allow", "GET, HEAD")])
        path = environ.get("PATH_INFO", "/")
        if path in ("/", ""):
            query = environ.get("QUERY_STRING", "")
            return _respond(start_response, "302 Found", b"", "text/plain",
                            [("Location", "/status" + (f"?{query}" if query else ""))])
        if path == "/status":
            query = parse_qs(environ.get("QUERY_STRING", ""))
            page = self.page(query.get("token", [""])[0], query.get("done", [""])[0])
            return _respond(start_response, "200 OK", page.encode(), "text/html; charset=utf-8", HTML_HEADERS)
        if path == "/blocks.json" and self.actions is not None:
            try:
                body = json.dumps(self.actions.blocks(), indent=1).encode()
            except Refused as error:  # the store is down: say so, as JSON
                body, code = json.dumps({"error": str(error)}).encode(), "503 Service Unavailable"
            else:
                code = "200 OK"
            return _respond(start_response, code, body, "application/json", [("Cache-Control", "no-store")])
        if path == "/status.json":
            body = json.dumps(self.status(), indent=1).encode()
            return _respond(start_response, "200 OK", body, "application/json", [("Cache-Control", "no-store")])
        if path == "/metrics":
            body, content_type = metrics.render()
            return _respond(start_response, "200 OK", body, content_type, [("Cache-Control", "no-store")])
        return _respond(start_response, "404 Not Found", b"not found: try /status\n", "text/plain")

    def steer(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """A POST: do it, answer JSON; the page's forms are sent back to /status."""
        assert self.actions is not None
        status, result, form = self.actions.post(environ)
        if form and not status.startswith(("401", "403")):
            location = redirect_to_status(self.token, result)
            return _respond(start_response, "303 See Other", b"", "text/plain", [("Location", location)])
        return _respond(start_response, status, json.dumps(result).encode() + b"\n", "application/json",
                        [("Cache-Control", "no-store")])

    def refusal(self, environ: dict[str, Any]) -> tuple[str, str, list[tuple[str, str]]] | None:
        """Why this request may not be served, or None."""
        if self.token:
            given = ""
            authorization = environ.get("HTTP_AUTHORIZATION", "")
            if authorization[:7].lower() == "bearer ":
                given = authorization[7:].strip()
            else:
                given = parse_qs(environ.get("QUERY_STRING", "")).get("token", [""])[0]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return "401 Unauthorized", "token required", [("WWW-Authenticate", 'Bearer realm="qpgevent"')]
            return None
        if not is_loopback(environ.get("REMOTE_ADDR", "")):
            return "403 Forbidden", "loopback clients only (set [admin] token to allow others)", []
        return None

    def status(self) -> dict[str, Any]:
        data = scoreboard.read(self.directory)
        data["since_start"] = metrics.totals()
        data["outbound_queue"] = queue_metrics.summary()
        data["server"] = {"me": self.me, "version": __version__, "refresh": self.refresh}
        return data

    def page(self, token: str = "", done: str = "") -> str:
        data = self.status()
        kick, drain, steering_section = self.actions.forms(token) if self.actions else (
            lambda row: "", lambda pid: "", "")
        totals, since = data["totals"], data["since_start"]
        states = ", ".join(f"{count} {state}" for state, count in totals["by_state"].items()) or "none"
        rows = "\n".join(_row(session, kick(session)) for session in data["sessions"]) or (
            '<tr><td colspan="11" class="empty">no sessions</td></tr>')
        e = html.escape
        processes = ", ".join(f"{p['pid']} ({p['sessions']}) {drain(p['pid'])}" for p in data["processes"]) or "none"
        done = f'<p id="done"><b>{e(done[:200])}</b></p>' if done else ""
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{self.refresh:g}">
<title>qpgevent {e(self.me)}: {totals['sessions']} sessions</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.3em; margin: 0 0 .3em; }}
p {{ margin: .2em 0; }}
table {{ border-collapse: collapse; margin-top: 1em; width: 100%; }}
th, td {{ text-align: left; padding: .25em .6em; border-bottom: 1px solid #ddd; white-space: nowrap; }}
th {{ background: #f2f2f2; }}
td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.empty {{ color: #888; font-style: italic; }}
.muted {{ color: #666; }}
form.inline {{ display: inline; margin: 0; }}
h2 {{ font-size: 1.1em; margin: 1.2em 0 .3em; }}
</style></head>
<body>
<h1>qpgevent {e(__version__)} on {e(self.me)}</h1>
{done}<p id="totals"><b>{totals['sessions']}</b> live sessions in <b>{totals['processes']}</b> processes
({e(states)}); {_size(totals['bytes'])} received by them.</p>
<p id="since" class="muted">Since start: {since['connections']} connections, {since['transactions']} transactions,
{since['messages_queued']} messages queued, {since['rejections']} refusals,
{_size(since['bytes_received'])} received, {since['worker_restarts']} worker restarts.</p>
<p class="muted">Processes (sessions): {processes}. Reloads every {self.refresh:g} s;
updated {e(time.strftime('%H:%M:%S', time.localtime(data['time'])))}.</p>
<table id="sessions">
<thead><tr><th>Worker</th><th>Remote IP</th><th>rDNS</th><th>HELO</th><th>State</th><th>Doing</th>
<th>Sender</th><th class="num">Rcpts</th><th class="num">Bytes</th><th class="num">Age</th><th>Conn</th></tr></thead>
<tbody>
{rows}
</tbody></table>
{_queue_section(data["outbound_queue"])}
{steering_section}
</body></html>
"""


def _row(session: dict[str, Any], kick: str = "") -> str:
    e = html.escape
    cells = [
        (str(session.get("pid", "")), ""), (session.get("remote_ip") or "", ""),
        (session.get("rdns") or "-", ""), (session.get("helo") or "-", ""),
        (session.get("state") or "", ""), (session.get("doing") or "", ""),
        (session.get("sender") or "-", ""), (str(session.get("recipients", 0)), "num"),
        (_size(session.get("bytes", 0)), "num"), (_age(session.get("age", 0)), "num"),
    ]
    tds = "".join(f'<td class="{cls}">{e(str(text)[:120])}</td>' if cls else f"<td>{e(str(text)[:120])}</td>"
                  for text, cls in cells)
    conn = f'<td>{e(str(session.get("id", "")))} {kick}</td>'
    return f'<tr data-session="{e(str(session.get("id", "")))}">{tds}{conn}</tr>'


def _queue_section(queue: dict[str, Any] | None, domains: int = 20) -> str:
    """The outbound queue: its size, and what became of the deliveries; "" without one."""
    if queue is None:
        return ""
    e = html.escape
    oldest = _age(queue["oldest_seconds"]) if queue["messages"] else "none"
    outcomes = ", ".join(f"{count} {outcome}" for outcome, count in queue["deliveries"].items())
    failures = "\n".join(f'<tr><td>{e(domain[:120])}</td><td class="num">{count}</td></tr>'
                         for domain, count in list(queue["destination_failures"].items())[:domains]) or (
        '<tr><td colspan="2" class="empty">none</td></tr>')
    return f"""<h2>Outbound queue</h2>
<p id="outbound"><b>{queue['messages']}</b> messages ({queue['recipients']} recipients pending):
{queue['deferred']} deferred, {queue['held']} held, {queue['active']} being tried; oldest {oldest}.</p>
<p id="outbound-since" class="muted">Since start (recipients): {e(outcomes)}.</p>
<table id="destination-failures" style="width: auto">
<thead><tr><th>Destination</th><th class="num">Failed or deferred attempts</th></tr></thead>
<tbody>
{failures}
</tbody></table>"""


def _size(octets: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if octets < 1024 or unit == "GiB":
            return f"{octets:.0f} {unit}" if unit == "B" else f"{octets:.1f} {unit}"
        octets /= 1024
    return f"{octets:.1f} GiB"


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _respond(start_response: StartResponse, status: str, body: bytes, content_type: str,
             headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                            *(headers or [])])
    return [body]
