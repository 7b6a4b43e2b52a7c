#!/usr/bin/env python3
"""Benchmark the connection-time DNS checks: messages/s with them on (0 ms and 50 ms DNS) and off.

Usage:
    tools/bench_dns_checks.py [--messages 2000] [--size 1000] [--concurrency 100]
                              [--configs off,on] [--delays 0,50] [--workers 1] [--python PYTHON]
                              [--smtp-source /usr/sbin/smtp-source] [--log-level info]
                              [--timeout 300] [--workdir DIR]

What it runs, all on this machine:

  DNS     a real NSD on 127.0.0.1 (``qpgevent.testing.dns.LoopbackDns``) serving the zones
          the checks need, behind a front (``SlowDnsFront``, greenlets in this process)
          that answers every query DELAY ms late and counts the queries
  server  ``PYTHON -m qpgevent -c qpsmtpd.ini --workers N`` as a child process, its
          ``[dns]`` pointed at the front
  client  Postfix's smtp-source: ``-s CONCURRENCY -m MESSAGES``, one connection per message,
          from 127.0.0.1, HELO client.test, MAIL FROM sender@client.test, every message the
          same file (``-F``): From sender@client.test, SIZE bytes of body, DKIM-signed
          (rsa-sha256, relaxed/relaxed, d=client.test s=bench, a fresh RSA-2048 key whose
          public half is in the zone)

Configurations:

  off   rcpt_ok + queue/discard; ``[dns] reverse_lookup = no``: no DNS at all
  on    ``[dns] reverse_lookup = yes`` (FCrDNS at connect: PTR, then A), ``dnsbl`` with
        three zones (asked at once, at connect), ``resolvable_fromhost`` (at MAIL: MX, then
        A and AAAA of the MX target), then rcpt_ok + queue/discard. Measured once per
        ``--delays`` value, the front's delay changed between runs.
  chain the shipped anti-spam chain: all of "on", plus ``sender_permitted_from`` (at MAIL:
        the TXT record of client.test, ``v=spf1 ip4:127.0.0.0/8 -all``) and ``dkim`` (at
        data_post: the key's TXT record, then the signature checked). Every result but a
        pass refuses (SPF reject_on, DKIM reject_on), so a completed run had every
        message's SPF and DKIM pass. Measured once per ``--delays`` value, like "on".
        dnsbl asks at pre_connection, beside the core's PTR look-up, and SPF at mail_pre,
        beside resolvable_fromhost's MX (their ``lookahead``, on by default): 5 round
        trips one after another (PTR, A; MX, A/AAAA; the DKIM key), not 7.
  serial the chain with ``lookahead = no`` in dnsbl and sender_permitted_from: every
        look-up in plugin order, 7 round trips (the chain before lookahead).

What the numbers mean. Every zone is served with TTL 0 and an SOA minimum (negative TTL)
of 0, so the server's resolver cache keeps nothing: every message pays for every look-up,
as it would if each connection came from a new address with a new sender domain (which
smtp-source, sending from one address and one domain, cannot do). That is the worst case
for an MX; real traffic hits the cache for repeat senders and repeat domains. The "DNS
queries/message" column shows it: about 8 with the checks on (PTR, A, 3 DNSBL, MX, A,
AAAA), 10 with the chain (those, the SPF TXT and the DKIM key), 0 with them off; the tool
fails if the checks did not ask the DNS. With a delay,
a message waits for about five round trips one after another (PTR, then A, then the
three DNSBL at once; MX, then A/AAAA at once), so at concurrency C the rate cannot pass
C / (5 x delay) (100 / 0.25 s = 400/s at 50 ms; the chain adds SPF at MAIL and the DKIM
key after the data, 5 round trips with lookahead: 500 / 0.25 s = 2000/s): the server's cooperative look-ups keep
the other sessions running meanwhile, and the rate with the delay shows how close it gets.
"server CPU ms/message" is the CPU time of the server's processes (master and workers)
per message; when it times messages/second comes near 1000 per worker, the workers are
CPU-bound (parsing DNS answers costs about 0.3 ms each in dnspython) and the delay hardly
shows. The DNS front runs in this tool's process; "front CPU %" is its share of one
core during the run: near 100 % the front, not the server, is the bottleneck.

Options:
  --messages N         messages per run (default 2000)
  --size BYTES         message payload, headers not included (default 1000)
  --concurrency LIST   sessions in parallel, comma separated (default 100)
  --configs LIST       configurations to run, in order: off, on, chain, serial (default off,on)
  --rounds N           run every configuration, delay and concurrency N times, round by
                       round (A B C, A B C: machine drift hits each alike); the servers of
                       all configurations stay up side by side (default 1)
  --delays LIST        DNS answer delays in ms for the "on" runs, comma separated (default 0,50)
  --workers N          the server's worker processes (default 1: numbers for one core)
  --python PATH        the Python that has qpgevent installed (default: this one if it
                       can import qpgevent, else the repo's .venv/bin/python)
  --smtp-source PATH   (default: from PATH, or /usr/sbin/smtp-source)
  --log-level LEVEL    the server's log level (default info, as in production)
  --timeout SECONDS    give up on one smtp-source run after this long (default 300)
  --workdir DIR        create the temporary folder here (default: the system's)

Exit status 0 when every run succeeded, 1 otherwise (smtp-source aborts at the first
refused command: a DNS check that failed or refused fails the run), 2 for bad options.

Examples:
    tools/bench_dns_checks.py --messages 1000 --concurrency 10,100 --delays 0,10,50
    tools/bench_dns_checks.py --configs off,chain --concurrency 500 --workers 2 --messages 5000
"""

from gevent import monkey

monkey.patch_all()  # the DNS front is greenlets: they must run while we wait on smtp-source

import argparse  # noqa: E402
import base64  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_smtp_source as smtp_bench  # noqa: E402  (its smtp-source runner)
import benchlib  # noqa: E402

from qpgevent.testing.dns import (LoopbackDns, SlowDnsFront, blocklist_zone,  # noqa: E402
                                  ptr_zone_for)

BLOCKLISTS = ("bl1.test", "bl2.test", "bl3.test")
SELECTOR = "bench"


def zones(dkim_key: str) -> dict:
    """The zones every configuration may ask; ``dkim_key`` is the p= value of the DKIM key."""
    # A TXT string holds at most 255 octets: the key goes in several strings.
    key = " ".join(f'"{part}"' for part in ["v=DKIM1; k=rsa; p="] + [dkim_key[i:i + 200]
                                                                     for i in range(0, len(dkim_key), 200)])
    return {
        # The sender domain: an MX whose target has A and AAAA, SPF for the client's address,
        # the DKIM key; the client's FCrDNS name too.
        "client.test": {"@": [("MX", "10 mail.client.test."), ("A", "127.0.0.1"),
                              ("TXT", '"v=spf1 ip4:127.0.0.0/8 -all"')],
                        "mail": [("A", "192.0.2.25"), ("AAAA", "2001:db8::25")],
                        f"{SELECTOR}._domainkey": [("TXT", key)]},
        **ptr_zone_for("127.0.0.0/8", {"127.0.0.1": "client.test."}),
        # Three blocklists that list somebody else: 127.0.0.1 gets NXDOMAIN from each.
        **{zone: records for name in BLOCKLISTS
           for zone, records in blocklist_zone(name, {"192.0.2.99": ("127.0.0.2", "listed")}).items()},
    }


def signed_message(folder: Path, size: int) -> tuple[Path, str]:
    """A DKIM-signed message file for smtp-source -F, and the p= value of its key."""
    import dkim

    key = folder / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    public = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"],
                            check=True, capture_output=True).stdout
    message = (b"From: Sender <sender@client.test>\r\nTo: someone@example.test\r\nSubject: bench\r\n"
               b"Date: Mon, 7 Dec 2026 00:00:00 +0000\r\nMessage-ID: <bench@client.test>\r\n\r\n"
               + (b"x" * 76 + b"\r\n") * max(1, size // 78))
    signature = dkim.sign(message, SELECTOR.encode(), b"client.test", key.read_bytes(),
                          canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    path = folder / "message.txt"
    # smtp-source ends every line with CRLF itself: the file has bare newlines.
    path.write_bytes((signature + message).replace(b"\r\n", b"\n"))
    return path, base64.b64encode(public).decode("ascii")


#: Queries one message needs with the checks on and nothing cached; fewer means a cache.
MIN_QUERIES_PER_MESSAGE = {"on": 7, "chain": 9, "serial": 9}

CHECKS_OFF = """
  [[rcpt_ok]]
    domains = example.test
  [[queue/discard]]
"""
CHECKS_ON = f"""
  [[dnsbl]]
    zones = {", ".join(BLOCKLISTS)}
  [[resolvable_fromhost]]
{CHECKS_OFF}"""
# Anything but a pass refuses, so that smtp-source aborts the run if a check did not pass.
CHAIN = f"""
  [[dnsbl]]
    zones = {", ".join(BLOCKLISTS)}
  [[resolvable_fromhost]]
  [[sender_permitted_from]]
    reject_on = fail, softfail, neutral, none, permerror
  [[dkim]]
    reject_on = fail, permerror, temperror
{CHECKS_OFF}"""
# The same chain with every look-up asked in plugin order: no lookahead (dnsbl, SPF).
SERIAL = CHAIN.replace("[[dnsbl]]\n", "[[dnsbl]]\n    lookahead = no\n").replace(
    "[[sender_permitted_from]]\n", "[[sender_permitted_from]]\n    lookahead = no\n")
CONFIGS = {"off": CHECKS_OFF, "on": CHECKS_ON, "chain": CHAIN, "serial": SERIAL}

BenchError = smtp_bench.BenchError
#: Warnings the server logs at start in this set-up, on purpose.
EXPECTED_WARNINGS = ("queue/discard is loaded", "serving as root (allow_root = yes)")


@dataclass
class Result:
    checks: str  # "off", "on", "chain" or "serial"
    delay_ms: float | None  # the front's delay; None when the checks are off
    concurrency: int
    messages: int
    seconds: float
    server_cpu: float  # CPU seconds of the server's processes during the run
    front_cpu: float  # CPU seconds of this process (the DNS front) during the run
    queries: int  # DNS queries the front received during the run

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")

    @property
    def label(self) -> str:
        return "checks off" if self.delay_ms is None else f"checks {self.checks}, DNS {self.delay_ms:g} ms"


class Server(benchlib.QpgeventServer):
    """``PYTHON -m qpgevent -c INI --listen 127.0.0.1:PORT --workers N`` with a [dns] section."""

    def __init__(self, args: argparse.Namespace, folder: Path, plugins: str, dns_port: int,
                 reverse_lookup: bool) -> None:
        folder.mkdir()
        dns = ("[dns]\n  nameservers = 127.0.0.1\n"
               f"  port = {dns_port}\n  timeout = 5\n  reverse_lookup = {'yes' if reverse_lookup else 'no'}\n")
        super().__init__(args.python, folder, plugins, args.log_level, max(1000, max(args.concurrency) + 10),
                         args.workers, sections=dns)

    def wait_ready(self) -> None:
        try:
            super().wait_ready()
        except BenchError as error:
            if "[dns]" in self.log() and "unknown section" in self.log():
                raise BenchError(f"{error}\n(this qpgevent has no [dns] settings: "
                                 "the checks cannot use the local DNS)") from None
            raise


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start(args: argparse.Namespace, name: str, folder: Path, front: SlowDnsFront) -> Server:
    server = Server(args, folder, CONFIGS[name], front.port, reverse_lookup=name != "off")
    front.delay = 0
    server.wait_ready()
    print(f"# checks {name}: qpgevent {server.version} pid {server.process.pid} on 127.0.0.1:{server.port}",
          flush=True)
    return server


def one_run(args: argparse.Namespace, name: str, server: Server, front: SlowDnsFront, delay_ms: float | None,
            concurrency: int) -> Result:
    """One smtp-source run against the ``name`` server with the front at ``delay_ms``."""
    front.delay = (delay_ms or 0) / 1000
    queries, cpu, own = front.queries, server.cpu_seconds(), own_cpu_seconds()
    try:
        seconds = benchlib.run_smtp_source(args.smtp_source, server.port, concurrency, args.messages,
                                           args.size, args.timeout, message_file=args.message_file)
    except BenchError as error:
        raise BenchError(f"checks {name}, concurrency {concurrency}: {error}\n"
                         f"--- server log (last lines) ---\n{benchlib.tail(server.log())}") from None
    result = Result(name, delay_ms, concurrency, args.messages, seconds,
                    server.cpu_seconds() - cpu, own_cpu_seconds() - own, front.queries - queries)
    print(format_row(result), flush=True)
    per_message = result.queries / result.messages
    if name != "off" and per_message < MIN_QUERIES_PER_MESSAGE[name]:
        raise BenchError(f"checks {name}: only {per_message:.1f} DNS queries/message "
                         f"(expected at least {MIN_QUERIES_PER_MESSAGE[name]}): "
                         "answers were cached, or the checks did not run")
    if name == "off" and result.queries:
        raise BenchError(f"checks off: {result.queries} DNS queries were made")
    return result


def bench(args: argparse.Namespace, folder: Path, front: SlowDnsFront) -> list[Result]:
    """Every configuration's server up side by side; the runs in rounds (A B C, A B C, ...)."""
    servers: dict[str, Server] = {}
    results = []
    try:
        for name in args.configs:
            servers[name] = start(args, name, folder / name, front)
        for round_number in range(1, args.rounds + 1):
            if args.rounds > 1:
                print(f"# round {round_number}, load average {os.getloadavg()[0]:.2f}", flush=True)
            for concurrency in args.concurrency:
                for name, server in servers.items():
                    for delay_ms in args.delays if name != "off" else [None]:
                        results.append(one_run(args, name, server, front, delay_ms, concurrency))
    finally:
        statuses = {name: server.stop() for name, server in servers.items()}
    for name, server in servers.items():
        if statuses[name] != 0:
            raise BenchError(f"checks {name}: server exited with status {statuses[name]} after SIGTERM\n"
                             f"{benchlib.tail(server.log())}")
        complaints = [line for line in server.log().splitlines() if smtp_bench.COMPLAINT.search(line)
                      and not any(known in line for known in EXPECTED_WARNINGS)]
        if complaints:
            print(f"# checks {name}: the server logged {len(complaints)} warning(s)/error(s), first ones:\n"
                  + "\n".join(complaints[:5]), file=sys.stderr)
    return results


HEADER = (f"{'checks':<6} {'dns delay':>9} {'concurrency':>11} {'messages':>8} {'seconds':>8} "
          f"{'messages/second':>15} {'server CPU ms/message':>21} {'DNS queries/message':>19} "
          f"{'front CPU %':>11}")


def format_row(result: Result) -> str:
    delay = "-" if result.delay_ms is None else f"{result.delay_ms:g} ms"
    return (f"{result.checks:<6} {delay:>9} {result.concurrency:>11} {result.messages:>8} "
            f"{result.seconds:>8.2f} {result.rate:>15.1f} {result.server_cpu * 1000 / result.messages:>21.3f} "
            f"{result.queries / result.messages:>19.1f} {100 * result.front_cpu / result.seconds:>11.0f}")


def side_by_side(results: list[Result], concurrency: int) -> list[str]:
    """Median messages/second of each run kind, and each one's rate over the others' taken
    within the same round (median, min-max over the rounds)."""
    kinds: dict[str, list[float]] = {}
    for result in results:
        if result.concurrency == concurrency:
            kinds.setdefault(result.label, []).append(result.rate)
    lines = [f"concurrency {concurrency}, messages/second (median of {len(next(iter(kinds.values())))} rounds): "
             + " | ".join(f"{label} {statistics.median(rates):.1f}" for label, rates in kinds.items())]
    labels = list(kinds)
    for index, label in enumerate(labels):
        for base in labels[:index]:
            ratios = [ours / theirs for ours, theirs in zip(kinds[label], kinds[base])]
            lines.append(f"  {label} / {base}: {statistics.median(ratios):.3f} "
                         f"({min(ratios):.3f}-{max(ratios):.3f})")
    return lines


def config_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"configurations are {', '.join(CONFIGS)}: not {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchlib.smtp_source_parser("Benchmark qpgevent's connection-time DNS checks.", [100],
                                         smtp_bench.default_python(), log_level="info")
    parser.add_argument("--delays", type=benchlib.number_list("delays", float, 0), default=[0.0, 50.0],
                        help="DNS answer delays in ms for the runs with checks, comma separated (default 0,50)")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds over every configuration and delay, servers up side by side (default 1)")
    parser.add_argument("--configs", type=config_list, default=["off", "on"],
                        help="configurations to run, in order: off, on, chain, serial (default off,on)")
    args = benchlib.parse_smtp_source_args(parser, argv)
    args.keep_connection = False  # one connection per message: every message is a new client
    if args.workers < 0 or args.rounds < 1:
        parser.error("--workers must be 0 or more, --rounds 1 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchlib.unwind_on_signals()
    print(f"# {args.messages} messages of {args.size} bytes per run, concurrency "
          f"{','.join(map(str, args.concurrency))}, one connection per message, "
          f"{args.workers} worker(s), server log level {args.log_level}, python {args.python}", flush=True)
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="qpg-bench-dns-", dir=args.workdir) as temp:
            args.message_file, dkim_key = signed_message(Path(temp), args.size)
            with LoopbackDns(zones(dkim_key), ttl=0, negative_ttl=0) as nsd, SlowDnsFront(nsd.port, delay=0) as front:
                print(f"# DNS: NSD on 127.0.0.1:{nsd.port}, TTL 0 and negative TTL 0 (nothing cached), "
                      f"behind a front on 127.0.0.1:{front.port} delaying each answer "
                      f"{', '.join(f'{d:g}' for d in args.delays)} ms", flush=True)
                print("# checks on: [dns] reverse_lookup (PTR + A), dnsbl (3 zones at once), "
                      "resolvable_fromhost (MX, then A + AAAA); chain: those, sender_permitted_from (TXT), "
                      "dkim (key TXT, verify)", flush=True)
                print(HEADER, flush=True)
                results = bench(args, Path(temp), front)
    except BenchError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: servers and DNS stopped", file=sys.stderr)
        return 130
    print()
    print(HEADER)
    for result in results:
        print(format_row(result))
    print()
    for concurrency in args.concurrency:
        print("\n".join(side_by_side(results, concurrency)))
    load = os.getloadavg()
    print(f"# load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
