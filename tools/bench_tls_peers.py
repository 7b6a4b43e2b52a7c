#!/usr/bin/env python3
"""Benchmark STARTTLS side by side: qpgevent, Haraka and Postfix with the same certificate and client.

Usage:
    tools/bench_tls_peers.py [--servers qpgevent,haraka,haraka2,postfix] [--concurrency 100]
                             [--sessions 1000] [--messages 2000] [--per-connection 10]
                             [--size 2048] [--rounds 3] [--clients 2] [--workers 2] [--key rsa|ecdsa]
                             [--client python|c] [--haraka PATH] [--python PYTHON] [--workdir DIR]

What it runs, all on this machine, over loopback:

  certificate  one self-signed certificate from openssl (CN and subjectAltName
               mx.example.test and IP 127.0.0.1), the same file for every server: an
               RSA-2048 key (--key rsa, as many sites still use) or an ECDSA P-256 key
               (--key ecdsa, what certbot issues by default since its 2.0)
  qpgevent     ``PYTHON -m qpgevent --workers W``, [tls] certificate, rcpt_ok + queue/discard
  haraka       Haraka (npm) with its tls plugin (tls_key.pem, tls_cert.pem), one process:
               rcpt_to.in_host_list + queue/discard
  haraka2      the same with nodes=2 (cluster: master + 2 workers)
  postfix      a private Postfix (qpgevent/testing/mta.py, needs root): smtpd with
               smtpd_tls_cert_file / smtpd_tls_key_file, security level may; cleanup fsyncs
               each message into its queue before the 250, virtual(8) delivers after it
               (it cannot discard: its rate is the accept rate of a durable queue)
  client       --clients separate processes, each with its share of --concurrency at once;
               each session connects, EHLO, STARTTLS (TLS 1.3, the certificate verified
               against the file, no session resumption: every connection pays a full
               handshake), EHLO again, sends its messages (MAIL, RCPT, DATA, each waiting
               for its reply), QUIT. The processes start, get ready, and are told to go at
               the same moment. --client python: each process a gevent pool of smtplib
               clients (a process per core, so its TLS work is not bound to one core by
               the GIL). --client c: tools/smtp_tls_source.c, one epoll loop over
               non-blocking OpenSSL, built at run time with cc (Debian: gcc libssl-dev);
               it costs a fraction of smtplib's CPU per message, so the servers, not the
               client, set the rates.

Two measures per server, at each --concurrency:

  sessions/s   STARTTLS sessions per second, one message each (--sessions of them): the
               handshake cost dominates
  messages/s   messages per second over TLS, --per-connection messages per connection
               (--messages in all): the cost of the TLS record layer

Rounds: all servers stay up side by side; each measure is run over every server in turn,
repeated --rounds times (A B C, A B C, ...), after one unmeasured warm-up run each, and each
run starts once the previous server has gone idle (its CPU time stopped growing). Printed:
the median rate (min-max over rounds), the server's CPU ms per session or message (all its
processes, from /proc), and qpgevent's rate over each server's taken within each round
(median, min-max); "client ms" is the client processes' CPU per session or message: when
it is as large as the servers', the client bounds the rates and the CPU columns are the
steadier comparison. A run in which any client saw a refusal or an error fails the tool.

Exit status 0 when every run succeeded, 1 otherwise, 2 for bad options.

Example:
    tools/bench_tls_peers.py --haraka /tmp/haraka/node_modules/.bin/haraka --rounds 5
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import benchrun  # noqa: E402

DOMAIN = "example.test"
ALL_SERVERS = ("qpgevent", "haraka", "haraka2", "postfix")


KEYS = {"rsa": ["-newkey", "rsa:2048"], "ecdsa": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]}
KEY_NAMES = {"rsa": "RSA-2048", "ecdsa": "ECDSA P-256"}


def make_certificate(folder: Path, kind: str = "rsa") -> tuple[Path, Path]:
    """A self-signed certificate and its key: RSA-2048 or ECDSA P-256 (``KEYS``)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", *KEYS[kind], "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=mx.example.test",
                    "-addext", "subjectAltName=DNS:mx.example.test,IP:127.0.0.1"],
                   check=True, capture_output=True)
    for path in (cert, key):
        path.chmod(0o644)  # Postfix reads them as root, Haraka as us: readable is enough for a throwaway
    return cert, key


@dataclass
class Server:
    name: str
    port: int
    pid: int
    stop: Callable[[], object]
    log: Callable[[], str]  # its log text

    def cpu_seconds(self) -> float:
        return benchlib.tree_cpu_seconds(self.pid)


def start(name: str, folder: Path, cert: Path, key: Path, args: argparse.Namespace) -> Server:
    folder.mkdir(parents=True)
    if name == "qpgevent":
        (folder / "server.pem").write_bytes(key.read_bytes() + cert.read_bytes())
        server = benchlib.QpgeventServer(args.python, folder, f"  [[rcpt_ok]]\n    domains = {DOMAIN}\n"
                                         "  [[queue/discard]]\n", "warning", args.max_connections, args.workers,
                                         sections="[tls]\n  certificate = server.pem\n"
                                                  "[dns]\n  reverse_lookup = no\n")
        server.wait_ready()
        return Server(name, server.port, server.process.pid, server.stop, server.log)
    if name == "postfix":
        benchrun._test_kit()
        from qpgevent.testing.mta import Postfix

        postfix = Postfix([f"someone@{DOMAIN}"], tls=(cert, key),
                          main={"default_process_limit": str(args.max_connections),
                                "smtpd_tls_received_header": "no", "smtpd_tls_loglevel": "0"})
        postfix.start()
        assert postfix.process is not None
        return Server(name, postfix.port, postfix.process.pid, postfix.cleanup, postfix.log)
    root, port = folder / "haraka", benchlib.free_port()
    subprocess.run([args.haraka, "-i", str(root)], check=True, capture_output=True)
    config = root / "config"
    settings = {"smtp.ini": f"listen=127.0.0.1:{port}\n" + ("nodes=2\n" if name == "haraka2" else ""),
                "log.ini": "[main]\nlevel=warn\ntimestamps=false\n", "host_list": DOMAIN + "\n",
                "plugins": "tls\nrcpt_to.in_host_list\nqueue/discard\n",
                "tls.ini": "[main]\nkey=tls_key.pem\ncert=tls_cert.pem\n"}
    for file, text in settings.items():
        (config / file).write_text(text, encoding="utf-8")
    shutil.copy(key, config / "tls_key.pem")
    shutil.copy(cert, config / "tls_cert.pem")
    log_path = folder / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([args.haraka, "-c", str(root)], cwd=folder, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(os.environ, YES_REALLY_DO_DISCARD="1"))

    def text() -> str:
        return log_path.read_text(encoding="utf-8", errors="replace")
    try:
        benchlib.wait_greeting(port, process, text)
    except BaseException:
        benchlib.stop_process(process)  # a failed start leaves no server behind
        raise
    return Server(name, port, process.pid, lambda: benchlib.stop_process(process), text)


# -- the client processes ------------------------------------------------------------------------

# Both clients take PORT CAFILE CONNECTIONS PER_CONNECTION CONCURRENCY SIZE, print "ready", wait
# for a line, and print "done FAILURES MESSAGES FIRST-ERROR" (see parse_done).
CLIENT = r'''
from gevent import monkey; monkey.patch_all()
import smtplib, ssl, sys, gevent
from gevent.pool import Pool
port, cafile, connections, per_connection, concurrency, size = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
context = ssl.create_default_context(cafile=cafile)
body = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, size // 78)
failures, accepted = [], [0]
def client(_):
    try:
        with smtplib.SMTP("127.0.0.1", int(port), local_hostname="client.test", timeout=120) as smtp:
            smtp.starttls(context=context)
            for _ in range(per_connection):
                smtp.sendmail("sender@client.test", ["someone@example.test"], body)
                accepted[0] += 1
    except Exception as error:
        failures.append(repr(error).replace("\n", " "))
print("ready", flush=True)
sys.stdin.readline()
pool = Pool(concurrency)
gevent.joinall([pool.spawn(client, i) for i in range(connections)])
print(f"done {len(failures)} {accepted[0]} {failures[0] if failures else '-'}", flush=True)
'''
C_CLIENT = Path(__file__).resolve().parent / "smtp_tls_source.c"


def build_c_client(folder: Path) -> Path:
    """Compile tools/smtp_tls_source.c into ``folder``; BenchError (saying what to install) if it fails."""
    program = folder / "smtp_tls_source"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise benchlib.BenchError("--client c needs a C compiler (Debian: apt-get install gcc libssl-dev)")
    built = subprocess.run([compiler, "-O2", "-o", str(program), str(C_CLIENT), "-lssl", "-lcrypto"],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise benchlib.BenchError(f"cannot build {C_CLIENT.name} (Debian: apt-get install gcc libssl-dev):\n"
                                  f"{built.stderr.strip()}")
    return program


def parse_done(line: str) -> tuple[int, int, str] | None:
    """A client's last line, "done FAILURES MESSAGES FIRST-ERROR", as (failures, messages, first
    error or ""); None for anything else (a client that died says nothing or something else)."""
    words = line.rstrip("\n").split(" ", 3)
    if len(words) != 4 or words[0] != "done" or not words[1].isdigit() or not words[2].isdigit():
        return None
    return int(words[1]), int(words[2]), "" if words[3] == "-" else words[3]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_clients(args: argparse.Namespace, server: Server, cafile: Path, connections: int, per_connection: int,
                concurrency: int) -> tuple[float, float]:
    """(seconds, client CPU seconds) for ``connections`` STARTTLS connections of ``per_connection``
    messages, split over the client processes, all told to go at once. BenchError if any failed."""
    processes = []
    cpu = children_cpu_seconds()
    program = [str(args.c_program)] if args.client == "c" else [args.python, "-c", CLIENT]
    for index in range(args.clients):
        share = connections // args.clients + (index < connections % args.clients)
        processes.append(subprocess.Popen(
            [*program, str(server.port), str(cafile), str(share), str(per_connection),
             str(max(1, concurrency // args.clients)), str(args.size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        for process in processes:
            if process.stdout.readline().strip() != "ready":
                raise benchlib.BenchError(f"a client process did not start (status {process.wait()})")
        started = time.perf_counter()
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        answers = [process.stdout.readline() for process in processes]
        seconds = time.perf_counter() - started
    finally:
        for process in processes:
            if process.poll() is None:
                process.stdin.close()
                try:
                    process.wait(timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    done = [parse_done(answer) for answer in answers]
    sent = sum(each[1] for each in done if each)
    if None in done or any(each[0] for each in done if each) or sent != connections * per_connection:
        raise benchlib.BenchError(f"{server.name}: {sent} of {connections * per_connection} messages accepted; "
                                  f"the clients said {answers}\n{benchlib.tail(server.log())}")
    return seconds, children_cpu_seconds() - cpu


def settle(server: Server, quiet: float = 0.3, limit: float = 30.0) -> None:
    """Wait until the server's CPU time stops growing (Postfix delivers after its 250s)."""
    deadline = time.monotonic() + limit
    before = server.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = server.cpu_seconds()
        if now - before < 0.01:
            return
        before = now


# -- rounds and the table ------------------------------------------------------------------------

@dataclass
class Cell:
    measure: str  # "sessions/s" or "messages/s"
    concurrency: int
    rates: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # CPU ms per unit, per round
    client_cpu: dict[str, list[float]] = field(default_factory=dict)  # the clients' CPU ms per unit


def measure(args: argparse.Namespace, servers: list[Server], cafile: Path, cell: Cell) -> None:
    per_connection = 1 if cell.measure == "sessions/s" else args.per_connection
    units = args.sessions if cell.measure == "sessions/s" else args.messages
    connections = max(1, units // per_connection)
    for server in servers:  # warm-up
        run_clients(args, server, cafile, max(cell.concurrency, connections // 4), per_connection,
                    cell.concurrency)
        settle(server)
    for _ in range(args.rounds):
        for server in servers:
            cpu = server.cpu_seconds()
            seconds, client_cpu = run_clients(args, server, cafile, connections, per_connection, cell.concurrency)
            settle(server)
            units_done = connections * (1 if cell.measure == "sessions/s" else per_connection)
            cell.rates.setdefault(server.name, []).append(units_done / seconds)
            cell.cpu.setdefault(server.name, []).append((server.cpu_seconds() - cpu) * 1000 / units_done)
            cell.client_cpu.setdefault(server.name, []).append(client_cpu * 1000 / units_done)
        print("  round: " + ", ".join(f"{name} {rates[-1]:.0f}" for name, rates in cell.rates.items()),
              flush=True)


def table(cells: list[Cell]) -> list[str]:
    lines = [f"{'measure':<11} {'conc':>5} {'server':<9} {'rate':>7} {'min-max':>11} {'CPU ms/unit':>11} "
             f"{'client ms':>9} {'xqpgevent':>9} {'min-max':>11}"]
    for cell in cells:
        reference = cell.rates.get("qpgevent")
        for name, rates in cell.rates.items():
            ratio = "-" if reference is None or name == "qpgevent" else ""
            spread = ""
            if not ratio:
                ratios = [ours / theirs for ours, theirs in zip(reference, rates)]
                ratio, spread = f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}-{max(ratios):.2f}"
            lines.append(f"{cell.measure:<11} {cell.concurrency:>5} {name:<9} {statistics.median(rates):>7.0f} "
                         f"{f'{min(rates):.0f}-{max(rates):.0f}':>11} {statistics.median(cell.cpu[name]):>11.2f} "
                         f"{statistics.median(cell.client_cpu[name]):>9.2f} {ratio:>9} {spread:>11}")
        lines.append("")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[8:]))
    parser.add_argument("--servers", default="qpgevent,haraka,haraka2,postfix",
                        help=f"servers, comma separated, of {','.join(ALL_SERVERS)} (default %(default)s)")
    parser.add_argument("--concurrency", type=benchlib.number_list("concurrency values"), default=[100],
                        help="clients at once, comma separated (default 100)")
    parser.add_argument("--sessions", type=int, default=1000, help="sessions per sessions/s run (default %(default)s)")
    parser.add_argument("--messages", type=int, default=2000, help="messages per messages/s run (default %(default)s)")
    parser.add_argument("--per-connection", type=int, default=10,
                        help="messages per connection in the messages/s runs (default %(default)s)")
    parser.add_argument("--size", type=int, default=2048, help="message size in octets (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all servers (default %(default)s)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="qpgevent's worker processes (default %(default)s)")
    parser.add_argument("--key", choices=sorted(KEYS), default="rsa", help="the certificate's key (default %(default)s)")
    parser.add_argument("--client", choices=("python", "c"), default="python",
                        help="the client: smtplib in gevent, or tools/smtp_tls_source.c (default %(default)s)")
    parser.add_argument("--haraka", default=shutil.which("haraka") or "/tmp/haraka-install/node_modules/.bin/haraka",
                        help="the haraka program (default %(default)s)")
    parser.add_argument("--python", default=str(benchrun.REPO / ".venv/bin/python")
                        if (benchrun.REPO / ".venv/bin/python").exists() else sys.executable,
                        help="the Python with qpgevent and gevent (servers and clients; default %(default)s)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a client process may take (default %(default)s)")
    parser.add_argument("--workdir", help="where to create the temporary folder")
    args = parser.parse_args(argv)
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = [name for name in args.servers if name not in ALL_SERVERS]
    if unknown or not args.servers:
        parser.error(f"unknown servers {unknown}: choose from {', '.join(ALL_SERVERS)}")
    if min(args.sessions, args.messages, args.per_connection, args.rounds, args.clients, args.workers) < 1:
        parser.error("--sessions, --messages, --per-connection, --rounds, --clients and --workers must be 1 or more")
    if any(name.startswith("haraka") for name in args.servers) and not os.access(args.haraka, os.X_OK):
        parser.error(f"haraka not found at {args.haraka} (npm install Haraka; give --haraka)")
    if "postfix" in args.servers and os.geteuid() != 0:
        parser.error("postfix needs root (its master drops privileges itself)")
    args.max_connections = max(args.concurrency) + 100
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchlib.unwind_on_signals()

    def body() -> int:
        servers: list[Server] = []
        with tempfile.TemporaryDirectory(prefix="qpg-bench-tls-peers-", dir=args.workdir) as temp:
            folder = Path(temp)
            folder.chmod(0o755)
            cert, key = make_certificate(folder, args.key)
            args.c_program = build_c_client(folder) if args.client == "c" else None
            try:
                for name in args.servers:
                    servers.append(start(name, folder / name, cert, key, args))
                load = os.getloadavg()
                print(f"# {', '.join(s.name for s in servers)}; {KEY_NAMES[args.key]} certificate; {args.clients} {args.client} "
                      f"client processes; {args.size} octet messages; qpgevent {args.workers} workers; load average "
                      f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
                cells = []
                for concurrency in args.concurrency:
                    for what in ("sessions/s", "messages/s"):
                        cell = Cell(what, concurrency)
                        print(f"# {what} at concurrency {concurrency}", flush=True)
                        measure(args, servers, cert, cell)
                        cells.append(cell)
            finally:
                for server in servers:
                    server.stop()
        load = os.getloadavg()
        print(f"# load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print("\n".join(table(cells)))
        return 0
    return benchlib.exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
