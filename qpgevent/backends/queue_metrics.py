"""Prometheus metrics of the outbound queue, counted by the queue runner process.

Owns the ``qpgevent_outbound_*`` series. They go into the same multiprocess folder as
the server's (``metrics``), so the admin server's ``/metrics`` shows them beside the
rest; when ``[admin]`` is off, ``metrics.enabled()`` is false and every call here costs
one test. Series:

- ``qpgevent_outbound_queue_messages``: messages in the queue now (held ones included);
- ``qpgevent_outbound_queue_oldest_seconds``: age of the oldest queued message;
- ``qpgevent_outbound_deliveries_total{outcome}``: recipients delivered, deferred
  (one per attempt), failed; plus ``bounces`` (notices queued);
- ``qpgevent_outbound_destination_failures_total{domain}``: attempts at a domain that
  deferred or failed; at most ``MAX_DOMAINS`` domains are named, the rest count as
  ``other``, so that the number of series stays bounded.
"""

from __future__ import annotations

from typing import Any

from . import metrics

__all__ = ["MAX_DOMAINS", "OUTCOMES", "delivery", "destination_failure", "queue_state"]

OUTCOMES = ("delivered", "deferred", "failed", "bounced")
MAX_DOMAINS = 1000

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
        _series["size"] = Gauge("qpgevent_outbound_queue_messages", "Messages in the outbound queue",
                                multiprocess_mode="mostrecent", registry=None)
        _series["oldest"] = Gauge("qpgevent_outbound_queue_oldest_seconds",
                                  "Age of the oldest message in the outbound queue",
                                  multiprocess_mode="mostrecent", registry=None)
        _series["deliveries"] = Counter("qpgevent_outbound_deliveries",
                                        "Outbound recipients by outcome (deferred: per attempt)",
                                        ["outcome"], registry=None)
        _series["failures"] = Counter("qpgevent_outbound_destination_failures",
                                      "Outbound attempts at a destination domain that deferred or failed",
                                      ["domain"], registry=None)
    return _series


def queue_state(size: int, oldest_seconds: float) -> None:
    series = _made()
    if series is not None:
        series["size"].set(size)
        series["oldest"].set(max(0.0, oldest_seconds))


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
