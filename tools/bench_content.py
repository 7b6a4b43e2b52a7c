#!/usr/bin/env python3
"""Benchmark the content plugins: messages/s with SPF + DKIM verify + spamassassin + clamdscan
beside the same run without them, and the server's peak memory while big messages arrive.

Usage:
    tools/bench_content.py [--messages 400] [--concurrency 50] [--big-sessions 20]
                           [--big-mib 20] [--spamd-children 2] [--python PYTHON]
                           [--log-level info]

What it runs, all on this machine:

  DNS      a real NSD on 127.0.0.1 (``LoopbackDns``): client.test with an SPF record that
           passes 127.0.0.1 and the DKIM key the messages are signed with
  scanners a real spamd and a real clamd (``qpgevent.testing.scanners``: spamd without
           network tests, clamd with one test signature)
  server   ``PYTHON -m qpgevent -c qpsmtpd.ini --workers 1`` (one core's numbers)
  client   greenlets in this process, each sending one message per connection with
           smtplib (smtp-source cannot send a DKIM-signed message): CONCURRENCY at once

Runs:
  off      rcpt_ok + queue/discard
  on       sender_permitted_from + dkim + spamassassin + virus/clamdscan + rcpt_ok +
           queue/discard; the message (about 4 KiB of text, signed with a 2048-bit key)
           passes every check, so every check runs to the end
  no-sa    "on" without spamassassin: what SPF + DKIM + clamd cost without spamd
  memory   the "on" server; BIG_SESSIONS sessions at once each send a BIG_MIB MiB message
           (clamdscan streams it all to clamd, which is set to accept streams that long;
           spamassassin skips it for size, as configured by default; it is DKIM-signed,
           and dkim hashes its body from the spool in chunks); the server's
           peak resident memory (VmHWM of master and worker) is printed. The body is
           spooled to disk past [server] size_threshold (1 MiB), so the peak should stay
           far below BIG_SESSIONS x BIG_MIB.

What the "on" rate measures is mostly spamd: a SpamAssassin scan costs tens of ms of CPU
in spamd's children, and the machine's cores are shared by all the processes. The
server's own CPU per message ("server CPU ms/msg") shows what qpgevent adds.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import shutil  # noqa: E402
import smtplib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import dkim  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from qpgevent.testing.dns import LoopbackDns  # noqa: E402
from qpgevent.testing.scanners import LoopbackClamd, LoopbackSpamd  # noqa: E402

BASE = """
  [[rcpt_ok]]
    domains = example.test
  [[queue/discard]]
"""


def content_plugins(spamd_port: int | None, clamd_port: int) -> str:
    spamassassin = f"""
  [[spamassassin]]
    spamd_socket = 127.0.0.1:{spamd_port}
    reject_score = 10
    timeout = 60
    scan_timeout = 50""" if spamd_port else ""
    return f"""
  [[sender_permitted_from]]
  [[dkim]]{spamassassin}
  [[virus/clamdscan]]
    clamd_socket = 127.0.0.1:{clamd_port}
    timeout = 60
    scan_timeout = 50
{BASE}"""


def make_key(folder: Path) -> tuple[bytes, str]:
    private = folder / "dkim.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                    "-out", str(private)], check=True, capture_output=True)
    public = subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-outform", "DER"],
                            check=True, capture_output=True).stdout
    return private.read_bytes(), base64.b64encode(public).decode()


def txt(text: str) -> tuple[str, str]:
    return ("TXT", " ".join(f'"{text[i:i + 200]}"' for i in range(0, len(text), 200)))


def signed_message(private: bytes) -> bytes:
    paragraph = ("Hello Bob, here are the minutes of Tuesday's meeting. We agreed to move the "
                 "release to next week and to review the open tickets on Friday.\r\n")
    data = ("From: Alice <alice@client.test>\r\nTo: bob@example.test\r\nSubject: minutes\r\n"
            "Date: Tue, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@client.test>\r\n\r\n"
            + paragraph * 28).encode()
    signature = dkim.sign(data, b"sel", b"client.test", private, include_headers=[b"from", b"to", b"subject"])
    return signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + data


def big_message(mib: int, private: bytes) -> bytes:
    line = b"x" * 76 + b"\r\n"
    data = (b"From: alice@client.test\r\nTo: bob@example.test\r\nSubject: big\r\n"
            b"Date: Tue, 25 Nov 2026 10:00:00 +0000\r\n\r\n" + line * (mib * (1 << 20) // len(line)))
    signature = dkim.sign(data, b"sel", b"client.test", private, include_headers=[b"from", b"to", b"subject"])
    return signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + data


def send_one(port: int, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=300) as client:
        refused = client.sendmail("alice@client.test", ["bob@example.test"], data)
        if refused:
            raise benchlib.BenchError(f"refused: {refused}")


def run(port: int, data: bytes, messages: int, concurrency: int) -> float:
    return benchlib.run_concurrently(send_one, port, data, messages, concurrency)


def vm_hwm_kib(pid: int) -> int:
    """Peak resident memory (VmHWM) of ``pid`` and its descendants, summed, in KiB."""
    total = 0
    for each in benchlib.descendants(pid):
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def start_server(args, folder: Path, name: str, plugins: str, dns_port: int) -> benchlib.QpgeventServer:
    where = folder / name
    where.mkdir()
    server = benchlib.QpgeventServer(
        args.python, where, plugins, log_level=args.log_level, workers=1,
        sections=f"[dns]\n  nameservers = 127.0.0.1\n  port = {dns_port}\n  reverse_lookup = no\n")
    server.wait_ready()
    return server


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--big-sessions", type=int, default=20)
    parser.add_argument("--big-mib", type=int, default=20)
    parser.add_argument("--spamd-children", type=int, default=2)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.unwind_on_signals()
    folder = Path(tempfile.mkdtemp(prefix="qpg-bench-content-"))
    servers = []
    try:
        private, public = make_key(folder)
        zones = {"client.test": {"@": [txt("v=spf1 ip4:127.0.0.1 -all")],
                                 "sel._domainkey": [txt(f"v=DKIM1; k=rsa; p={public}")]}}
        message = signed_message(private)
        with LoopbackDns(zones) as nsd, LoopbackSpamd(children=args.spamd_children) as spamd, \
                LoopbackClamd(stream_max=f"{args.big_mib + 5}M") as clamd:
            rows = []
            runs = (("off", BASE), ("on", content_plugins(spamd.port, clamd.port)),
                    ("no-sa", content_plugins(None, clamd.port)))
            for name, plugins in runs:
                server = start_server(args, folder, name, plugins, nsd.port)
                servers.append(server)
                run(server.port, message, min(args.concurrency, args.messages), args.concurrency)  # warm-up
                cpu = server.cpu_seconds()
                seconds = run(server.port, message, args.messages, args.concurrency)
                cpu = server.cpu_seconds() - cpu
                rows.append((name, args.messages / seconds, cpu * 1000 / args.messages))
                if name == "on":
                    before = vm_hwm_kib(server.process.pid)
                    big = big_message(args.big_mib, private)
                    big_seconds = run(server.port, big, args.big_sessions, args.big_sessions)
                    after = vm_hwm_kib(server.process.pid)
                server.stop()
                servers.remove(server)
                log = server.log()
                if "Traceback" in log:
                    raise benchlib.BenchError(f"the {name} server logged a traceback:\n{benchlib.tail(log)}")
                if name != "off":  # every check ran to the end, on every message (plugins log at info)
                    big_ones = args.big_sessions if name == "on" else 0  # signed too, verified from the spool
                    needed = {"spf=pass": args.messages + big_ones, "dkim=pass d=client.test": args.messages + big_ones}
                    if name == "on":
                        needed["spam=False"] = args.messages
                    short = {word: log.count(word) for word, n in needed.items() if log.count(word) < n}
                    if short:
                        raise benchlib.BenchError(f"checks did not run on every message: {short}")
        print(f"content plugins, {args.messages} messages of {len(message)} octets, "
              f"concurrency {args.concurrency}, 1 worker")
        print(f"{'run':<7} {'messages/s':>11} {'server CPU ms/msg':>18}")
        for name, rate, cpu_ms in rows:
            print(f"{name:<7} {rate:>11.1f} {cpu_ms:>18.2f}")
        print(f"memory: {args.big_sessions} sessions x {args.big_mib} MiB in {big_seconds:.1f}s; "
              f"server VmHWM (master + worker) {before / 1024:.0f} MiB before, {after / 1024:.0f} MiB after")
        return 0
    except benchlib.BenchError as error:
        print(f"bench_content: {error}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
