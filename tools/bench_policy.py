#!/usr/bin/env python3
"""Benchmark the policy plugins: messages/s with greylisting + karma + limit, per store backend.

Usage:
    tools/bench_policy.py [--messages 2000] [--size 1000] [--concurrency 100]
                          [--configs none,embedded,redis] [--workers 0] [--python PYTHON]
                          [--smtp-source /usr/sbin/smtp-source] [--log-level warning]
                          [--timeout 300] [--workdir DIR] [--ops 2000]

Three configurations of the real ``qpgevent`` command (the pre-fork master and its
workers), each driven by Postfix's smtp-source (one connection per message, from
127.0.0.1, sender@client.test to someone@example.test), messages thrown away by
queue/discard so that the policy plugins are what is measured:

  none      rcpt_ok + queue/discard
  embedded  greylisting + karma + limit, then rcpt_ok + queue/discard; [store] embedded
            (a SQLite file in the run's folder, shared by the workers)
  redis     the same plugins; [store] redis, a redis-server started by this tool on a
            free loopback port (no persistence)

Every message costs the store: limit takes a concurrency lease and hits two sliding
windows (connections, recipients), karma reads the address's history at connect and
writes it at disconnect, greylisting reads and renews its triplet. The limits are set
far above the load so that nothing is refused.

Greylisting would refuse smtp-source's first attempt, and smtp-source stops at the
first refusal. So the policy configurations run with ``black_timeout = 0`` and the
triplet is primed before the run: one attempt (refused, 450) with the same sender,
recipient and client address; every later attempt passes and renews it, as a
white triplet does in production.

Columns: messages/second (smtp-source's wall time), server CPU ms/message (the master
and its workers, user + system, from /proc), redis CPU ms/message (the redis run).

``--ops N`` first times N single store calls of each kind in this process: embedded
through its thread (as the server calls it), embedded called inline on the calling
thread (what a hub would lose per call without the thread), and Redis over loopback.

Exit status 0 when every run succeeded, 1 otherwise, 2 for bad options.
"""

from __future__ import annotations

import argparse
import re
import smtplib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import CLIENT_NAME, RECIPIENT, SENDER, BenchError, tail  # noqa: E402

COMPLAINT = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")

POLICY = """
  [[greylisting]]
    black_timeout = 0
    grey_timeout = 1h
  [[karma]]
  [[limit]]
    concurrency = 10000
    rate_conn = 100000000/1m
    rate_rcpt_host = 100000000/1m
    recipients = 100
"""
ACCEPT = """
  [[rcpt_ok]]
    domains = example.test
  [[queue/discard]]
"""
CONFIGS = ("none", "embedded", "redis")


def plugins_for(name: str, folder: Path, redis_url: str | None) -> str:
    """The [plugins] of ``name``, and its [store] section (a section may follow [plugins])."""
    text = ("" if name == "none" else POLICY) + ACCEPT
    if name == "embedded":
        text += f"[store]\n  backend = embedded\n  path = {folder / 'store.sqlite'}\n"
    elif name == "redis":
        text += f"[store]\n  backend = redis\n  url = {redis_url}\n"
    return text


@dataclass
class Result:
    config: str
    concurrency: int
    messages: int
    seconds: float
    server_cpu: float  #: CPU seconds of the master and its workers during the run
    redis_cpu: float | None  #: CPU seconds of redis-server during the run (redis runs)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")


def run_smtp_source(args: argparse.Namespace, port: int, concurrency: int) -> float:
    """One smtp-source run (it stops at the first refusal); its wall time in seconds."""
    return benchlib.run_smtp_source(args.smtp_source, port, concurrency, args.messages, args.size, args.timeout,
                                    strict_stderr=True)


def prime_greylisting(port: int) -> None:
    """One attempt of smtp-source's triplet: noted (450); with black_timeout 0 the next passes."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_NAME, timeout=30) as client:
        client.ehlo()
        client.mail(SENDER)
        code, text = client.rcpt(RECIPIENT)
        if code != 450:
            raise BenchError(f"priming greylisting: expected 450, got {code} {text!r}")


def bench(args: argparse.Namespace, name: str, folder: Path, redis) -> list[Result]:
    folder.mkdir()
    max_connections = max(1000, max(args.concurrency) + 10)
    plugins = plugins_for(name, folder, redis.url if redis else None)
    server = benchlib.QpgeventServer(args.python, folder, plugins, args.log_level, max_connections,
                                     args.workers)
    results = []
    try:
        server.wait_ready()
        if name != "none":
            prime_greylisting(server.port)
        print(f"# {name}: qpgevent pid {server.process.pid} on 127.0.0.1:{server.port}", flush=True)
        for concurrency in args.concurrency:
            cpu_before = server.cpu_seconds()
            redis_before = benchlib.process_cpu_seconds(redis.process.pid) if name == "redis" else 0.0
            try:
                seconds = run_smtp_source(args, server.port, concurrency)
            except BenchError as error:
                raise BenchError(f"{name}, concurrency {concurrency}: {error}\n"
                                      f"--- server log (last lines) ---\n{tail(server.log())}") from None
            redis_cpu = benchlib.process_cpu_seconds(redis.process.pid) - redis_before if name == "redis" else None
            result = Result(name, concurrency, args.messages, seconds, server.cpu_seconds() - cpu_before, redis_cpu)
            results.append(result)
            print(row(result), flush=True)
    finally:
        status = server.stop()
    if status != 0:
        raise BenchError(f"{name}: server exited with status {status}\n{tail(server.log())}")
    complaints = [line for line in server.log().splitlines()
                  if COMPLAINT.search(line) and "queue/discard is loaded" not in line
                  and "serving as root" not in line]
    if complaints:
        raise BenchError(f"{name}: the server logged warnings or errors:\n" + "\n".join(complaints[:10]))
    return results


HEADER = (f"{'config':<8} {'concurrency':>11} {'messages':>8} {'seconds':>8} {'messages/second':>15} "
          f"{'server CPU ms/message':>21} {'redis CPU ms/message':>20}")


def row(result: Result) -> str:
    redis = f"{result.redis_cpu * 1000 / result.messages:>20.3f}" if result.redis_cpu is not None else f"{'-':>20}"
    return (f"{result.config:<8} {result.concurrency:>11} {result.messages:>8} {result.seconds:>8.2f} "
            f"{result.rate:>15.1f} {result.server_cpu * 1000 / result.messages:>21.3f} {redis}")


def store_ops(count: int, folder: Path, redis) -> None:
    """Microseconds per store call, by backend and operation, in this process."""
    from qpgevent.backends.store_redis import RedisStore
    from qpgevent.backends.store_sqlite import EmbeddedStore

    embedded = EmbeddedStore(str(folder / "ops.sqlite"))
    stores = [("embedded (thread)", embedded), ("redis", RedisStore(redis.url) if redis else None)]
    print(f"# store calls, microseconds each (mean of {count}):")
    print(f"{'backend':<20} {'get':>8} {'set':>8} {'incr':>8} {'hit':>8} {'acquire+release':>16}")
    for label, store in stores:
        if store is not None:
            print(f"{label:<20} " + _op_row(store, count), flush=True)
    # Inline: the same SQLite work on the calling thread, as if it ran on the hub.
    embedded.get("warm-up")
    inline = [lambda: embedded._in_thread(embedded._do_get, ("k",)),
              lambda: embedded._in_thread(embedded._do_set, ("k", "v", 60.0)),
              lambda: embedded._in_thread(embedded._do_incr, ("n", 1, 60.0)),
              lambda: embedded._in_thread(embedded._do_hit, ("w", 10**9, 60.0))]
    print(f"{'embedded (inline)':<20} " + " ".join(f"{timed(call, count):>8.1f}" for call in inline)
          + f" {'-':>16}", flush=True)
    for _, store in stores:
        if store is not None:
            store.close()


def _op_row(store, count: int) -> str:
    calls = [lambda: store.get("k"), lambda: store.set("k", "v", 60), lambda: store.incr("n", 1, 60),
             lambda: store.hit("w", 10**9, 60), lambda: store.release(store.acquire("L", 10**6))]
    times = [timed(call, count) for call in calls]
    return " ".join(f"{us:>8.1f}" for us in times[:4]) + f" {times[4]:>16.1f}"


def timed(call, count: int) -> float:
    call()
    started = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - started) / count * 1e6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchlib.smtp_source_parser("Benchmark qpgevent's policy plugins per store backend.", [100],
                                         sys.executable)
    parser.add_argument("--configs", default="none,embedded,redis", help="which of none,embedded,redis")
    parser.add_argument("--workers", type=int, default=0, help="[server] workers (default 0: one per core)")
    parser.add_argument("--ops", type=int, default=2000, help="store calls to time per kind (0: skip)")
    args = benchlib.parse_smtp_source_args(parser, argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not args.configs or set(args.configs) - set(CONFIGS):
        parser.error(f"--configs: choose from {','.join(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qpgevent.testing.redis_server import LoopbackRedis

    redis = LoopbackRedis() if "redis" in args.configs else None
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="qpg-bench-policy-", dir=args.workdir) as temp:
            if args.ops:
                store_ops(args.ops, Path(temp), redis)
            print(f"# {args.messages} messages of {args.size} bytes per run, one connection each, "
                  f"concurrency {','.join(map(str, args.concurrency))}, workers {args.workers or 'one per core'}")
            print(HEADER, flush=True)
            for name in args.configs:
                if redis is not None:
                    redis.flush()
                rows += bench(args, name, Path(temp) / name, redis)
    except BenchError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if redis is not None:
            redis.close()
    print()
    print(HEADER)
    for result in rows:
        print(row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
