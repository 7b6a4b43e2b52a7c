"""``tools/bench idle``: hold many idle SMTP sessions on a server and measure what they cost.

Each server listed gets ``--connections`` sessions (connect, 220, EHLO, 250, then silence)
from ``--clients`` client processes opening them at once, 100 handshakes in flight in each.
Once all have been held idle for a while (qpgevent parks a session after 0.25 s of silence),
the tool reads the resident memory of all the server's processes (growth per session) and
times ``--probes`` fresh transactions (connect to the 250 after the dot), one after another.

What bounds the number of sessions here, and what the tool does about it:

- Open files: a process may hold at most ``ulimit -Hn`` descriptors (20,000 on the machine
  of docs/benchmarks.md; the hard limit cannot be raised there, not even as root). Every
  process the tool starts raises its soft limit to the hard one; the client side is split
  over enough processes (``--clients``, default: one per 15,000 sessions), and qpgevent's
  sessions spread over its ``--workers``.
- Ephemeral ports: a connection from one source address to one server address and port
  takes a port of ``net.ipv4.ip_local_port_range`` (32768-60999 by default: 28,232). The
  clients bind their sessions to source addresses spread over 127.0.0.0/8 (at most
  ``--per-address`` sessions each), with IP_BIND_ADDRESS_NO_PORT so the port is only chosen
  at connect, against the full four-tuple. The range itself is not changed in the host's
  namespace (it is the host's); inside a ``--netns`` lab namespace it is widened, since that
  namespace is the tool's own.
- The server's own limits: ``[limits] max_connections`` is set above ``--connections``.

Standard library only in this process; the client program runs under gevent.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import benchlib

#: Seconds the sessions are held idle before the RSS is read: the steady state of an idle
#: server (qpgevent parks a session after 0.25 s of silence, [limits] park_after).
IDLE_SETTLE = 2.5
#: Sessions per client process by default: well under a 20,000 open-file limit.
PER_CLIENT = 15_000
PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")

CLIENT = '''
"""Hold N idle SMTP sessions (connect, greeting, EHLO) from the given source addresses;
print 'held K failed F'; wait for stdin EOF."""
import resource, sys
from gevent import monkey; monkey.patch_all()
import gevent, gevent.pool, socket
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, count, sources = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
BIND_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
held, failed = [], []
def one(i):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(120)
        s.setsockopt(socket.IPPROTO_IP, BIND_NO_PORT, 1)   # the port is picked at connect, per 4-tuple
        s.bind((sources[i % len(sources)], 0))
        s.connect(("127.0.0.1", port))
        f = s.makefile("rb")
        if not f.readline().startswith(b"220"):
            raise OSError("no greeting")
        s.sendall(b"EHLO idle.client.test\\r\\n")
        while True:
            line = f.readline()
            if not line.startswith(b"250"):
                raise OSError(f"EHLO answered {line!r}")
            if line[3:4] == b" ":
                break
        f.close()
        held.append(s)
    except OSError as e:
        s.close()
        failed.append(str(e))
pool = gevent.pool.Pool(100)   # opening pace: 100 handshakes in flight per client process
for i in range(count):
    pool.spawn(one, i)
pool.join()
print(f"held {len(held)} failed {len(failed)} {failed[:1]}", flush=True)
sys.stdin.read()
'''


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=10000, help="idle: sessions to hold (default %(default)s)")
    parser.add_argument("--probes", type=int, default=200, help="idle: fresh transactions timed (default %(default)s)")
    parser.add_argument("--clients", type=int, default=0,
                        help=f"idle: client processes holding the sessions (default: one per {PER_CLIENT:,})")
    parser.add_argument("--per-address", type=int, default=5000,
                        help="idle: at most this many sessions per client source address in 127.0.0.0/8 "
                             "(default %(default)s)")


def port_range() -> tuple[int, int]:
    low, high = PORT_RANGE.read_text().split()
    return int(low), int(high)


def widen_port_range(netns: bool) -> str:
    """In the tool's own lab namespace, the widest ephemeral port range; a line saying what holds."""
    low, high = port_range()
    if netns and (low, high) != (1024, 65535):
        try:
            PORT_RANGE.write_text("1024 65535\n")
            low, high = port_range()
        except OSError as error:
            return f"ephemeral ports {low}-{high} (could not widen them: {error})"
    return f"ephemeral ports {low}-{high} ({high - low + 1} per source address)"


def plan(connections: int, clients: int, per_address: int) -> list[tuple[int, list[str]]]:
    """Per client process: how many sessions it opens, and its source addresses.

    Addresses 127.1.0.1, 127.1.0.2, ...: every client has its own, none carries more than
    ``per_address`` sessions, so neither the ephemeral ports of one address nor a per-address
    limit of the server is what runs out.
    """
    clients = clients or max(1, math.ceil(connections / PER_CLIENT))
    result, number = [], 1
    for index in range(clients):
        share = connections // clients + (1 if index < connections % clients else 0)
        sources = []
        for _ in range(max(1, math.ceil(share / per_address))):
            sources.append(f"127.1.{number // 250}.{number % 250 + 1}")
            number += 1
        result.append((share, sources))
    return result


def check_limits(connections: int, clients: int, workers: int) -> list[str]:
    """What the open-file limit allows; problems as lines (empty: none)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_client = math.ceil(connections / clients)
    problems = []
    if per_client + 50 > hard:
        problems.append(f"{per_client} sessions per client process, open-file limit {hard}: use --clients "
                        f"{math.ceil(connections / (hard - 50))} or more")
    if connections / workers + 100 > hard:
        problems.append(f"{connections} sessions over {workers} qpgevent worker(s), open-file limit {hard} "
                        "per process: use more --workers")
    return problems


def idle(args: argparse.Namespace, temp: Path, start_server: Callable, python: str, preexec: Callable) -> int:
    """The idle mode over ``args.servers``; ``start_server(name, queue, folder, args, connections)``."""
    client = temp / "idle_client.py"
    client.write_text(CLIENT, encoding="utf-8")
    shares = plan(args.connections, args.clients, args.per_address)
    print(f"# {args.connections} sessions from {len(shares)} client process(es), "
          f"{sum(len(s) for _, s in shares)} source addresses; {widen_port_range(args.netns)}; "
          f"open-file limit {resource.getrlimit(resource.RLIMIT_NOFILE)[1]} per process", flush=True)
    problems = check_limits(args.connections, len(shares), args.idle_workers)
    if problems:
        for line in problems:
            print(f"# cannot hold them: {line}", file=sys.stderr)
        return 1
    rows = []
    for name in args.servers:
        if name in ("qpsmtpd", "haraka2", "qpgevent-fsync", "qpgevent-before", "postfix"):
            print(f"# {name}: skipped in idle mode ("
                  + ("prefork: one process per connection, 10,000 would be 10,000 Perl processes"
                     if name == "qpsmtpd" else "one process per server here") + ")")
            continue
        saved_workers, args.workers = args.workers, args.idle_workers
        try:
            server = start_server(name, "discard", temp / f"idle-{name}", args, args.connections)
        finally:
            args.workers = saved_workers
        holders: list[subprocess.Popen] = []
        try:
            benchlib.wait_greeting(server.port, server.process, server.log)
            time.sleep(0.5)
            rss_before = server.rss_bytes()
            baseline = probe_latencies(server.port, min(20, args.probes))
            started = time.monotonic()
            for count, sources in shares:
                holders.append(subprocess.Popen(
                    [python, str(client), str(server.port), str(count), ",".join(sources)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=preexec))
            reports = [holder.stdout.readline().strip() for holder in holders]
            opened = time.monotonic() - started
            held = sum(int(report.split()[1]) for report in reports if report.startswith("held"))
            time.sleep(IDLE_SETTLE)  # held idle a while: qpgevent parks them after 0.25 s ([limits] park_after)
            rss_after = server.rss_bytes()
            spread = sessions_per_process(server.process.pid)
            latencies = probe_latencies(server.port, args.probes)
            per = (rss_after - rss_before) / max(1, held) / 1024
            rows.append((name, held, opened, rss_before, rss_after, per, baseline, latencies))
            print(f"{name:<10} held {held} ({'; '.join(reports)}); opened in {opened:.1f}s; open sockets per "
                  f"process {spread}; RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB = "
                  f"{per:.2f} KiB/session; fresh transaction p50 {pct(latencies, 50):.1f} ms p99 "
                  f"{pct(latencies, 99):.1f} ms max {max(latencies):.1f} ms; load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
        finally:
            for holder in holders:
                holder.stdin.close()
            for holder in holders:
                holder.wait(60)
            server.stop()
    print()
    print(f"{'server':<10} {'held':>6} {'open s':>6} {'RSS idle MiB':>12} {'RSS held MiB':>12} "
          f"{'KiB/session':>11} {'p50 ms':>7} {'p99 ms':>7} {'p99 unloaded':>12}")
    for name, held, opened, before, after, per, baseline, latencies in rows:
        print(f"{name:<10} {held:>6} {opened:>6.1f} {before / 2**20:>12.1f} {after / 2**20:>12.1f} {per:>11.1f} "
              f"{pct(latencies, 50):>7.1f} {pct(latencies, 99):>7.1f} {pct(baseline, 99):>12.1f}")
    return 0 if rows and all(row[1] == args.connections for row in rows) else 1


def sessions_per_process(pid: int) -> str:
    """Open sockets of each process of the server's tree, e.g. '123:4 124:15002 125:14998'."""
    counts = []
    for each in benchlib.descendants(pid):
        try:
            fds = os.listdir(f"/proc/{each}/fd")
            sockets = sum(1 for fd in fds if os.readlink(f"/proc/{each}/fd/{fd}").startswith("socket:"))
        except OSError:
            continue
        counts.append(f"{each}:{sockets}")
    return " ".join(counts)


def probe_latencies(port: int, count: int) -> list[float]:
    """Milliseconds from connect to the 250 after the final dot, one transaction at a time."""
    import smtplib
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="probe.client.test", timeout=60) as client:
            client.sendmail(benchlib.SENDER, [benchlib.RECIPIENT], b"Subject: probe\r\n\r\nprobe\r\n")
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def pct(values: list[float], percentile: int) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(percentile / 100 * (len(ordered) - 1))))]
