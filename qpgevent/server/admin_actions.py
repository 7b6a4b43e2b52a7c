"""The admin server's steering: kick a session, drain a worker, block or release an address.

Routes (POST, answered in JSON, or with a redirect back to /status for the page's forms):
- ``/kick`` ``id=<conn id>``: the worker holding that session (the scoreboard says which)
  closes it with 421 (``qpgevent.server.steering``); the answer waits up to
  ``KICK_WAIT`` seconds (at most half of ``[admin] timeout``) for it to leave the board
  (``"gone": true``);
- ``/drain`` ``pid=<worker pid>``: that worker stops accepting, finishes its sessions and
  exits; the master starts another in its place (``Master._drain_worker``);
- ``/block`` ``address=<ip or network>``, ``for=<duration: 90s, 15m, 1h, 2d>``,
  ``reason=<text>``: refused at connect by every worker until then
  (``qpgevent.backends.blocks``); ``/release`` ``address=...`` lifts it;
and ``GET /blocks.json``, the live blocks.

Who may: a POST needs ``[admin] token``, even from loopback (without one configured,
nothing can be steered over HTTP), given as ``Authorization: Bearer <token>`` or as the
form field ``token``, never in the URL nor a cookie: a page on another site can make a
browser send a form here, but not with a token it does not know (no CSRF). Parameters
come as a form (``application/x-www-form-urlencoded``) or a JSON object, at most
``MAX_BODY`` octets.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import os
import time
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import parse_qs, quote

import gevent

from ..backends import blocks, scoreboard
from ..backends.store import open_store
from ..backends.store_base import StoreUnavailable
from ..config import Settings
from . import steering

log = logging.getLogger("qpgevent.admin")

MAX_BODY = 8192
KICK_WAIT = 5.0  #: seconds /kick waits for the session to leave the board


class Refused(Exception):
    """A steering request that cannot be done: ``status`` and why."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status


class Actions:
    """What the admin server can do to the live server; ``drain`` is the master's."""

    def __init__(self, settings: Settings, scoreboard_dir: str) -> None:
        self.token = settings.admin_token
        self.run_dir = settings.admin_run_dir
        self.scoreboard_dir = scoreboard_dir
        self.store_options = {key: value for key, value in settings.store.items() if key != "fail"}
        #: Within the admin connection's own time limit ([admin] timeout), with room for the answer.
        self.kick_wait = min(KICK_WAIT, settings.admin_timeout / 2)
        #: Set by the master: drain worker ``pid``; returns why not, or None.
        self.drain: Callable[[int], str | None] | None = None
        #: Set by the master: its live workers' pids (only those are ever signalled).
        self.workers: Callable[[], Collection[int]] | None = None

    # -- HTTP --------------------------------------------------------------------------
    def post(self, environ: dict[str, Any]) -> tuple[str, dict[str, Any], bool]:
        """Do a POST: (HTTP status, the JSON answer, whether it came from the page's form)."""
        form = "json" not in environ.get("CONTENT_TYPE", "")
        try:
            params = self._params(environ, form)
            self._check_token(environ, params)
            route = {"/kick": self.kick, "/drain": self.drain_worker, "/block": self.block,
                     "/release": self.release}.get(environ.get("PATH_INFO", ""))
            if route is None:
                raise Refused("404 Not Found", "no such action: try /kick, /drain, /block, /release")
            return "200 OK", route(params), form
        except Refused as refused:
            log.warning("admin: refused %s from %s: %s", environ.get("PATH_INFO"), environ.get("REMOTE_ADDR"),
                        refused)
            return refused.status, {"error": str(refused)}, form

    def _params(self, environ: dict[str, Any], form: bool) -> dict[str, str]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise Refused("400 Bad Request", "bad Content-Length") from None
        if length > MAX_BODY:
            raise Refused("413 Content Too Large", f"at most {MAX_BODY} octets of parameters")
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        try:
            text = body.decode()
            if form:
                return {key: values[0] for key, values in parse_qs(text).items()}
            data = json.loads(text or "{}")
        except (UnicodeDecodeError, ValueError):
            raise Refused("400 Bad Request", "the parameters are not a form nor a JSON object") from None
        if not isinstance(data, dict):
            raise Refused("400 Bad Request", "the parameters must be a JSON object")
        return {str(key): str(value) for key, value in data.items()}

    def _check_token(self, environ: dict[str, Any], params: dict[str, str]) -> None:
        if not self.token:
            raise Refused("403 Forbidden", "set [admin] token to steer the server over HTTP")
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        given = authorization[7:].strip() if authorization[:7].lower() == "bearer " else params.get("token", "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise Refused("401 Unauthorized", "token required (Authorization: Bearer, or the form's token field)")

    # -- the actions ---------------------------------------------------------------------
    def kick(self, params: dict[str, str]) -> dict[str, Any]:
        conn_id = params.get("id", "").strip()
        row = next((r for r in scoreboard.read(self.scoreboard_dir)["sessions"] if r.get("id") == conn_id), None)
        if row is None:
            raise Refused("404 Not Found", f"no live session {conn_id!r} (see /status.json)")
        pid = int(row["pid"])
        if self.workers is not None and pid not in self.workers():
            raise Refused("409 Conflict", f"process {pid} is not one of this server's workers")
        try:
            steering.ask_to_kick(self.run_dir, pid, conn_id)
        except ValueError as error:
            raise Refused("503 Service Unavailable", str(error)) from None
        except OSError as error:
            raise Refused("409 Conflict", f"cannot reach worker {pid}: {error}") from None
        log.info("admin: kick conn=%s asked of worker %d", conn_id, pid)
        gone = False
        deadline = time.monotonic() + self.kick_wait
        while not gone and time.monotonic() < deadline:
            gevent.sleep(0.1)  # the board is rewritten every scoreboard.INTERVAL
            gone = all(r.get("id") != conn_id for r in scoreboard.read(self.scoreboard_dir)["sessions"])
        return {"kicked": conn_id, "pid": pid, "gone": gone}

    def drain_worker(self, params: dict[str, str]) -> dict[str, Any]:
        try:
            pid = int(params.get("pid", ""))
        except ValueError:
            raise Refused("400 Bad Request", "pid must be a worker's process id") from None
        if self.drain is None:
            raise Refused("409 Conflict", "no workers to drain here (no master)")
        why_not = self.drain(pid)
        if why_not is not None:
            raise Refused("409 Conflict", why_not)
        log.info("admin: drain of worker %d asked", pid)
        return {"draining": pid}

    def block(self, params: dict[str, str]) -> dict[str, Any]:
        try:
            seconds = blocks.parse_duration(params.get("for", "1h"))
            return self._with_store(lambda store: blocks.block(store, params.get("address", ""), seconds,
                                                               params.get("reason", "")).as_dict())
        except ValueError as error:
            raise Refused("400 Bad Request", str(error)) from None

    def release(self, params: dict[str, str]) -> dict[str, Any]:
        try:
            address = blocks.normalize(params.get("address", ""))
        except ValueError as error:
            raise Refused("400 Bad Request", str(error)) from None
        return {"address": address, "released": self._with_store(lambda store: blocks.release(store, address))}

    def blocks(self) -> list[dict[str, Any]]:
        options = self.store_options
        if options.get("backend", "embedded") == "embedded" and not os.path.exists(options.get("path", "")):
            return []  # nothing was ever stored; a look must not make the file
        return self._with_store(lambda store: [b.as_dict() for b in blocks.listing(store)])

    def _with_store(self, use: Callable[[Any], Any]) -> Any:
        # Opened per request, in the master: never an open connection for a worker to inherit.
        store = open_store(**self.store_options)
        try:
            return use(store)
        except StoreUnavailable as error:
            raise Refused("503 Service Unavailable", f"the store cannot be reached: {error}") from None
        finally:
            store.close()

    # -- the page's forms ---------------------------------------------------------------
    def forms(self, token: str) -> tuple[Callable[[dict[str, Any]], str], Callable[[int], str], str]:
        """HTML for the status page: a kick button per session, a drain button per
        worker, the block form and the live blocks. Empty without a token."""
        if not self.token or not hmac.compare_digest(token.encode(), self.token.encode()):
            why = ("open this page as /status?token=... to use them" if self.token else "they need [admin] token")
            return (lambda row: "", lambda pid: "",
                    f'<p class="muted">Steering buttons (kick, drain, block): {why}.</p>')
        e = html.escape
        hidden = f'<input type="hidden" name="token" value="{e(token)}">'

        def button(action: str, name: str, value: str, label: str) -> str:
            return (f'<form method="post" action="/{action}" class="inline">{hidden}'
                    f'<input type="hidden" name="{name}" value="{e(value)}"><button>{label}</button></form>')

        try:
            live = self.blocks()
        except Refused as refused:
            listed = f'<li>{e(str(refused))}</li>'
        else:
            listed = "".join(f'<li>{e(b["network"])} until {e(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["until"])))}'
                             f' {e(b["reason"])} {button("release", "address", b["network"], "release")}</li>'
                             for b in live) or "<li class=\"muted\">none</li>"
        section = (f'<h2>Blocked addresses</h2><ul id="blocks">{listed}</ul>'
                   f'<form method="post" action="/block" id="block">{hidden}'
                   '<input name="address" placeholder="192.0.2.1 or 192.0.2.0/24" required> for '
                   '<input name="for" value="1h" size="5"> reason <input name="reason" size="30"> '
                   '<button>block</button></form>')
        return (lambda row: button("kick", "id", str(row.get("id", "")), "kick"),
                lambda pid: button("drain", "pid", str(pid), "drain"), section)


def redirect_to_status(token: str, result: dict[str, Any]) -> str:
    """Where the page's form goes back to (the token again, and what happened)."""
    said = result.get("error") or ", ".join(f"{key} {value}" for key, value in result.items())
    return f"/status?token={quote(token)}&done={quote(str(said)[:200])}"


__all__ = ["Actions", "Refused", "redirect_to_status"]
