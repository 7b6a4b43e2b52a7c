"""The pre-fork master: bind, check, load, fork the workers; reap, respawn, reload, stop.

Theory of operation.

*Listeners.* The master binds every listen address itself and the workers inherit the
sockets across ``fork``: one kernel accept queue per address, shared by every process
that holds it. We chose this over ``SO_REUSEPORT`` (one queue per worker) because the
master keeps its copy open for its whole life: while workers roll over on a reload, or
one is respawned, connections wait in the queue for whichever worker accepts next, and
none is refused. With SO_REUSEPORT, connections queued on a worker that exits are reset,
and the kernel hashes clients to queues whether or not the worker behind one is busy.

*Startup.* Config first (exit 2 on a mistake), then who we will run as (``privileges``:
exit 2 for root without ``allow_root``), bind (exit 1), drop root, load every plugin
(exit 2, one line: a bad plugin fails the start here, once, before any fork, instead of
crash-looping in the workers), then fork ``workers`` workers. The master logs
``ready (pid ...)`` once every worker has said it is serving.

*gevent and fork* (see aesthetics.md 2.5). The master is monkey-patched like everything
else (``__main__`` patches first): plugins are imported in the master, and the workers
run those very modules, so they must be imported patched. So the master forks with
``gevent.os.fork_and_watch`` (which reinitialises the hub in the child and starts a
libev child watcher in the master) and reaps each worker with the cooperative
``gevent.os.waitpid``, in one small greenlet per worker; never a raw SIGCHLD handler,
which would race libev's. Signals go through ``gevent.signal_handler``, and the handlers
only queue the signal; the main greenlet does everything (gunicorn's arbiter shape), and
it alone forks. A forked child sheds the master's state first (``worker``); workers talk
back over a pipe (``children``, the master's records of them).

*Respawn.* A worker that dies unasked is reaped, its session leases are cleared (see
``shared_counters``), the log says how it died (``exited with status 3``, ``killed by
signal SIGKILL``), and it is forked again: at once if it had served for a while, else
after a backoff that doubles from 0.5 s up to 30 s. A fork that fails (EMFILE on its pipe,
EAGAIN or ENOMEM) is logged and tried again after the same kind of backoff: the master
never dies of it.

*Drain one worker* (the operator's request, ``POST /drain`` of the admin server): the
master TERMs it (it drains as at a stop, below) and forks its successor in the same slot
at once; the listeners stay open in the master and the other workers, so no client is
refused meanwhile.

*Signals.* USR1: reopen the log file (after logrotate moved it), here and, passed on, in
every worker. TERM and INT: the master closes its listeners and sends TERM to every worker,
which closes its own (the kernel then refuses new clients), lets its sessions finish for
up to ``shutdown_timeout``, says 421 to the rest, and exits; the master exits 0 when the
last one has (or SIGKILLs stragglers ``KILL_GRACE`` seconds later and exits 1). HUP: a
reload (``reload``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

import gevent
import gevent.os
from gevent.pool import Group
from gevent.queue import Queue
from gevent.socket import wait_read

from .. import __version__
from . import admin, privileges
from ..backends import metrics
from ..config import Settings
from ..core.errors import StartError
from ..engine.loader import load_plugins
from . import queue_runner
from .server import bind_listeners, describe_listener
from .tls import TlsContexts
from ..backends.services import configure_services
from . import watchdog
from ..backends import log as log_module
from ..transaction import remove_spill_files
from .children import CLOSED, READY, Generation, Worker, close_now, describe_status, worker_count
from .reload import Reloading
from .open_files import raise_open_files
from .shared_counters import DEFAULT_CAPACITY, SharedTable
from .worker import become_worker

log = logging.getLogger("qpgevent.master")

QUICK_EXIT = 5.0  #: a worker that dies sooner than this after its start died "at once"
BACKOFF_FIRST = 0.5  #: seconds before respawning a worker that died at once; doubles
BACKOFF_MAX = 30.0
KILL_GRACE = 10.0  #: seconds past shutdown_timeout before a stopping worker is SIGKILLed


class Master(Reloading):
    def __init__(self, settings: Settings, listen_override: list[str] | None = None,
                 workers_override: int | None = None, log_level_override: str | None = None) -> None:
        self.settings = settings
        self.listen_override = listen_override
        self.workers_override = workers_override
        self.log_level_override = log_level_override  #: --log-level: kept over [logging] level at a reload
        self.pid = os.getpid()
        self.listeners: list[socket.socket] = []
        self.workers: dict[int, Worker] = {}  #: pid -> worker, every live one
        self.events: Queue = Queue()
        self.helpers = Group()  #: the master's greenlets (a worker kills its copies)
        self.status_fds: set[int] = set()  #: read ends of the workers' pipes, in the master
        self.signal_handlers: list[object] = []
        self.current: Generation | None = None
        self.pending: Generation | None = None  #: a reload whose workers are starting
        self.reload_again = False
        self.stopping = False
        self.draining = False  #: /health says "draining"; the stop follows after drain_delay
        self.closed_everywhere = False
        self.killed_any = False
        self.announced = False
        self.table: SharedTable | None = None
        self.admin_server: admin.AdminServer | None = None
        self.identity: privileges.Identity | None = None
        self.queue_runner: queue_runner.Supervisor | None = None  #: with queue/outbound

    # -- start ----------------------------------------------------------------------
    def run(self) -> int:
        """Serve until TERM/INT; the exit status. ConfigError (2) and StartError (1) escape."""
        settings = self.settings
        self.identity = privileges.plan(settings)
        folders = {"spool_dir": settings.spool_dir}
        if settings.admin_listen is not None:
            folders["[admin] run_dir"] = settings.admin_run_dir
        for name, folder in folders.items():  # made for the user we will run as
            try:
                privileges.prepare_dir(folder, self.identity)
            except OSError as error:
                raise StartError(f"cannot create {name} {folder}: {error.strerror}") from None
        try:
            self.listeners, skipped = bind_listeners(settings.listen)
        except OSError as error:
            raise StartError(f"cannot listen: {error.strerror} ({error})") from None
        try:
            if settings.pidfile:
                try:
                    privileges.write_pidfile(settings.pidfile)
                except OSError as error:
                    raise StartError(f"cannot write pidfile {settings.pidfile}: {error.strerror}") from None
            privileges.drop(self.identity)
            # As the user we serve as. The resolver first: plugins may look names up in setup.
            configure_services(settings)
            plugins = load_plugins(settings)  # ConfigError: exit 2, before any fork
            if settings.tls_certificate:
                TlsContexts(settings)  # an unreadable certificate: ConfigError too, not crashing workers
            self.admin_server = self._start_admin(settings)
            actions = self.admin_server.app.actions if self.admin_server is not None else None
            if actions is not None:  # POST /drain (the page's "drain" buttons), and whom /kick may signal
                actions.drain, actions.workers = self._request_drain, self.workers.keys
        except BaseException:
            self._close_listeners()
            if settings.pidfile:
                privileges.remove_pidfile(settings.pidfile)
            raise
        # Only now, so that a bad plugin prints its one line and nothing else.
        privileges.announce(settings, self.identity)
        removed = remove_spill_files(settings.spool_dir)  # no session is alive yet: all are stale
        if removed:
            log.info("removed %d message body file(s) left in %s by an earlier run", removed, settings.spool_dir)
        for listen, reason in skipped:
            log.warning("not listening on %s: %s", listen, reason)
        for sock in self.listeners:
            log.info("listening on %s", describe_listener(sock))
        size = worker_count(settings)
        _, too_few = raise_open_files(settings.max_connections, size)  # before the forks: workers inherit it
        if too_few:
            log.warning("%s", too_few)
        pool = settings.max_connections + max(16, settings.max_connections // 8)
        # Room for the workers of two generations (a reload) and respawns meanwhile.
        self.table = SharedTable(rows=4 * size + 4, capacity=max(DEFAULT_CAPACITY, pool))
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            self.signal_handlers.append(gevent.signal_handler(signum, self.events.put, ("signal", signum)))
        self.current = Generation(1, settings, plugins, size)
        for slot in range(size):
            self._spawn(self.current, slot)
        self.helpers.spawn(self._watch_heartbeats)
        self.queue_runner = queue_runner.supervise(settings, plugins)  # after the forks: workers need no copy
        try:
            return self._loop()
        finally:
            if self.queue_runner is not None:
                self.queue_runner.stop()
                self.queue_runner.wait()
            self._close_listeners()
            if self.admin_server is not None:
                self.admin_server.stop()
            if settings.pidfile:
                privileges.remove_pidfile(settings.pidfile)

    @staticmethod
    def _start_admin(settings: Settings) -> admin.AdminServer | None:
        """The status pages and metrics, served by the master for every worker."""
        try:
            admin.prepare(settings)
            return admin.serve(settings)
        except OSError as error:
            raise StartError(f"[admin] cannot start: {error.strerror} ({error})") from None

    def _loop(self) -> int:
        handlers = {"signal": self._on_signal, "status": self._on_status, "exited": self._on_exit,
                    "respawn": self._on_respawn, "deadline": self._on_deadline, "drained": self._stop,
                    "drain": self._drain_worker}
        while not (self.stopping and not self.workers):
            kind, *args = self.events.get()
            try:
                handlers[kind](*args)
            except Exception:  # every worker and session depends on the master: log, carry on
                log.exception("master: handling %s %r failed", kind, args)
        self.helpers.kill(block=True, timeout=5)
        log.info("stopped")
        return 1 if self.killed_any else 0

    # -- forking ----------------------------------------------------------------------
    def _spawn(self, generation: Generation, slot: int) -> None:
        """Fork worker ``slot``; when that fails (no row, EMFILE on the pipe, EAGAIN or
        ENOMEM on the fork), log it and try again after a backoff: never die of it, the
        running workers and their sessions depend on the master."""
        assert self.table is not None
        row = self.table.claim_row()
        if row is None:  # cannot happen with the sizing above, short of reload storms
            self._retry_spawn(generation, slot, "no room in the session table")
            return
        fds: list[int] = []
        try:
            fds += os.pipe()
            pid = gevent.os.fork_and_watch()
        except OSError as error:
            for fd in fds:
                close_now(fd)
            self.table.clear_row(row)
            self._retry_spawn(generation, slot, error.strerror or str(error))
            return
        read_fd, write_fd = fds
        if pid == 0:
            close_now(read_fd)
            become_worker(generation, slot, row, write_fd, master_pid=self.pid, listeners=self.listeners,
                          table=self.table, signal_handlers=self.signal_handlers,
                          admin_server=self.admin_server, status_fds=self.status_fds)
        close_now(write_fd)
        os.set_blocking(read_fd, False)
        generation.spawn_failures.pop(slot, None)
        worker = Worker(generation, slot, pid, row)
        self.workers[pid] = worker
        generation.slots[slot] = worker
        self.status_fds.add(read_fd)
        self.helpers.spawn(self._watch, worker, read_fd)

    def _retry_spawn(self, generation: Generation, slot: int, why: str) -> None:
        failures = generation.spawn_failures.get(slot, 0) + 1
        generation.spawn_failures[slot] = failures
        generation.slots.setdefault(slot, None)
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
        log.error("cannot start worker %d: %s; retrying in %.1fs", slot, why, delay)
        self.helpers.add(gevent.spawn_later(delay, self.events.put, ("respawn", generation, slot)))

    def _watch(self, worker: Worker, read_fd: int) -> None:
        """Relay what the worker says; at EOF (it is gone), reap it with gevent's waitpid.

        A worker forked while this greenlet exists gets a copy of it, and of ``read_fd``.
        The copy must never read (the bytes are the master's), so every read is preceded,
        with no switch in between, by a look at who we are.
        """
        while True:
            wait_read(read_fd)
            if os.getpid() != self.pid:
                return  # a copy in a worker, about to be killed
            try:
                data = os.read(read_fd, 64)
            except BlockingIOError:
                continue
            if not data:
                break
            for byte in data:
                self.events.put(("status", worker, bytes([byte])))
        self.status_fds.discard(read_fd)
        close_now(read_fd)
        _, status = gevent.os.waitpid(worker.pid, 0)
        self.events.put(("exited", worker, status))

    def _watch_heartbeats(self) -> None:
        """Every second: a ready worker whose loop has not beaten for ``hung_worker_timeout``
        is asked what it is doing (it logs the hook and plugin), then killed; it is reaped
        and respawned as any dead worker is."""
        while os.getpid() == self.pid:
            gevent.sleep(watchdog.BEAT)
            assert self.table is not None
            for worker in list(self.workers.values()):
                timeout = worker.generation.settings.hung_worker_timeout
                late = watchdog.is_hung(self.table, worker.row, timeout) if worker.ready else 0.0
                if late and not worker.hung:
                    worker.hung = True
                    log.error("%s has not run its event loop for %.0fs ([server] hung_worker_timeout = %gs): "
                              "replacing it", worker, late, timeout)
                    self._signal(worker, watchdog.REPORT_SIGNAL)
                    self.helpers.add(gevent.spawn_later(watchdog.REPORT_GRACE, self._kill_hung, worker))

    def _kill_hung(self, worker: Worker) -> None:
        if self.workers.get(worker.pid) is worker:  # not reaped meanwhile (its pid could be reused)
            self._signal(worker, signal.SIGKILL)

    # -- events -------------------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._reload()
        elif signum == signal.SIGUSR1:  # logrotate's postrotate: reopen the log file everywhere
            log_module.reopen()
            for worker in list(self.workers.values()):
                self._signal(worker, signal.SIGUSR1)
            log.info("SIGUSR1: log file reopened; passed on to %d worker(s)", len(self.workers))
        else:
            self._drain_then_stop(signal.Signals(signum).name)

    def _on_status(self, worker: Worker, what: bytes) -> None:
        if what == READY:
            worker.ready = True
            generation = worker.generation
            if generation is self.pending and generation.all_ready():
                self._switch_to(generation)
            elif generation is self.current and not self.announced and generation.all_ready():
                self.announced = True
                log.info("qpgevent %s ready (pid %d, %d workers, %d plugins)", __version__, self.pid,
                         generation.size, len(generation.plugins))
        elif what == CLOSED:
            worker.closed = True
            self._check_closed()

    def _on_exit(self, worker: Worker, status: int) -> None:
        self.workers.pop(worker.pid, None)
        assert self.table is not None
        leases = self.table.clear_row(worker.row)
        admin.process_ended(worker.generation.settings, worker.pid)
        spilled = remove_spill_files(worker.generation.settings.spool_dir, worker.pid)
        generation = worker.generation
        if generation.slots.get(worker.slot) is worker:
            generation.slots[worker.slot] = None
        uptime = time.monotonic() - worker.started
        how = describe_status(status)
        cleared = f"; {leases} session lease(s) cleared" if leases else ""
        cleared += f"; {spilled} message body file(s) removed" if spilled else ""
        expected = worker.stopping and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        log.log(logging.INFO if expected else logging.ERROR, "%s of generation %d %s after %.1fs%s",
                worker, generation.number, how, uptime, cleared)
        if self.stopping:
            self._check_closed()
            return
        if worker.stopping:
            self._check_drained()
            return
        if generation is self.pending:
            self._abort_reload(f"{worker} {how} before serving")
            return
        if generation is not self.current:
            return
        quick = not worker.ready or uptime < QUICK_EXIT
        failures = generation.failures.get(worker.slot, 0) + 1 if quick else 0
        generation.failures[worker.slot] = failures
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1)) if failures else 0.0
        log.warning("respawning worker %d in %.1fs", worker.slot, delay)
        metrics.worker_restarted()
        if delay:
            self.helpers.add(gevent.spawn_later(delay, self.events.put, ("respawn", generation, worker.slot)))
        else:
            self._spawn(generation, worker.slot)

    def _on_respawn(self, generation: Generation, slot: int) -> None:
        wanted = generation is self.current or generation is self.pending
        if not self.stopping and wanted and generation.slots.get(slot) is None:
            self._spawn(generation, slot)

    def _on_deadline(self, seconds: float) -> None:
        for worker in list(self.workers.values()):
            log.error("%s still running %.0fs after the stop (shutdown_timeout + %ss): SIGKILL",
                      worker, seconds, KILL_GRACE)
            self.killed_any = True
            self._signal(worker, signal.SIGKILL)

    # -- drain one worker (the operator's request) -------------------------------------------
    def _request_drain(self, pid: int) -> str | None:
        """From the admin server: why worker ``pid`` cannot be drained now, or None (it will be)."""
        worker = self.workers.get(pid)
        if worker is None:
            return f"no worker with pid {pid}"
        if self.stopping or self.pending is not None or worker.stopping or worker.generation is not self.current:
            return f"{worker} is already stopping, or a reload or stop is under way"
        self.events.put(("drain", pid))  # the main greenlet forks, never an admin request's
        return None

    def _drain_worker(self, pid: int) -> None:
        """TERM the worker (it closes its listeners, finishes its sessions within
        shutdown_timeout, exits), and fork its successor in its slot at once: the master's
        listeners stay open, so meanwhile new clients wait in the queue, none is refused."""
        worker = self.workers.get(pid)
        if worker is None or worker.stopping:
            return  # gone, or asked twice
        if self.stopping or self.pending is not None or worker.generation is not self.current:
            log.info("not draining %s: a reload or stop is under way", worker)
            return
        log.info("%s drained by the operator: it finishes its sessions; a new worker takes its place", worker)
        self._ask_to_stop(worker)
        self._spawn(worker.generation, worker.slot)

    # -- stop -------------------------------------------------------------------------------
    def _drain_then_stop(self, why: str) -> None:
        """Tell the balancer first (``/health``: 503), stop ``drain_delay`` seconds later."""
        delay = self.settings.drain_delay
        if self.draining or self.stopping or delay <= 0:
            self._stop(why)  # a second signal while draining: stop now
            return
        self.draining = True
        if self.admin_server is not None:
            self.admin_server.app.health = "draining"
        log.info("%s: draining: /health answers 503, the listeners close in %ss", why, delay)
        self.helpers.add(gevent.spawn_later(delay, self.events.put, ("drained", why)))

    def _stop(self, why: str) -> None:
        if self.stopping:
            log.info("%s: already stopping", why)
            return
        self.stopping = True
        if self.admin_server is not None:
            self.admin_server.app.health = "stopping"
        timeouts = [g.settings.shutdown_timeout for g in (self.current, self.pending) if g is not None]
        log.info("%s: stopping; sessions get up to %ss to finish", why, max(timeouts))
        # Ours first: once the workers have closed theirs, nothing listens any more.
        self._close_listeners()
        if self.queue_runner is not None:
            self.queue_runner.stop()  # it finishes its deliveries in flight meanwhile
        for worker in list(self.workers.values()):
            self._ask_to_stop(worker)
        deadline = max(timeouts) + KILL_GRACE
        self.helpers.add(gevent.spawn_later(deadline, self.events.put, ("deadline", deadline)))

    def _check_closed(self) -> None:
        if self.stopping and not self.closed_everywhere and all(w.closed for w in self.workers.values()):
            self.closed_everywhere = True
            log.info("stopped accepting: the listeners are closed in every process")

    def _ask_to_stop(self, worker: Worker) -> None:
        worker.stopping = True
        self._signal(worker, signal.SIGTERM)

    def _signal(self, worker: Worker, signum: int) -> None:
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass  # already gone; its watcher reports it

    def _close_listeners(self) -> None:
        for sock in self.listeners:
            sock.close()
