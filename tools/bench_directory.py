#!/usr/bin/env python3
"""Benchmark the directory plugins: messages/s through Dovecot and LDAP lookups, beside a run without.

Usage:
    tools/bench_directory.py [--messages 2000] [--concurrency 100] [--rounds 3] [--only RUN,...]
                             [--python PYTHON]
                             [--smtp-source /usr/sbin/smtp-source] [--log-level warning]

What it runs, all on this machine:

  daemons  a real Dovecot auth service and a real slapd, as the tests start them
           (``tests/directory/directory_daemons.py``), each knowing someone@example.test
  server   ``PYTHON -m qpgevent -c qpsmtpd.ini --workers 1`` (one core's numbers), queue/discard

Runs, each one message per connection, CONCURRENCY sessions at once:

  rcpt-baseline      rcpt_ok: no lookup                                      (smtp-source)
  rcpt_dovecot       a USER lookup on Dovecot's auth-userdb per message, cache off
  rcpt_ldap          an LDAP search per message (a new connection, anonymous bind), cache off
  rcpt_ldap-cached   rcpt_ldap with its TTL cache on: after the first, no lookups
  auth-baseline      smtplib greenlets: EHLO, MAIL, RCPT, DATA, no AUTH ([auth]
                     tls_before_auth = no: no TLS, so the numbers show the lookups)
  auth/dovecot       the same with AUTH PLAIN checked by Dovecot (handshake + AUTH per login)
  auth/ldap          the same with AUTH PLAIN by search-then-bind (two LDAP connections)

The smtp-source runs check that every message was accepted (it aborts at the first
refusal); the smtplib runs count the failures and fail if any. Each run gets a fresh
server; the runs are interleaved over ``--rounds`` rounds, and one line per run is
printed: the median messages/s (min-max) and the server's CPU ms per message.
"""

from gevent import monkey

monkey.patch_all()

import shutil  # noqa: E402
import smtplib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent.pool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests" / "directory"))
import benchlib  # noqa: E402
from directory_daemons import SUFFIX, LoopbackDovecot, LoopbackSlapd  # noqa: E402

from qpgevent.testing import plugin_section  # noqa: E402

USER, PASSWORD = benchlib.RECIPIENT, "bench-pw"
MESSAGE = b"Subject: bench\r\n\r\n" + (b"x" * 70 + b"\r\n") * 14  # about 1000 octets, as smtp-source -l 1000
DISCARD = "[[queue/discard]]\n"


def send_one(port: int, login: bool) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=benchlib.CLIENT_NAME, timeout=120) as client:
        if login:
            client.login(USER, PASSWORD)
        client.sendmail(benchlib.SENDER, [USER], MESSAGE)


def run_smtplib(port: int, messages: int, concurrency: int, login: bool) -> float:
    pool = gevent.pool.Pool(concurrency)
    started = time.perf_counter()
    jobs = [pool.spawn(send_one, port, login) for _ in range(messages)]
    pool.join()
    failed = [job.exception for job in jobs if job.exception is not None]
    if failed:
        raise benchlib.BenchError(f"{len(failed)} of {messages} failed, first: {failed[0]!r}")
    return time.perf_counter() - started


def runs(dovecot: LoopbackDovecot, slapd: LoopbackSlapd) -> list[tuple[str, str, bool | None]]:
    """(name, plugins, login): login None is an smtp-source run."""
    ok = plugin_section("rcpt_ok", domains=["example.test"])
    ldap = {"uri": slapd.uri, "lookup_timeout": 10}
    return [
        ("rcpt-baseline", ok, None),
        ("rcpt_dovecot", plugin_section("rcpt_dovecot", socket=dovecot.userdb_socket, cache_ttl=0,
                                        negative_ttl=0, lookup_timeout=10), None),
        ("rcpt_ldap", plugin_section("rcpt_ldap", base=SUFFIX, cache_ttl=0, negative_ttl=0, **ldap), None),
        ("rcpt_ldap-cached", plugin_section("rcpt_ldap", base=SUFFIX, **ldap), None),
        ("auth-baseline", ok, False),
        ("auth/dovecot", plugin_section("auth/dovecot", socket=dovecot.client_socket, lookup_timeout=10) + ok, True),
        ("auth/ldap", plugin_section("auth/ldap", base=SUFFIX, filter="(mail=%s)", **ldap) + ok, True),
    ]


def measure(args, folder: Path, name: str, plugins: str, login: bool | None, concurrency: int) -> tuple[float, float]:
    """One run on a fresh server: (messages/s, server CPU ms/message)."""
    run_folder = Path(tempfile.mkdtemp(prefix=f"{name.replace('/', '-')}-{concurrency}-", dir=folder))
    server = benchlib.QpgeventServer(args.python, run_folder, plugins + DISCARD, args.log_level,
                                     workers=1, sections="[auth]\n  tls_before_auth = no\n")
    try:
        server.wait_ready()
        cpu = server.cpu_seconds()
        if login is None:
            seconds = benchlib.run_smtp_source(args.smtp_source, server.port, concurrency, args.messages,
                                               args.size, args.timeout)
        else:
            seconds = run_smtplib(server.port, args.messages, concurrency, login)
        cpu = server.cpu_seconds() - cpu
    finally:
        server.stop()
    return args.messages / seconds, 1000 * cpu / args.messages


def main(argv=None) -> int:
    parser = benchlib.smtp_source_parser(__doc__.splitlines()[0], [100], sys.executable)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, interleaved; medians (default %(default)s)")
    parser.add_argument("--only", type=lambda text: set(text.split(",")), help="these runs only (names, comma separated)")
    args = benchlib.parse_smtp_source_args(parser, argv)
    benchlib.unwind_on_signals()
    folder = Path(tempfile.mkdtemp(prefix="qpg-bench-directory-", dir=args.workdir))
    try:
        with LoopbackDovecot({USER: PASSWORD}) as dovecot, \
                LoopbackSlapd({"someone": {"mail": USER, "userPassword": PASSWORD}}) as slapd:
            cells = [(name, plugins, login, concurrency) for name, plugins, login in runs(dovecot, slapd)
                     for concurrency in args.concurrency if not args.only or name in args.only]
            results: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for _ in range(args.rounds):  # A B C, A B C: drift of the machine hits every run alike
                for name, plugins, login, concurrency in cells:
                    results.setdefault((name, concurrency), []).append(
                        measure(args, folder, name, plugins, login, concurrency))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"one message per connection, {args.messages} messages a run, median of {args.rounds} "
          "(min-max); server CPU ms/message")
    for (name, concurrency), values in results.items():
        rates = sorted(rate for rate, _ in values)
        cpu = statistics.median(ms for _, ms in values)
        print(f"{name:18} conc {concurrency:4}: {statistics.median(rates):6.0f} msg/s ({rates[0]:.0f}-{rates[-1]:.0f})"
              f"  {cpu:5.2f} ms CPU/msg", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
