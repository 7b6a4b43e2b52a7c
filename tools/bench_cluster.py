#!/usr/bin/env python3
"""Throughput of a qpgevent cluster through HAProxy, with 1, 2 and 3 hosts.

Usage:
    tools/bench_cluster.py [--messages 2000] [--size 2048] [--concurrency 50] [--rounds 3]
                           [--smtp-source /usr/sbin/smtp-source]

It builds the cluster of the cluster tests (tests/cluster/lab_cluster.py: network
namespaces on this machine, HAProxy with PROXY v2 and /health checks, three qpgevent
hosts with one worker each, greylisting and the per-address limit in Redis behind
Sentinel, queue/maildir with fsync), then, for 1, 2 and 3 hosts in service (the others
put in maintenance through HAProxy's stats socket), runs Postfix's smtp-source from the
client host against HAProxy, --rounds times, and prints messages/second per round and
their median. All hosts share this machine's cores: the numbers show what the balancer
and the shared store cost, not how a cluster of real machines scales. Run as root
(namespaces). Exit status 0 when every run succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import gevent.monkey

gevent.monkey.patch_all()

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests" / "cluster")]

from benchlib import BenchError, run_smtp_source  # noqa: E402
from lab_cluster import LB, MX_HOSTS, build, tear_down  # noqa: E402


def set_in_service(cluster, count: int) -> None:
    for number, name in enumerate(MX_HOSTS):
        command = f"{'enable' if number < count else 'disable'} server mx/{name}\n"
        with socket.socket(socket.AF_UNIX) as stats:
            stats.connect(str(cluster.folder / "admin.sock"))
            stats.sendall(command.encode())
            stats.recv(4096)
    cluster.wait_states({name: "UP" if number < count else "MAINT" for number, name in enumerate(MX_HOSTS)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smtp-source", default="/usr/sbin/smtp-source")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="qpg-bench-cluster-"))
    cluster = build(folder)
    prefix = tuple(cluster.lab.command("client"))
    results: dict[int, list[float]] = {}
    try:
        with cluster.lab.inside("client"):
            # The one triplet smtp-source uses: greylisted once, then known everywhere (Redis).
            try:
                run_smtp_source(args.smtp_source, 25, 1, 1, 100, 60, host=LB, prefix=prefix)
            except BenchError:
                pass  # the first attempt is greylisted: expected
            for hosts in (1, 2, 3):
                set_in_service(cluster, hosts)
                for _ in range(args.rounds):
                    seconds = run_smtp_source(args.smtp_source, 25, args.concurrency, args.messages, args.size,
                                              600, host=LB, prefix=prefix)
                    results.setdefault(hosts, []).append(args.messages / seconds)
                rates = results[hosts]
                print(f"{hosts} host(s): {statistics.median(rates):7.0f} msg/s median "
                      f"({', '.join(f'{r:.0f}' for r in rates)})", flush=True)
    except BenchError as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        tear_down(cluster)
    base = statistics.median(results[1])
    print("ratio to 1 host: " + ", ".join(f"{h}: {statistics.median(r) / base:.2f}x" for h, r in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
