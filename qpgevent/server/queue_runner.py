"""The queue runner process, and the master's supervision of it.

Owns ``python -m qpgevent queue-runner -c INI``: one process that reads the config, finds
the ``queue/outbound`` plugin's options, and runs ``delivery.Runner`` on its queue folder
until SIGTERM (then it lets the deliveries in flight finish). It listens on a unix
datagram socket in the queue folder (``runner.sock``): the plugin sends a byte there
after each message it queues, the ``qpgevent queue`` tools send a message id after they
change an envelope; the runner also looks at the folder every ``scan_interval`` seconds,
so a lost kick only delays.

``supervise(settings, plugins)`` is what the master calls after forking its workers:
when ``queue/outbound`` is configured it starts the runner and keeps it running, like a
worker: a runner that dies unasked is logged (``killed by signal SIGKILL``) and started
again, at once if it had run a while, else after a backoff doubling from 0.5 s to 30 s.
It runs as the master does (privileges already dropped) and dies with the master
(PR_SET_PDEATHSIG). On stop the master sends it TERM and waits for it.

Started afresh, the runner picks up where its predecessor stopped: the queue folder is
the whole state (see ``outqueue`` and ``delivery`` for what a crash can repeat).

One runner per queue folder: a runner holds an exclusive ``flock`` on ``runner.lock`` in
the folder from before it binds the kick socket until it exits (the kernel lets go of it
when the process dies, even by SIGKILL). A runner started while another holds it waits
for it (and says so), so two never deliver from one folder at once, whoever started
them: a reload, a respawn, a second server on the same folder by mistake.

On a reload (SIGHUP, ``on_reload``) the master TERMs the runner, which finishes its
deliveries in flight; once it has exited, a new one starts with the new config (routes,
backoff, TLS policy...). A runner still busy ``STOP_GRACE`` seconds after the TERM is
killed. A reload that adds ``queue/outbound`` starts a runner; one that removes it stops
the runner (its messages stay in the folder).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import gevent
from gevent.event import Event
from gevent.server import DatagramServer

from .. import config as config_module
from ..backends import log as log_module
from . import admin, privileges
from .children import close_now
from ..backends import metrics
from ..backends.delivery import Options, Runner
from ..core.errors import ConfigError
from ..engine.loader import load_plugin, plugin_dirs
from ..backends.outqueue import Queue
from ..backends.services import configure_services
from ..backends.relay_routes import ConfigurationError, parse_routes
from ..backends.smtp_downstream import ClientOptions
from ..backends.tls_policy import TlsPolicies, parse_levels
from ..backends.tlsrpt import TlsReports

__all__ = ["LOCK_NAME", "PLUGIN", "Supervisor", "lock_queue", "main", "on_reload", "options_from_config",
           "plugin_config", "supervise"]

log = logging.getLogger("qpgevent.queue_runner")

PLUGIN = "queue/outbound"  #: the plugin whose options the runner takes
BACKOFF_FIRST, BACKOFF_MAX, QUICK_EXIT = 0.5, 30.0, 5.0
STOP_GRACE = 30.0  #: seconds a stopping runner gets to finish its deliveries before SIGKILL
LOCK_NAME = "runner.lock"  #: in the queue folder: held by the one runner delivering from it
LOCK_POLL = 0.2  #: seconds between two tries at a lock another process holds


def options_from_config(config: dict[str, Any], me: str) -> Options:
    """``delivery.Options`` from the plugin's validated options."""
    try:
        routes = parse_routes(config["routes"], 25) if config["routes"] else []
    except ConfigurationError as error:
        raise ValueError(str(error)) from None
    # Opportunistic TLS (RFC 7435) unless tls_verify: encrypt when offered, whatever the certificate.
    client = ClientOptions.from_config(dict(config, forward_client=["none"]), lmtp=False)
    client.helo = config["helo"] or me
    default = {"off": "none", "auto": "may", "required": "encrypt"}[config["starttls"]]
    if config["tls_verify"] and default != "none":
        default = "verify"
    reports = TlsReports(os.path.join(config["queue_dir"], "tlsrpt"), Queue(config["queue_dir"], fsync=config["fsync"]),
                         me=me, sender=config["tlsrpt_from"], organization=config["tlsrpt_organization"],
                         period=config["tlsrpt_period"], ca_file=config["tls_ca_file"]) if config["tlsrpt"] else None
    tls = TlsPolicies(client, parse_levels(config["tls_policy"]), default, mta_sts=config["mta_sts"],
                      dane=config["dane"], ca_file=config["tls_ca_file"],
                      cache_dir=os.path.join(config["queue_dir"], "mta-sts"), reports=reports)
    return Options(
        me=me, routes=routes, port=config["port"], families=config["inet_protocols"],
        destination_concurrency=config["destination_concurrency"], max_deliveries=config["max_deliveries"],
        minimal_backoff=config["minimal_backoff"], maximal_backoff=config["maximal_backoff"],
        lifetime=config["lifetime"], delay_warning=config["delay_warning"], scan_interval=config["scan_interval"],
        postmaster=config["postmaster"], client=client, tls=tls)


def plugin_config(settings: config_module.Settings) -> dict[str, Any] | None:
    for spec in settings.plugins:
        if spec.name == PLUGIN:
            return load_plugin(spec, plugin_dirs(settings), settings.base_dir).config
    return None


# -- the runner process ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qpgevent.queue_runner")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--log-level", default=None)
    parser.add_argument("--parent", type=int, default=0, help="die with this process (the master)")
    args = parser.parse_args(argv)
    if args.parent:
        privileges.die_with_parent(args.parent)
    try:
        settings = config_module.load(args.config)
        log_module.configure_from(settings, args.log_level)
        configure_services(settings)
        if settings.admin_listen is not None:
            metrics.init(admin.metrics_dir(settings))  # the master's folder, not cleared: it is in use
        config = plugin_config(settings)
        if config is None:
            raise ConfigError(f"{settings.path}: no [[{PLUGIN}]] in [plugins]: nothing to run")
        options = options_from_config(config, settings.me)
    except (ConfigError, ValueError) as error:
        print(f"qpgevent queue runner: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return 2
    queue = Queue(config["queue_dir"], fsync=config["fsync"])
    runner = Runner(queue, options)
    stop = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    try:
        if lock_queue(queue.directory, stop) is None:
            return 0  # asked to stop while another runner held the folder: nothing was done
    except OSError as error:
        print(f"qpgevent queue runner: cannot lock {queue.directory}: {error}", file=sys.stderr)
        return 2
    kicks = _listen_for_kicks(queue.kick_path, runner)
    log.info("queue runner (pid %d) running on %s", os.getpid(), queue.directory)
    try:
        runner.run(stop)
    finally:
        kicks.close()
        try:
            os.unlink(queue.kick_path)
        except FileNotFoundError:
            pass
    log.info("queue runner (pid %d) stopped", os.getpid())
    return 0


def lock_queue(directory: str, stop: Event | None = None) -> int | None:
    """Take the folder's runner lock: its file descriptor, held until it is closed or the
    process ends. Waits while another process holds it, until ``stop`` is set (then None);
    without ``stop``, None at once when it is held. Read-only (flock needs no more), so that
    a lock file made by a tool run as root serves the runner's user too. Raises OSError."""
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not waiting and stop is not None:
                waiting = True
                log.info("queue runner (pid %d): waiting for the runner before it to finish with %s",
                         os.getpid(), directory)
            if stop is None or stop.wait(LOCK_POLL):
                close_now(fd)
                return None


def _listen_for_kicks(path: str, runner: Runner) -> DatagramServer:
    try:
        os.unlink(path)  # a predecessor's, which died without cleaning up
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    server = DatagramServer(sock, lambda data, _: runner.kick(data.decode("ascii", "replace").strip()))
    server.start()
    return server


# -- in the master ---------------------------------------------------------------------------------
class Supervisor:
    """Keeps one runner process alive until ``stop``."""

    def __init__(self, settings: config_module.Settings) -> None:
        self.settings = settings
        self.master_pid = os.getpid()
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.restarting = False  #: TERMed for a reload: start the next one at once
        self.failures = 0
        self.greenlet = gevent.spawn(self._keep_running)

    def _command(self) -> list[str]:
        level = logging.getLevelName(logging.getLogger("qpgevent").getEffectiveLevel()).lower()
        return [sys.executable, "-m", "qpgevent", "queue-runner", "-c", self.settings.path,
                "--log-level", level if level in ("debug", "info", "warning", "error") else "info",
                "--parent", str(self.master_pid)]

    def _keep_running(self) -> None:
        while not self.stopping:
            started = time.monotonic()
            try:
                self.process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL)
            except OSError as error:
                log.error("cannot start the queue runner: %s", error)
                status = None
            else:
                log.info("queue runner started (pid %d)", self.process.pid)
                status = self.process.wait()
            if os.getpid() != self.master_pid:
                return  # a copy in a forked worker
            if self.stopping:
                break
            if self.restarting:
                self.restarting, self.failures = False, 0
                log.info("queue runner %s for the reload; starting it with the new config", _how(status))
                continue
            quick = time.monotonic() - started < QUICK_EXIT
            self.failures = self.failures + 1 if quick else 0
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1)) if self.failures else 0.0
            log.error("queue runner %s; starting it again in %.1fs", _how(status), delay)
            gevent.sleep(delay)

    def reload(self, settings: config_module.Settings) -> None:
        """Replace the runner by one with the new config once it has finished its deliveries
        in flight (TERM; SIGKILL after ``STOP_GRACE``). One not running (waiting to be
        started again) reads the new config when it starts."""
        self.settings = settings
        process = self.process
        if self.stopping or self.restarting or process is None or process.poll() is not None:
            return
        self.restarting = True
        process.send_signal(signal.SIGTERM)
        gevent.spawn_later(STOP_GRACE, self._kill_if_running, process)

    def _kill_if_running(self, process: subprocess.Popen[bytes]) -> None:
        if os.getpid() == self.master_pid and process.poll() is None:
            log.error("queue runner (pid %d) still running %.0fs after TERM: SIGKILL", process.pid, STOP_GRACE)
            process.kill()

    def stop(self) -> None:
        """TERM to the runner: it finishes its deliveries in flight and exits."""
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_GRACE) -> None:
        process = self.process
        if process is not None:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("queue runner still running %.0fs after TERM: SIGKILL", timeout)
                process.kill()
                process.wait(10)
        self.greenlet.kill(block=True, timeout=5)


def supervise(settings: config_module.Settings, plugins: list[Any]) -> Supervisor | None:
    """The master's hook: a supervised runner when ``queue/outbound`` is configured, else None."""
    if not _configured(plugins):
        return None
    return Supervisor(settings)


def on_reload(current: Supervisor | None, settings: config_module.Settings,
              plugins: list[Any]) -> Supervisor | None:
    """The master's hook once a reload's workers serve: the supervisor to keep from now on."""
    if current is not None and not current.stopping:
        if _configured(plugins):
            current.reload(settings)
        else:
            log.info("reload: no %s any more: stopping the queue runner", PLUGIN)
            current.stop()  # the master's stop still waits for it
        return current
    return supervise(settings, plugins) or current


def _configured(plugins: list[Any]) -> bool:
    return any(plugin.name.split(":", 1)[0] == PLUGIN for plugin in plugins)


def _how(status: int | None) -> str:
    if status is None:
        return "could not start"
    if status < 0:
        try:
            return f"killed by signal {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"
