"""Steering a live server, on the worker's side: kicking a session, refusing blocked clients.

*The command channel* (master -> worker). The admin server runs in the master; a
session lives in one worker, and only that worker can close it. The scoreboard says which
worker (pid) holds which session (its ``conn=`` id). To kick one, the master writes an
empty file ``<[admin] run_dir>/control/<pid>/kick.<conn id>`` and sends that worker
``KICK_SIGNAL`` (SIGWINCH: ignored by default, so a worker that has not yet installed its
handler loses nothing, and unused by the server otherwise; SIGUSR1 reopens the logs,
SIGUSR2 is the watchdog's). The worker, woken by the signal, reads and removes every
file in its folder and acts on each. Signals that arrive together merge into one, but
the files do not: nothing is lost, and a kick asked twice is done once. Bounded: at most
``MAX_PENDING`` files wait per worker (a further request is refused), a name is a
checked conn id, and the master removes a dead worker's folder when it reaps it.
No new socket, pipe or dependency; the folder belongs to the server's user.

*Kicking* a session: its greenlet is killed with ``Kicked``, a ``GreenletExit`` that
carries the last words (``421 4.7.0 ... closing connection``): the session says them and
ends as at shutdown (disconnect hook, summary line). A parked session (no greenlet,
``parking``) is woken first, and killed as soon as its new greenlet runs.

*Blocked clients* (``qpgevent.backends.blocks``): ``refused_as_blocked`` is called by the
listener at connect, after a PROXY header (so it judges the real client), before the
session and any plugin: a blocked client gets ``421 4.7.0`` and is closed at once.
Why 421 and not 554: RFC 5321 3.1 lets a server refuse a connection with 554 instead
of 220, but then it must keep the connection open until the client's QUIT and answer
503 to everything else, while 421 (3.8, 4.2.2) closes at once; and a block lasts a
while: the client's mail is to be retried later (a 4xx), not bounced (a 5xx), so that
nothing is lost when the block lapses or was a mistake.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from typing import Any

import gevent

from ..backends import blocks as blocks_module
from ..backends import metrics
from ..core.reply import Reply, reply

log = logging.getLogger("qpgevent.steering")

KICK_SIGNAL = signal.SIGWINCH
MAX_PENDING = 64  #: kick files waiting per worker; past that, a request is refused
WAKE_DEADLINE = 5.0  #: seconds a woken parked session has to get its greenlet before the kick gives up
CONN_ID = re.compile(r"[0-9a-f]{1,16}\.[0-9a-f]{1,16}")  #: ``qpgevent.connection``'s ids: pid.counter in hex


class Kicked(gevent.GreenletExit):
    """Ends a session's greenlet; the session says ``last_words`` first."""

    def __init__(self, last_words: Reply) -> None:
        super().__init__()
        self.last_words = last_words


def control_dir(run_dir: str, pid: int) -> str:
    return os.path.join(run_dir, "control", str(pid))


def clear(run_dir: str) -> None:
    """At start (the master): a previous run's requests are stale."""
    shutil.rmtree(os.path.join(run_dir, "control"), ignore_errors=True)


def forget_worker(run_dir: str, pid: int) -> None:
    """The master reaped ``pid``: its pending requests go with it."""
    shutil.rmtree(control_dir(run_dir, pid), ignore_errors=True)


# -- the master's side ---------------------------------------------------------------
def ask_to_kick(run_dir: str, pid: int, conn_id: str) -> None:
    """Ask worker ``pid`` to close session ``conn_id``. Raises ValueError (a bad id, too
    many requests waiting) or OSError (the worker is gone, the folder cannot be written)."""
    if not CONN_ID.fullmatch(conn_id):
        raise ValueError(f"not a connection id: {conn_id!r}")
    folder = control_dir(run_dir, pid)
    os.makedirs(folder, exist_ok=True)
    if len(os.listdir(folder)) >= MAX_PENDING:
        raise ValueError(f"worker {pid} has {MAX_PENDING} requests waiting already")
    with open(os.path.join(folder, f"kick.{conn_id}"), "wb"):
        pass
    os.kill(pid, KICK_SIGNAL)


# -- the worker's side ---------------------------------------------------------------
class WorkerControls:
    """In a worker: act on the master's requests for this process."""

    def __init__(self, server: Any, run_dir: str) -> None:
        self.server = server
        self.folder = control_dir(run_dir, os.getpid())
        self._handler: Any = None

    def start(self) -> None:
        self._handler = gevent.signal_handler(KICK_SIGNAL, self.read_requests)

    def read_requests(self) -> None:
        """Take every waiting request (in a greenlet of its own: the signal's)."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        for name in names[:MAX_PENDING]:
            try:
                os.remove(os.path.join(self.folder, name))
            except FileNotFoundError:
                continue  # taken by a handler that ran meanwhile
            what, _, conn_id = name.partition(".")
            if what == "kick" and CONN_ID.fullmatch(conn_id):
                gevent.spawn(self.kick, conn_id)
            else:
                log.warning("ignoring the unknown request %r in %s", name, self.folder)

    def kick(self, conn_id: str) -> bool:
        """Close session ``conn_id`` with 421 if this worker holds it; whether it did."""
        server = self.server
        last_words = reply(421, "4.7.0", f"{server.settings.me} Closing connection at the operator's request",
                           close=True)
        parked = next((s for s in list(server.sessions) if getattr(getattr(s, "connection", None), "id", None)
                       == conn_id), None)
        if parked is not None:
            server.parking.wake(parked)  # into a greenlet of its own, which we then end
            greenlet = None
            with gevent.Timeout(WAKE_DEADLINE, False):
                while greenlet is None:
                    gevent.sleep(0)
                    greenlet = server.holding.get(conn_id)
        else:
            greenlet = server.holding.get(conn_id)
        if greenlet is None:
            log.info("kick: no session conn=%s in this worker (ended already?)", conn_id)
            return False
        log.warning("conn=%s kicked by the operator%s: closing with 421", conn_id, " (was parked)" if parked else "")
        return server.end_session(conn_id, Kicked(last_words))


def start_worker(server: Any, run_dir: str | None) -> WorkerControls | None:
    """In a worker, once its server serves: take the master's requests (None without [admin])."""
    if run_dir is None:
        return None
    controls = WorkerControls(server, run_dir)
    controls.start()
    return controls


# -- blocked clients, at connect ------------------------------------------------------
def refused_as_blocked(server: Any, sock: Any, connection: Any) -> bool:
    """If ``connection``'s client is blocked: log it, say 421 4.7.0, close, True."""
    found = server.blocks.refusal(connection.remote_ip)
    if found is None:
        return False
    reason = f": {found.reason}" if found.reason else ""
    log.info("conn=%s %s is blocked by the operator (%s)%s; refused with 421", connection.id,
             connection.remote_ip, found.network, reason)
    metrics.connection_refused("blocked")
    server._refuse(sock, reply(421, "4.7.0", f"{server.settings.me} Your address is blocked for a while, "
                                             f"try again later", close=True))
    return True


def block_list(services: Any) -> blocks_module.BlockList:
    """The server's blocks, read from its own store (``[store]``): the same one the CLI writes."""
    return blocks_module.BlockList(lambda: services.store)
