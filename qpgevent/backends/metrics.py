"""Prometheus metrics for all the processes of one server: what is counted, and how it is read.

Every process (the master, each worker, or the one process) counts into its own files in
one folder, through prometheus-client's multiprocess mode; ``render`` merges the files of
all processes, so a scrape covers every worker, the dead ones' counters included.

Rules of the multiprocess mode, kept here so that no caller has to know them:
- the folder must be known before the first metric exists in a process: ``init`` sets
  ``PROMETHEUS_MULTIPROC_DIR`` and, if prometheus_client was imported earlier (by a
  plugin, say), switches its value class to the multiprocess one before making ours;
- ``init(directory, clear=True)`` once, in the master (or the single process), before
  forking: workers inherit the metrics and open their own files on first use (the
  library notices the new pid);
- when a worker dies the master calls ``process_dead(pid)``, so that its "open
  connections" drop out of the sum (counters stay: totals never go backwards).

Before ``init`` (admin pages off) every function here is a no-op costing one test, so
the session and the services call them unconditionally. Label values come from the
config (hook and plugin names) or from short fixed lists, never from clients, so the
number of series stays bounded.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from ..core.codes import Verdict
from ..engine.hooks import HOOKS

#: Plugin calls take from microseconds (a table look-up) up to the plugin timeout (30 s).
HOOK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DNS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: What a DNS look-up came to (``observe_dns``): an answer, NXDOMAIN, an empty answer,
#: no answer in time, or another failure (SERVFAIL, REFUSED, no server reachable).
DNS_OUTCOMES = ("answer", "nxdomain", "nodata", "timeout", "error")
#: The runner's internal-error verdicts, by their message, as rejection reasons.
_INTERNAL_REASONS = {"plugin timeout": "plugin_timeout", "plugin error": "plugin_error",
                     "bad plugin result": "bad_plugin_result"}

_metrics: _Metrics | None = None
_directory = ""


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # registry=None: nothing is registered in this process; render() reads the files.
        self.connections_open = Gauge("qpgevent_connections_open", "SMTP sessions open now",
                                      multiprocess_mode="livesum", registry=None)
        self.connections = Counter("qpgevent_connections", "SMTP sessions started", registry=None)
        self.connections_refused = Counter(
            "qpgevent_connections_refused", "Connections closed before a session started, by reason",
            ["reason"], registry=None)
        self.sessions_shed = Counter(
            "qpgevent_sessions_shed", "Idle sessions closed to make room, the host being in stress ([limits] stress_at)",
            registry=None)
        self.transactions = Counter("qpgevent_transactions", "Transactions started (MAIL accepted)",
                                    registry=None)
        self.recipients = Counter("qpgevent_recipients", "Recipients accepted or rejected", ["outcome"],
                                  registry=None)
        self.messages_queued = Counter("qpgevent_messages_queued", "Messages queued, by queue plugin",
                                       ["plugin"], registry=None)
        self.rejections = Counter(
            "qpgevent_rejections",
            "Refusals (4xx/5xx) by hook, deciding plugin ('core': the SMTP core itself) and reason",
            ["hook", "plugin", "reason"], registry=None)
        self.received_bytes = Counter("qpgevent_received_bytes", "Octets received from SMTP clients",
                                      registry=None)
        self.hook_seconds = Histogram("qpgevent_hook_duration_seconds", "Time one plugin took for one hook",
                                      ["hook", "plugin"], buckets=HOOK_BUCKETS, registry=None)
        self.dns_seconds = Histogram("qpgevent_dns_lookup_duration_seconds", "DNS look-up time, by outcome",
                                     ["outcome"], buckets=DNS_BUCKETS, registry=None)
        self.dns_timeouts = Counter("qpgevent_dns_timeouts", "DNS look-ups that got no answer in time",
                                    registry=None)
        self.worker_restarts = Counter("qpgevent_worker_restarts",
                                       "Workers the master started again after one died", registry=None)


def init(directory: str, clear: bool = False) -> None:
    """Count into ``directory`` from now on, in this process and the ones it forks.

    ``clear`` removes the files a previous run left (do it once, in the master, at start).
    Calling it again with another folder, or with ``clear``, starts afresh (the tests do).
    """
    global _metrics, _directory
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if clear:
        for path in glob.glob(os.path.join(directory, "*.db")):
            os.remove(path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    if _metrics is not None and directory == _directory and not clear:
        return
    if _metrics is not None:  # another folder, or files removed: let go of the old ones
        _close_files(values)
    if _metrics is not None or not getattr(values.ValueClass, "_multiprocess", False):
        # Imported before the variable was set (or the folder changed): the value class was
        # chosen at import, and metrics made from now on take it from this attribute.
        values.ValueClass = values.MultiProcessValue()
    _directory = directory
    _metrics = _Metrics()


def stop() -> None:
    """Turn metrics off in this process and close its files (tests; a process that is done)."""
    global _metrics, _directory
    if _metrics is not None:
        from prometheus_client import values

        _close_files(values)
    _metrics, _directory = None, ""


def _close_files(values: Any) -> None:
    # Recent prometheus-client releases only (0.26 has it, 0.22 not); older ones keep the
    # old files mapped, which is harmless.
    close = getattr(values, "close_all_multiprocess_files", None)
    if close is not None:
        close()


def enabled() -> bool:
    return _metrics is not None


def directory() -> str:
    return _directory


# -- what the session, the services and the master count -----------------------------
def connection_opened() -> None:
    if _metrics is not None:
        _metrics.connections.inc()
        _metrics.connections_open.inc()


def connection_closed() -> None:
    if _metrics is not None:
        _metrics.connections_open.dec()


def connection_refused(reason: str) -> None:
    """A connection closed before its session began: "max_connections", "proxy"..."""
    if _metrics is not None:
        _metrics.connections_refused.labels(reason).inc()


def session_shed() -> None:
    """An idle session closed to make room (qpgevent.server.shedding)."""
    if _metrics is not None:
        _metrics.sessions_shed.inc()


def transaction_started() -> None:
    if _metrics is not None:
        _metrics.transactions.inc()


def recipient(accepted: bool) -> None:
    if _metrics is not None:
        _metrics.recipients.labels("accepted" if accepted else "rejected").inc()


def message_queued(plugin: str | None) -> None:
    if _metrics is not None:
        _metrics.messages_queued.labels(plugin or "core").inc()


def rejected(hook: str, plugin: str | None, reason: str) -> None:
    """A refusal: at ``hook`` (or the command, for the core), by ``plugin`` ("core")."""
    if _metrics is not None:
        _metrics.rejections.labels(hook, plugin or "core", reason).inc()


def received(octets: int) -> None:
    if _metrics is not None:
        _metrics.received_bytes.inc(octets)


def observe_dns(seconds: float, outcome: str) -> None:
    """One DNS look-up that went to the network (not a cache hit); ``outcome`` is one of
    ``DNS_OUTCOMES``. For ``qpgevent.dns``, which calls it around each query."""
    if outcome not in DNS_OUTCOMES:
        raise ValueError(f"DNS outcome {outcome!r} is not one of {DNS_OUTCOMES}")
    if _metrics is not None:
        _metrics.dns_seconds.labels(outcome).observe(seconds)
        if outcome == "timeout":
            _metrics.dns_timeouts.inc()


def worker_restarted() -> None:
    """The master started a new worker in place of one that died."""
    if _metrics is not None:
        _metrics.worker_restarts.inc()


def process_dead(pid: int) -> None:
    """A process has ended: its live gauges (open connections) leave the sums."""
    if _metrics is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, _directory)


class HookMetrics:
    """A hook-runner observer: per hook and plugin, the time taken and the refusals."""

    def hook_started(self, hook: str, plugin: str, session: Any) -> None:
        pass

    def hook_finished(self, hook: str, plugin: str, session: Any, verdict: Verdict, seconds: float) -> None:
        if _metrics is None:
            return
        _metrics.hook_seconds.labels(hook, plugin).observe(seconds)
        if HOOKS[hook].notify:
            return  # notification hooks decide nothing
        if verdict.internal_error:
            reason = _INTERNAL_REASONS.get(verdict.message[0] if verdict.message else "", "plugin_error")
            _metrics.rejections.labels(hook, plugin, reason).inc()
        elif verdict.code.is_deny:
            _metrics.rejections.labels(hook, plugin, verdict.code.name.lower()).inc()


HOOK_METRICS = HookMetrics()


# -- reading ----------------------------------------------------------------------------
def _registry() -> Any:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=_directory)
    return registry


def families() -> list[Any]:
    """Every metric family, summed over the processes (none before ``init``)."""
    return list(_registry().collect()) if _metrics is not None else []


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of every process's metrics, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if _metrics is None:
        return b"", CONTENT_TYPE_LATEST
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


#: Series summed for ``totals`` (the status page's "since start" line).
_TOTALS = {"qpgevent_connections_total": "connections", "qpgevent_transactions_total": "transactions",
           "qpgevent_messages_queued_total": "messages_queued", "qpgevent_rejections_total": "rejections",
           "qpgevent_received_bytes_total": "bytes_received", "qpgevent_worker_restarts_total": "worker_restarts"}


def totals() -> dict[str, int]:
    """A few counters summed over every process and label, since the server started."""
    out = dict.fromkeys(_TOTALS.values(), 0)
    for family in families():
        for sample in family.samples:
            key = _TOTALS.get(sample.name)
            if key is not None:
                out[key] += int(sample.value)
    return out
