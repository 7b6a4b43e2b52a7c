#!/usr/bin/env python3
"""What one parked session costs: Python objects (tracemalloc) and resident memory (RSS).

Runs the real server in this process (``qpgevent.testing.InProcessServer``, the default
plugins, ``[limits] park_after`` short) and a client process that opens ``--sessions``
sessions (connect, 220, EHLO, 250, then silence) and holds them. Once every session is
parked (the server's own count: ``len(server.parking)``), it measures, per session:

- ``RSS``: the growth of this process's resident memory (first batch, tracemalloc off);
- ``traced``: the growth of the Python heap as tracemalloc sees it (a second batch of as
  many sessions, tracemalloc on: its own bookkeeping would blur the RSS), with the source
  lines that allocated most, per session;
- ``objects``: the garbage collector's objects per session, by type.

A warm-up batch of 100 is opened and closed first, so that caches, pools and code paths touched
once per process are not counted. The numbers are deterministic but for the allocator's
(RSS); run it before and after a change:

    .venv/bin/python tools/idle_memory.py --sessions 3000
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import subprocess
import sys
import tempfile
import tracemalloc
from collections import Counter

from gevent import monkey

monkey.patch_all()

from qpgevent.testing import InProcessServer, wait_until, write_ini  # noqa: E402

#: The client: plain blocking sockets, one session after another, held until stdin closes.
CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
held = []
def reply(sock):
    data = b""
    while True:
        data += sock.recv(4096)
        lines = data.split(b"\r\n")
        if any(len(line) > 3 and line[3:4] == b" " for line in lines):
            return data
for order in iter(sys.stdin.readline, ""):
    what, count = order.split()
    for _ in range(int(count)):
        sock = socket.create_connection((host, port))
        reply(sock)
        sock.sendall(b"EHLO client.example.test\r\n")
        reply(sock)
        held.append(sock)
    print(len(held), flush=True)
    if what == "close":
        for sock in held:
            sock.close()
        held.clear()
"""


def rss() -> int:
    """This process's resident memory, in octets."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def census() -> Counter[str]:
    gc.collect()
    return Counter(type(thing).__qualname__ for thing in gc.get_objects())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=3000, help="sessions per batch (default 3000)")
    parser.add_argument("--top", type=int, default=25, help="source lines to show (default 25)")
    parser.add_argument("--park-after", type=float, default=0.05)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 3 * args.sessions + 200:
        sys.exit(f"the open-file limit ({hard}) is too low for 2 batches of {args.sessions}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as folder:
        server = InProcessServer(write_ini(folder, park_after=args.park_after, command_timeout=600,
                                           max_connections=3 * args.sessions + 100,
                                           spool_dir=os.path.join(folder, "spool")))
        client = subprocess.Popen([sys.executable, "-c", CLIENT, server.host, str(server.port)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdin is not None and client.stdout is not None
        parking = server.server.parking

        def batch(count: int = args.sessions, then_close: bool = False) -> None:
            expected = 0 if then_close else len(parking) + count
            client.stdin.write(f"{'close' if then_close else 'hold'} {count}\n")
            client.stdin.flush()
            client.stdout.readline()
            wait_until(lambda: len(parking) == expected and len(server.server.sessions) == expected, 120,
                       f"{expected} sessions parked")

        try:
            batch(100, then_close=True)  # the warm-up
            gc.collect()
            before_rss = rss()
            batch()
            gc.collect()
            rss_each = (rss() - before_rss) / args.sessions
            objects_before = census()
            tracemalloc.start(1)
            snapshot = tracemalloc.take_snapshot()
            batch()
            objects = census() - objects_before
            gc.collect()
            stats = tracemalloc.take_snapshot().compare_to(snapshot, "lineno")
            tracemalloc.stop()
        finally:
            client.stdin.close()
            client.wait()
            server.stop()
    traced = sum(stat.size_diff for stat in stats) / args.sessions
    count = sum(stat.count_diff for stat in stats) / args.sessions
    print(f"{args.sessions} parked sessions per batch: RSS {rss_each:.0f} B/session ({rss_each / 1024:.2f} KiB); "
          f"traced {traced:.0f} B/session in {count:.1f} blocks; "
          f"gc objects {sum(objects.values()) / args.sessions:.1f}/session")
    print(f"\n{'B/session':>10} {'blocks':>7}  where (tracemalloc, top {args.top})")
    for stat in stats[:args.top]:
        frame = stat.traceback[0]
        where = f"{os.path.relpath(frame.filename)}:{frame.lineno}"
        print(f"{stat.size_diff / args.sessions:10.1f} {stat.count_diff / args.sessions:7.2f}  {where}")
    print(f"\n{'per session':>11}  gc-tracked objects by type")
    for name, number in objects.most_common(args.top):
        if number / args.sessions >= 0.5:
            print(f"{number / args.sessions:11.2f}  {name}")


if __name__ == "__main__":
    main()
