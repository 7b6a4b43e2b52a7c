"""The worker process: what a forked child does with the master's state, then serves until TERM.

A forked child inherits the master's greenlets and signal watchers: the first thing a
worker does is install its own handlers, cancel the master's, kill the master's helper
greenlets and close their descriptors. Then it serves (``_WorkerProcess``) and tells the
master over its pipe (``children``).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
from typing import NoReturn

import gevent
from gevent.event import Event

from . import admin, privileges, steering, watchdog
from ..backends import log as log_module
from ..backends.services import configure_services
from .children import CLOSED, READY, WORKER_BOOT_ERROR, Generation, close_now
from .server import SmtpServer
from .shared_counters import SharedTable, WorkerCounters

log = logging.getLogger("qpgevent.master")

ACCEPTS_PER_WAKE = 32  #: connections a worker accepts per wake-up, when there are several workers


def become_worker(generation: Generation, slot: int, row: int, status_fd: int, *, master_pid: int,
                  listeners: list[socket.socket], table: SharedTable | None, signal_handlers: list[object],
                  admin_server: admin.AdminServer | None, status_fds: set[int]) -> NoReturn:
    """The forked child: shed the master's state, serve, and never return."""
    status = WORKER_BOOT_ERROR
    try:
        # Nothing here may yield to the hub before the master's greenlets are dead:
        # they would run in this process, on the master's pipes.
        privileges.die_with_parent(master_pid)
        stop = Event()
        # Our handlers before cancelling the master's: libev restores the default
        # action (die, for HUP) when a signal's last watcher goes.
        handlers = [gevent.signal_handler(signum, stop.set) for signum in (signal.SIGTERM, signal.SIGINT)]
        handlers.append(gevent.signal_handler(signal.SIGHUP, lambda: None))  # HUP is the master's
        handlers.append(gevent.signal_handler(signal.SIGUSR1, log_module.reopen))  # passed on by the master
        for handler in signal_handlers:
            handler.cancel()  # type: ignore[attr-defined]
        if admin_server is not None:
            admin_server.server.close()  # our copy of the master's admin listener
        # Every greenlet we inherited is the master's (its helpers, an admin request in
        # flight): kill them all. Killing schedules the kill before any I/O wake-up is
        # handled (gevent runs its callbacks before it polls), and a greenlet that has
        # not started never will.
        inherited = [obj for obj in gc.get_objects()
                     if isinstance(obj, gevent.Greenlet) and obj is not gevent.getcurrent() and not obj.dead]
        gevent.killall(inherited, block=True, timeout=5)
        for fd in status_fds:
            close_now(fd)
        assert table is not None
        worker = _WorkerProcess(generation, slot, listeners, WorkerCounters(table, row), status_fd)
        status = worker.serve(stop)
    except BaseException:
        log.exception("worker %d (pid %d) failed", slot, os.getpid())
    finally:
        logging.shutdown()
        os._exit(status)


class _WorkerProcess:
    """One worker: the real ``SmtpServer`` on the inherited listeners, until TERM."""

    def __init__(self, generation: Generation, slot: int, listeners: list[socket.socket],
                 counters: WorkerCounters, status_fd: int) -> None:
        self.generation, self.slot, self.listeners = generation, slot, listeners
        self.counters, self.status_fd = counters, status_fd

    def serve(self, stop: Event) -> int:
        settings = self.generation.settings
        configure_services(settings)  # this worker's own resolver and cache
        admin.start_sessions(settings)
        server = SmtpServer(settings, self.generation.plugins, counters=self.counters)
        server.runner.notify("post_fork", None)  # plugins open their pools here
        server.start(sockets=self.listeners)
        # The admin server's requests for this worker (kick a session), when [admin] is on.
        steering.start_worker(server, settings.admin_run_dir if settings.admin_listen is not None else None)
        # What the worker has built by now (modules, plugins, the master's heap) lives as
        # long as it does: out of the collector's sight, a full collection walks only what
        # sessions make, and pages shared with the master are not written to.
        gc.freeze()
        # A session makes thousands of short-lived containers, nearly all freed by reference
        # counting: collecting the youngest generation every 700 allocations (the default)
        # finds almost nothing each time. Every 20,000: ~1 % of the CPU back, cycles still
        # bounded to a few MiB.
        gc.set_threshold(20_000, *gc.get_threshold()[1:])
        watchdog.start(self.counters.table, self.counters.row, settings.hung_worker_timeout)
        if self.generation.size > 1:
            # Every worker wakes for a new connection; the first takes at most this many
            # before the loop goes round, so a burst still spreads over the workers. gunicorn
            # takes 1; at 100-500 connections in flight that costs ~10 % more CPU per
            # message than 32 (tools/bench, docs/benchmarks.md).
            for stream_server in server.servers:
                stream_server.max_accept = ACCEPTS_PER_WAKE
        # Logged before the master hears of it, so its "ready" line comes after every one of these.
        log.info("worker %d (pid %d, generation %d) serving", self.slot, os.getpid(), self.generation.number)
        os.write(self.status_fd, READY)
        stop.wait()
        server.stop_accepting()
        for sock in self.listeners:
            sock.close()
        os.write(self.status_fd, CLOSED)
        server.stop()
        return 0
