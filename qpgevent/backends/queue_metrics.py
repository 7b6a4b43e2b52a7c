"""Prometheus metrics of the outbound queue, counted by the queue runner process.

Owns the ``qpgevent_outbound_*`` series. They go into the same multiprocess folder as
the server's (``metrics``), so the admin server's ``/metrics`` shows them beside the
rest; when ``[admin]`` is off, ``metrics.enabled()`` is false and every call here costs
one test. Series:

- ``qpgevent_outbound_queue_messages``: messages in the queue now (held ones included);
- ``qpgevent_outbound_queue_recipients``: their recipients still pending;
- ``qpgevent_outbound_queue_held_messages``: messages on hold (``qpgevent queue hold``);
- ``qpgevent_outbound_queue_deferred_messages``: messages tried at least once, waiting
  for their next attempt (held ones and those being tried not counted);
- ``qpgevent_outbound_queue_active_messages``: messages being tried now;
- ``qpgevent_outbound_queue_oldest_seconds``: age of the oldest queued message;
- ``qpgevent_outbound_deliveries_total{outcome}``: recipients delivered, deferred
  (one per attempt), failed; plus ``bounces`` (notices queued);
- ``qpgevent_outbound_destination_failures_total{domain}``: attempts at a domain that
  deferred or failed; at most ``MAX_DOMAINS`` domains are named, the rest count as
  ``other``, so that the number of series stays bounded.

The gauges are the runner's latest values (``mostrecent``: a runner started in place of
another, after a crash or a reload, overwrites its predecessor's); the counters are
summed over every runner since the server started. ``summary`` reads them all back from
the folder, for the status page in the master: the same numbers as ``/metrics``, whatever
process counted them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import metrics

__all__ = ["MAX_DOMAINS", "OUTCOMES", "QueueState", "delivery", "destination_failure", "queue_state", "summary"]

OUTCOMES = ("delivered", "deferred", "failed", "bounced")
MAX_DOMAINS = 1000

#: The gauges: field of ``QueueState`` -> series name.
GAUGES = {"messages": "qpgevent_outbound_queue_messages", "recipients": "qpgevent_outbound_queue_recipients",
          "held": "qpgevent_outbound_queue_held_messages", "deferred": "qpgevent_outbound_queue_deferred_messages",
          "active": "qpgevent_outbound_queue_active_messages", "oldest_seconds": "qpgevent_outbound_queue_oldest_seconds"}
_HELP = {"messages": "Messages in the outbound queue (held ones included)",
         "recipients": "Recipients still pending in the outbound queue",
         "held": "Messages on hold in the outbound queue",
         "deferred": "Messages of the outbound queue tried at least once, waiting for their next attempt",
         "active": "Messages of the outbound queue being tried now",
         "oldest_seconds": "Age of the oldest message in the outbound queue"}


@dataclass
class QueueState:
    """The queue at one moment, as the runner sees it."""

    messages: int = 0
    recipients: int = 0
    held: int = 0
    deferred: int = 0
    active: int = 0
    oldest_seconds: float = 0.0


_series: dict[str, Any] = {}
_domains: set[str] = set()


def _made() -> dict[str, Any] | None:
    if not metrics.enabled():
        return None
    if not _series or _series.get("directory") != metrics.directory():
        from prometheus_client import Counter, Gauge

        _series.clear()
        _series["directory"] = metrics.directory()
        # One runner at a time: its latest value is the queue's (a dead runner's stays until replaced).
        for name, series in GAUGES.items():
            _series[name] = Gauge(series, _HELP[name], multiprocess_mode="mostrecent", registry=None)
        _series["deliveries"] = Counter("qpgevent_outbound_deliveries",
                                        "Outbound recipients by outcome (deferred: per attempt)",
                                        ["outcome"], registry=None)
        _series["failures"] = Counter("qpgevent_outbound_destination_failures",
                                      "Outbound attempts at a destination domain that deferred or failed",
                                      ["domain"], registry=None)
    return _series


def queue_state(state: QueueState) -> None:
    series = _made()
    if series is not None:
        for name in GAUGES:
            series[name].set(max(0, getattr(state, name)))


def delivery(outcome: str, count: int = 1) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
    series = _made()
    if series is not None and count:
        series["deliveries"].labels(outcome).inc(count)


def destination_failure(domain: str) -> None:
    series = _made()
    if series is None:
        return
    if domain not in _domains and len(_domains) >= MAX_DOMAINS:
        domain = "other"
    else:
        _domains.add(domain)
    series["failures"].labels(domain).inc()


def summary() -> dict[str, Any] | None:
    """The queue's series summed over every process, for the status page; None when no
    runner has published yet (no ``queue/outbound``, or ``[admin]`` off)."""
    gauges = {series: name for name, series in GAUGES.items()}
    state: dict[str, float] = {}
    deliveries = dict.fromkeys(OUTCOMES, 0)
    failures: dict[str, int] = {}
    for family in metrics.families():
        for sample in family.samples:
            if sample.name in gauges:
                state[gauges[sample.name]] = sample.value
            elif sample.name == "qpgevent_outbound_deliveries_total":
                deliveries[sample.labels["outcome"]] = deliveries.get(sample.labels["outcome"], 0) + int(sample.value)
            elif sample.name == "qpgevent_outbound_destination_failures_total":
                failures[sample.labels["domain"]] = failures.get(sample.labels["domain"], 0) + int(sample.value)
    if not state:
        return None
    counts: dict[str, Any] = {name: int(value) for name, value in state.items()}
    counts["oldest_seconds"] = state.get("oldest_seconds", 0.0)
    worst = sorted(failures.items(), key=lambda item: (-item[1], item[0]))
    return {**asdict(QueueState(**counts)), "deliveries": deliveries, "destination_failures": dict(worst)}
