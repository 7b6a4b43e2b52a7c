#!/usr/bin/env python3
"""Benchmark the service plugins: messages/s through rspamd, a Postfix policy server and
qmail-queue, beside the same server without them.

Usage:
    tools/bench_services.py [--messages 500] [--concurrency 100] [--only rspamd,policy-spf,...]
                            [--python PYTHON] [--log-level warning]

What it runs, all on this machine (the daemons as the tests start them:
``tests/services/service_daemons.py``):

  daemons  rspamd (one normal worker, private config, no network); policyd-spf behind
           socat (one policyd-spf process per policy connection, as Postfix's spawn(8)
           runs it) with a real NSD for the SPF records; postgrey (one daemon) with the
           client whitelisted, so every question is answered at once; qmail-queue: a
           two-line ``sh`` stand-in that reads the message and the envelope (qmail's own
           is a small C program; qmail is not packaged in Debian) and the tests' strict
           Python checker, which starts a Python per message
  server   ``PYTHON -m qpgevent -c qpsmtpd.ini --workers 1`` (one core's numbers)
  client   greenlets in this process, one message per connection with smtplib, from
           127.0.0.2 with a PROXY header saying 192.0.2.25 (policyd-spf checks no loopback client):
           CONCURRENCY at once

Runs (each also with rcpt_ok; queue/discard unless the run is a queue):
  off          nothing else
  rspamd       rspamd at data_post; the message gets its milter headers
  policy-spf   policy (policyd-spf) at rcpt: SPF pass, Received-SPF prepended
  policy-grey  policy (postgrey) at rcpt
  qmail-sh     queue/qmail_queue with the sh stand-in
  qmail-check  queue/qmail_queue with the Python checker

Every message must be accepted (a refusal stops the run). The server's own CPU per
message shows what qpgevent adds; the rest of the time is the daemon's.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import shutil  # noqa: E402
import smtplib  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests" / "services"))
import benchlib  # noqa: E402
from service_daemons import SPF_ZONES, LoopbackRspamd, Postgrey, SpfPolicy  # noqa: E402

from qpgevent.testing.dns import LoopbackDns  # noqa: E402

CLIENT_IP = "192.0.2.25"
PROXY_IP = "127.0.0.2"  #: the trusted proxy we connect from (the readiness probe comes from 127.0.0.1)
BASE = "  [[rcpt_ok]]\n    domains = example.test, example.org\n"
DISCARD = "  [[queue/discard]]\n"
RUNS = ("off", "rspamd", "policy-spf", "policy-grey", "qmail-sh", "qmail-check")
QMAIL_SH = "/bin/sh -c 'cat >/dev/null; cat <&1 >/dev/null'"


def message() -> bytes:
    paragraph = ("Hello Bob, here are the minutes of Tuesday's meeting. We agreed to move the "
                 "release to next week and to review the open tickets on Friday.\r\n")
    return ("From: Alice <alice@example.test>\r\nTo: bob@example.org\r\nSubject: minutes\r\n"
            "Date: Tue, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@example.test>\r\n\r\n"
            + paragraph * 28).encode()


def send_one(port: int, data: bytes) -> None:
    client = smtplib.SMTP(local_hostname="mail.example.test", timeout=300)
    sock = socket.create_connection(("127.0.0.1", port), timeout=300, source_address=(PROXY_IP, 0))
    sock.sendall(f"PROXY TCP4 {CLIENT_IP} 127.0.0.1 40000 25\r\n".encode())
    client.sock, client.file = sock, None
    with client:
        code, text = client.getreply()
        if code != 220:
            raise benchlib.BenchError(f"greeting {code} {text!r}")
        refused = client.sendmail("alice@example.test", ["bob@example.org"], data)
        if refused:
            raise benchlib.BenchError(f"refused: {refused}")


def run(port: int, data: bytes, messages: int, concurrency: int) -> float:
    return benchlib.run_concurrently(send_one, port, data, messages, concurrency)


def plugins_for(name: str, daemons: dict) -> str:
    if name == "rspamd":
        return f"  [[rspamd]]\n    url = http://{daemons['rspamd'].address}\n    timeout = 60\n    call_timeout = 50\n" \
               + BASE + DISCARD
    if name.startswith("policy"):
        server = daemons["spf" if name == "policy-spf" else "grey"].address
        return f"  [[policy]]\n    server = {server}\n    timeout = 60\n    call_timeout = 50\n" + BASE + DISCARD
    if name.startswith("qmail"):
        program = QMAIL_SH if name == "qmail-sh" else \
            f"/usr/bin/python3 {ROOT}/tests/services/qmail_queue_check.py {daemons['qmail_dir']}"
        return BASE + f"  [[queue/qmail_queue]]\n    program = \"{program}\"\n"
    return BASE + DISCARD


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--only", type=lambda text: text.split(","), default=list(RUNS))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = set(args.only) - set(RUNS)
    if unknown:
        print(f"bench_services: unknown runs {sorted(unknown)} (known: {', '.join(RUNS)})", file=sys.stderr)
        return 2
    benchlib.unwind_on_signals()
    folder = Path(tempfile.mkdtemp(prefix="qpg-bench-services-"))
    servers, daemons = [], []
    try:
        nsd = LoopbackDns(SPF_ZONES)
        daemons.append(nsd)
        found = {"qmail_dir": folder / "qmail"}
        found["qmail_dir"].mkdir()
        if "rspamd" in args.only:
            found["rspamd"] = LoopbackRspamd()
            daemons.append(found["rspamd"])
        if "policy-spf" in args.only:
            found["spf"] = SpfPolicy(nsd.port)
            daemons.append(found["spf"])
        if "policy-grey" in args.only:
            found["grey"] = Postgrey(whitelist_clients=[CLIENT_IP])
            daemons.append(found["grey"])
        data, rows = message(), []
        for name in args.only:
            where = folder / name
            where.mkdir()
            server = benchlib.QpgeventServer(args.python, where, plugins_for(name, found), log_level=args.log_level,
                                             workers=1, sections=f"[proxy]\n  trusted = {PROXY_IP}\n")
            servers.append(server)
            server.wait_ready()
            try:
                run(server.port, data, min(args.concurrency, args.messages), args.concurrency)  # warm-up
                cpu = server.cpu_seconds()
                seconds = run(server.port, data, args.messages, args.concurrency)
                cpu = server.cpu_seconds() - cpu
            except (smtplib.SMTPException, OSError) as error:
                raise benchlib.BenchError(f"{name}: {error!r}; the server's log:\n{benchlib.tail(server.log())}")
            rows.append((name, args.messages / seconds, cpu * 1000 / args.messages))
            server.stop()
            servers.remove(server)
            if "Traceback" in server.log():
                raise benchlib.BenchError(f"the {name} server logged a traceback:\n{benchlib.tail(server.log())}")
        queued = len(list(found["qmail_dir"].glob("*.msg")))
        print(f"service plugins, {args.messages} messages of {len(data)} octets, "
              f"concurrency {args.concurrency}, 1 worker")
        print(f"{'run':<12} {'messages/s':>11} {'server CPU ms/msg':>18}")
        for name, rate, cpu_ms in rows:
            print(f"{name:<12} {rate:>11.1f} {cpu_ms:>18.2f}")
        if "qmail-check" in args.only:
            print(f"qmail-check stored {queued} messages (warm-up included)")
        return 0
    except benchlib.BenchError as error:
        print(f"bench_services: {error}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
        for daemon in reversed(daemons):
            daemon.close() if hasattr(daemon, "close") else daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
