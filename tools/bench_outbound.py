#!/usr/bin/env python3
"""Benchmark the outbound queue: drain N queued messages to D domains, qpgevent beside Postfix.

Usage:
    tools/bench_outbound.py [--messages 10000] [--domains 50] [--size 2000] [--concurrency 20]
                            [--haraka PREFIX] [--dns-ttl 300]

Builds a lab internet (qpgevent.testing.outbound_lab: network namespaces, nothing in the host's
namespace is dialled): ``mta`` (the sender under test), ``dns`` (unbound + NSD: the D
domains ``dN.bench.test``, each with MX ``mx.bench.test``), ``sink`` (Postfix's
``smtp-sink``, which accepts and discards, so the receiver costs both senders the same).
Records live ``--dns-ttl`` seconds, negative answers as long (real-world values; the
tests' lab uses 5 s and 1 s, with which qpgevent's resolver cache asks again all the time
while Postfix, without a cache of its own, asks unbound for every delivery either way).
Then, one after the other:

- qpgevent: the queue folder is filled with N messages (one recipient each, round robin
  over the domains) while no runner runs; the server starts in ``mta`` and the clock runs
  from the runner's "running on" line (its start-up is not counted, as Postfix's is not)
  until the queue folder is empty.
- Postfix: a private Postfix in ``mta`` (its own config, DNS through the lab resolver,
  ``defer_transports = smtp`` while it is filled by ``smtp-source`` over SMTP); then
  ``defer_transports`` is cleared, ``postqueue -f`` starts the clock, which stops when its
  queue is empty.
- Haraka (with ``--haraka PREFIX``, where ``npm install --prefix PREFIX Haraka`` put it):
  Haraka in ``mta``, relaying for the lab (the ``relay`` plugin's ACL), its outbound
  ``disabled`` while ``smtp-source`` fills its queue over SMTP; then it is stopped,
  ``disabled`` cleared, and started again: the clock runs from its "Loading outbound
  queue" line until its queue folder is empty. Haraka has no per-destination limit: its
  ``concurrency_max`` (all deliveries at once) is set to qpgevent's ``max_deliveries``.

All deliver with ``--concurrency`` connections per destination (qpgevent's
destination_concurrency, Postfix's default_destination_concurrency_limit), fsync on (both
defaults), no TLS (smtp-sink offers none). smtp-sink's counter must grow by exactly N for
each run, or the tool fails. Prints one line per sender and the ratio. Needs root.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

from qpgevent.outqueue import Queue, Recipient  # noqa: E402
from qpgevent.testing import ServerProcess, plugin_section, wait_until, write_ini  # noqa: E402
from qpgevent.testing.outbound_lab import LabDns, LabPostfix, NetLab, sweep  # noqa: E402

HOSTS = {"mta": ("198.18.0.10", "2001:db8::10"), "dns": ("198.18.0.53", "2001:db8::53"),
         "sink": ("198.18.0.21", "2001:db8::21")}


def body(i: int, size: int) -> bytes:
    head = f"From: <bench@sender.test>\r\nSubject: bench {i}\r\nMessage-ID: <{i}@sender.test>\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head.encode() + line * max(1, size // len(line))


class Sink:
    def __init__(self, lab: NetLab) -> None:
        self.out = tempfile.TemporaryFile()
        self.process = subprocess.Popen(lab.command("sink", "smtp-sink", "-c", "-u", "nobody", "198.18.0.21:25", "1000"),
                                        stdout=self.out, stderr=subprocess.STDOUT)
        wait_until(lambda: lab.greeting("sink", "198.18.0.21", 25), 20, "smtp-sink")

    def count(self) -> int:
        self.out.seek(0)
        numbers = re.findall(rb"mesg=(\d+)", self.out.read())  # "sess=N quit=N mesg=N\r", rewritten
        return int(numbers[-1]) if numbers else 0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def run_qpgevent(lab: NetLab, sink: Sink, args: argparse.Namespace, work: Path) -> float:
    queue = Queue(str(work / "queue"))
    for i in range(args.messages):
        queue.enqueue("bench@sender.test", [Recipient(f"u{i}@d{i % args.domains}.bench.test")], [body(i, args.size)])
    wrapper = work / "lab-python"
    wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {lab.ns('mta')} {sys.executable} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    options = {"queue_dir": str(work / "queue"), "destination_concurrency": args.concurrency,
               "max_deliveries": 5 * args.concurrency, "scan_interval": 1}
    ini = write_ini(work, plugins=plugin_section("queue/outbound", **options), me="mta.bench.test",
                    listen="198.18.0.10:2525", workers=1, dns_nameservers="198.18.0.53", dns_port=53)
    before = sink.count()
    server = ServerProcess(ini, python=str(wrapper))
    try:
        # The clock starts when the runner runs (Postfix's, when it is told to deliver).
        wait_until(lambda: "queue runner (pid" in server.log() and " running on " in server.log(), 60,
                   "the queue runner", step=0.01)
        started = time.monotonic()
        wait_until(lambda: not os.listdir(work / "queue" / "env"), args.timeout, "qpgevent's queue empty", step=0.1)
        seconds = time.monotonic() - started
    finally:
        server.terminate()
    delivered = wait_until(lambda: sink.count() - before >= args.messages and sink.count() - before, 30, "sink count")
    if delivered != args.messages:
        raise SystemExit(f"qpgevent: smtp-sink counted {delivered} messages, not {args.messages}")
    return seconds


@contextlib.contextmanager
def lab_resolver(lab: NetLab) -> Iterator[None]:
    """The lab's DNS in ``mta``'s /etc/resolv.conf (``ip netns exec`` mounts it), for the
    senders that read it (Postfix, Haraka); qpgevent is told in its ini."""
    resolv = Path(f"/etc/netns/{lab.ns('mta')}")
    resolv.mkdir(parents=True, exist_ok=True)
    (resolv / "resolv.conf").write_text("nameserver 198.18.0.53\n")
    try:
        yield
    finally:
        shutil.rmtree(resolv, ignore_errors=True)


def fill_over_smtp(lab: NetLab, args: argparse.Namespace) -> int:
    """``smtp-source`` sends the load to ``mta``'s port 25: the same number to each domain."""
    per_domain = args.messages // args.domains
    for n in range(args.domains):
        subprocess.run(lab.command("mta", "smtp-source", "-s", "20", "-m", str(per_domain), "-l", str(args.size),
                                   "-f", "bench@sender.test", "-t", f"u@d{n}.bench.test", "198.18.0.10:25"),
                       check=True, capture_output=True, timeout=600)
    return per_domain * args.domains


def run_postfix(lab: NetLab, sink: Sink, args: argparse.Namespace) -> float:
    with lab_resolver(lab):
        return _run_postfix(lab, sink, args)


def _run_postfix(lab: NetLab, sink: Sink, args: argparse.Namespace) -> float:
    postfix = LabPostfix(lab, "mta", "198.18.0.10", ["nobody@local.bench.test"], main={
        "myhostname": "mta.bench.test", "disable_dns_lookups": "no", "smtp_host_lookup": "dns",
        "defer_transports": "smtp", "default_destination_concurrency_limit": str(args.concurrency),
        "smtp_tls_security_level": "none"})
    postfix.start()
    try:
        total = fill_over_smtp(lab, args)
        queued = lambda: sum(len(files) for _, _, files in os.walk(postfix.root / "queue" / "deferred"))  # noqa: E731
        wait_until(lambda: queued() >= total, 120, "Postfix's deferred queue filled", step=0.2)
        before = sink.count()
        subprocess.run(lab.command("mta", "postconf", "-c", str(postfix.conf), "-e", "defer_transports="), check=True)
        subprocess.run(postfix.command("reload"), capture_output=True, check=True)
        started = time.monotonic()
        subprocess.run(lab.command("mta", "postqueue", "-c", str(postfix.conf), "-f"), check=True)

        def empty() -> bool:
            return not any(files for sub in ("incoming", "active", "deferred")
                           for _, _, files in os.walk(postfix.root / "queue" / sub))

        wait_until(empty, args.timeout, "Postfix's queue empty", step=0.1)
        seconds = time.monotonic() - started
        delivered = wait_until(lambda: sink.count() - before >= total and sink.count() - before, 30, "sink count")
        if delivered != total:
            raise SystemExit(f"postfix: smtp-sink counted {delivered}, not {total}")
        return seconds
    finally:
        postfix.cleanup()


HARAKA_CONFIG = {
    "smtp.ini": "[main]\nlisten=198.18.0.10:25\nnodes=0\n",  # one process, as qpgevent's runner
    "me": "mta.bench.test\n",
    "plugins": "relay\n",
    "relay.ini": "[relay]\nacl=true\n",
    "relay_acl_allow": "198.18.0.0/24\n",
    "log.ini": "[main]\nlevel=info\ntimestamps=false\n",
}


def run_haraka(lab: NetLab, sink: Sink, args: argparse.Namespace, work: Path) -> float:
    haraka = Path(args.haraka).resolve() / "node_modules" / ".bin" / "haraka"
    home = work / "haraka"
    subprocess.run([str(haraka), "-i", str(home)], check=True, capture_output=True, timeout=60)  # its skeleton
    for name, text in HARAKA_CONFIG.items():
        (home / "config" / name).write_text(text)
    queue = home / "queue"

    def outbound(disabled: bool) -> None:
        (home / "config" / "outbound.ini").write_text(
            f"disabled={str(disabled).lower()}\nconcurrency_max={5 * args.concurrency}\nenable_tls=false\n")

    def queued() -> int:
        return len([name for name in os.listdir(queue) if not name.startswith(".")]) if queue.is_dir() else 0

    def start(log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            process = subprocess.Popen(lab.command("mta", str(haraka), "-c", str(home)), stdout=out,
                                       stderr=subprocess.STDOUT)
        wait_until(lambda: lab.greeting("mta", "198.18.0.10", 25), 60, "Haraka listening")
        return process

    def stop(process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    with lab_resolver(lab):
        outbound(disabled=True)  # it takes the load and keeps it: "delivery disabled temporarily"
        process = start(work / "haraka-fill.log")
        try:
            total = fill_over_smtp(lab, args)
            wait_until(lambda: queued() >= total, 120, "Haraka's queue filled", step=0.2)
        finally:
            stop(process)
        outbound(disabled=False)
        before = sink.count()
        log = work / "haraka.log"
        process = start(log)
        try:
            wait_until(lambda: b"Loading outbound queue" in log.read_bytes(), 60, "Haraka's queue loading", step=0.01)
            started = time.monotonic()
            wait_until(lambda: queued() == 0, args.timeout, "Haraka's queue empty", step=0.1)
            seconds = time.monotonic() - started
        finally:
            stop(process)
    delivered = wait_until(lambda: sink.count() - before >= total and sink.count() - before, 30, "sink count")
    if delivered != total:
        raise SystemExit(f"haraka: smtp-sink counted {delivered}, not {total}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--domains", type=int, default=50)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--dns-ttl", type=int, default=300, help="TTL of the records and of negative answers")
    parser.add_argument("--haraka", metavar="PREFIX", help="also Haraka, from PREFIX/node_modules (npm install --prefix)")
    args = parser.parse_args()
    args.messages -= args.messages % args.domains  # the same number per domain for both
    sweep()
    lab = NetLab(HOSTS)
    work = Path(tempfile.mkdtemp(prefix="qpg-bench-outbound-", dir="/tmp"))
    zones = {"bench.test": {"mx": [("A", "198.18.0.21")],
                            **{f"d{n}": [("MX", "10 mx.bench.test.")] for n in range(args.domains)}}}
    dns = sink = None
    try:
        dns = LabDns(lab, "dns", "198.18.0.53", zones, ttl=args.dns_ttl, negative_ttl=args.dns_ttl)
        sink = Sink(lab)
        qpgevent = run_qpgevent(lab, sink, args, work)
        postfix = run_postfix(lab, sink, args)
        haraka = run_haraka(lab, sink, args, work) if args.haraka else None
    finally:
        if sink is not None:
            sink.stop()
        if dns is not None:
            dns.stop()
        lab.close()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    print(f"{args.messages} messages of {args.size} octets to {args.domains} domains, "
          f"{args.concurrency} connections per destination, DNS TTL {args.dns_ttl} s")
    print(f"qpgevent: {qpgevent:7.1f} s  {args.messages / qpgevent:7.0f} msg/s")
    print(f"postfix:  {postfix:7.1f} s  {args.messages / postfix:7.0f} msg/s")
    if haraka is not None:
        print(f"haraka:   {haraka:7.1f} s  {args.messages / haraka:7.0f} msg/s")
    print(f"xqpgevent (qpgevent msg/s / postfix msg/s): {postfix / qpgevent:.2f}")
    if haraka is not None:
        print(f"qpgevent msg/s / haraka msg/s: {haraka / qpgevent:.2f}; haraka / postfix: {postfix / haraka:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
