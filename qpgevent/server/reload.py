"""The master's reload (SIGHUP): a new generation of workers with the new config, then the old ones drain.

On HUP the master re-reads the config and loads the plugins again; if that fails, it logs
it and keeps the running workers. Else it forks a new generation of workers with the new
config, and once all of them serve, TERMs the old ones, which drain as at a stop (``master``). The listening sockets never
close, so no connection is refused; old workers finish what they accepted. The listen
addresses and user/group cannot change on a reload (we are no longer root to bind
port 25): a change is logged and needs a restart. ``[logging]`` is set up again in the
master when it changed, just before the new workers fork, so they and the next queue runner
inherit it (the old workers log as before while they drain); a log file or syslog socket
that cannot be opened fails the reload like any config mistake. If the new workers then die
before serving, the master logs as before again. Once the new workers serve,
the queue runner is replaced too (``queue_runner.on_reload``: the old one finishes its
deliveries in flight first).
"""

from __future__ import annotations

import dataclasses
import logging

from .. import config as config_module
from ..backends import log as log_module
from ..backends.services import configure_services
from ..config import Settings
from ..core.errors import ConfigError
from ..engine.loader import forget_plugin_modules, load_plugins
from . import queue_runner as queue_runner_module
from .children import Generation, Worker, worker_count
from .shared_counters import SharedTable

log = logging.getLogger("qpgevent.master")

#: Settings a reload cannot change (the sockets are bound, root is gone, the admin server
#: runs in the master): setting -> its name in the ini.
FIXED_AT_START = {
    "listen": "[server] listen", "user": "[server] user", "group": "[server] group",
    "allow_root": "[server] allow_root", "pidfile": "[server] pidfile", "spool_dir": "[server] spool_dir",
    "admin_listen": "[admin] listen", "admin_token": "[admin] token", "admin_run_dir": "[admin] run_dir",
    "admin_refresh": "[admin] refresh", "admin_max_connections": "[admin] max_connections",
    "admin_timeout": "[admin] timeout",
}
#: The settings of ``[logging]``: set up again in the master when one changes.
LOGGING = ("log_level", "log_file", "log_format", "log_syslog", "log_syslog_facility",
           "log_syslog_address", "log_trace", "log_trace_clients")


def logging_changed(new: Settings, old: Settings) -> bool:
    return any(getattr(new, name) != getattr(old, name) for name in LOGGING)


class Reloading:
    """The reload's part of ``Master`` (a mixin): the state it reads and sets is the master's."""

    settings: Settings
    listen_override: list[str] | None
    workers_override: int | None
    log_level_override: str | None
    workers: dict[int, Worker]
    current: Generation | None
    pending: Generation | None  #: a reload whose workers are starting
    reload_again: bool
    stopping: bool
    table: SharedTable | None
    queue_runner: queue_runner_module.Supervisor | None

    def _spawn(self, generation: Generation, slot: int) -> None:
        raise NotImplementedError  # the master's

    def _ask_to_stop(self, worker: Worker) -> None:
        raise NotImplementedError  # the master's

    def _reload(self) -> None:
        if self.stopping:
            return
        if self.pending is not None:
            log.info("SIGHUP: a reload is under way; reloading again when it is done")
            self.reload_again = True
            return
        assert self.current is not None
        log.info("SIGHUP: reloading %s", self.settings.path)
        try:
            settings = config_module.load(self.settings.path, listen_override=self.listen_override)
            if self.workers_override is not None:
                settings = dataclasses.replace(settings, workers=self.workers_override)
            settings = self._keep_fixed_settings(settings)
            configure_services(settings)  # for the plugins' setup; each worker makes its own
            forget_plugin_modules()  # so that changed plugin files are read again
            plugins = load_plugins(settings)
        except ConfigError as error:
            log.error("reload failed, the running workers stay: %s", " ".join(str(error).splitlines()))
            return
        except OSError as error:
            log.error("reload failed, the running workers stay: %s", error)
            return
        generation = Generation(self.current.number + 1, settings, plugins, worker_count(settings))
        assert self.table is not None
        if self.table.free_rows() < generation.size:
            log.error("reload failed, the running workers stay: no room for %d new workers beside "
                      "them (the session table, sized at start, holds %d); that takes a restart",
                      generation.size, self.table.rows)
            return
        if not self._set_up_logging(settings):
            return
        self.pending = generation
        for slot in range(generation.size):
            self._spawn(generation, slot)

    def _set_up_logging(self, settings: Settings) -> bool:
        """Log as the new ``[logging]`` says, if it changed (new workers fork after this and
        inherit it); False, logged, when its file or syslog socket cannot be opened: the
        reload fails then, and logging stays as it was."""
        if not logging_changed(settings, self.settings):
            return True
        try:
            log_module.configure_from(settings, self.log_level_override)
        except (OSError, ValueError) as error:
            log.error("reload failed, the running workers stay: [logging]: %s", error)
            return False
        log.info("reload: [logging] set up again")
        return True

    def _restore_logging(self, failed: Settings) -> None:
        """After a reload that failed once its ``[logging]`` was applied: log as the running
        workers' config says again, so that the master's lines look like theirs and a later
        reload of the same ``[logging]`` applies it anew."""
        if not logging_changed(failed, self.settings):
            return
        try:
            log_module.configure_from(self.settings, self.log_level_override)
        except (OSError, ValueError) as error:  # opened at start, but may be gone since
            log.error("reload failed: [logging] could not be set back as it was: %s", error)
            return
        log.info("reload: [logging] set back as it was")

    def _keep_fixed_settings(self, settings: Settings) -> Settings:
        """``settings`` with what a reload cannot change (sockets, identity) as at start."""
        fixed = {name: getattr(self.settings, name) for name in FIXED_AT_START}
        for name, value in fixed.items():
            if getattr(settings, name) != value:
                log.warning("reload: %s changed; that takes a restart", FIXED_AT_START[name])
        return dataclasses.replace(settings, **fixed)

    def _switch_to(self, generation: Generation) -> None:
        old = self.current
        assert old is not None
        self.current, self.pending, self.settings = generation, None, generation.settings
        draining = [w for w in self.workers.values() if w.generation is not generation]
        log.info("reload: generation %d serving (%d workers); %d old worker(s) draining",
                 generation.number, generation.size, len(draining))
        for worker in draining:
            self._ask_to_stop(worker)
        self.queue_runner = queue_runner_module.on_reload(self.queue_runner, generation.settings, generation.plugins)
        self._check_drained()
        if self.reload_again:
            self.reload_again = False
            self._reload()

    def _check_drained(self) -> None:
        assert self.current is not None
        if self.pending is None and all(w.generation is self.current for w in self.workers.values()):
            if self.current.number > 1 and not self.current.complete:
                self.current.complete = True
                log.info("reload complete: every worker runs generation %d", self.current.number)

    def _abort_reload(self, why: str) -> None:
        generation, self.pending = self.pending, None
        assert generation is not None
        log.error("reload failed: %s; stopping the new workers, the running ones stay", why)
        for worker in self.workers.values():
            if worker.generation is generation:
                self._ask_to_stop(worker)
        self._restore_logging(generation.settings)
        if self.reload_again:
            self.reload_again = False
            self._reload()


__all__ = ["FIXED_AT_START", "Reloading"]
