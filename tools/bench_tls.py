#!/usr/bin/env python3
"""Benchmark messages/second over STARTTLS against plaintext, with a gevent pool of smtplib clients.

Usage:
    tools/bench_tls.py [--messages 2000] [--concurrency 10,100] [--workers 1] [--size 1000]
                       [--python PYTHON] [--auth]

smtp-source has no TLS, so the clients are smtplib in greenlets of this process (monkey
patched): CONCURRENCY clients each open a connection, say EHLO (then STARTTLS and EHLO
again in the TLS runs; with --auth also AUTH PLAIN), send their share of the messages one
after another on that connection, and QUIT. The server is the qpgevent command in a child
process (rcpt_ok + queue/discard: the SMTP and TLS engine alone), a throwaway certificate
(an RSA-2048 self-signed one from openssl, as many sites still use) in a temporary folder.
Printed: messages/second per mode and concurrency, and the TLS/plaintext ratio; plus the
connections/second of a second TLS run with one message per connection (handshake cost).
The client side shares the machine: on 2 cores the numbers are a floor, not a ceiling.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import smtplib  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PLUGINS = "  [[rcpt_ok]]\n    domains = example.test\n  [[queue/discard]]\n"


def make_certificate(folder: Path) -> Path:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=mx.example.test",
                    "-addext", "subjectAltName=DNS:mx.example.test,IP:127.0.0.1"],
                   check=True, capture_output=True)
    (folder / "server.pem").write_bytes(key.read_bytes() + cert.read_bytes())
    return cert


def run(port: int, context: ssl.SSLContext | None, messages: int, concurrency: int, per_connection: int,
        body: bytes) -> float:
    """Messages/second: ``messages`` sent by ``concurrency`` clients, ``per_connection`` each time."""
    connections = max(1, messages // per_connection)

    def client(_: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test", timeout=60) as smtp:
            if context is not None:
                smtp.starttls(context=context)
            for _ in range(per_connection):
                smtp.sendmail("sender@client.test", ["someone@example.test"], body)

    pool = Pool(concurrency)
    started = time.monotonic()
    jobs = [pool.spawn(client, i) for i in range(connections)]
    gevent.joinall(jobs, raise_error=True)
    return connections * per_connection / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", default="10,100")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    body = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, args.size // 78)
    with tempfile.TemporaryDirectory(prefix="qpg-bench-tls-") as workdir:
        folder = Path(workdir)
        cert = make_certificate(folder)
        context = ssl.create_default_context(cafile=str(cert))
        server = benchlib.QpgeventServer(args.python, folder, PLUGINS, "warning", 2000, args.workers,
                                         sections="[tls]\n  certificate = server.pem\n")
        try:
            server.wait_ready()
            print(f"qpgevent {server.version}, {args.workers} worker(s), {args.messages} messages of "
                  f"{len(body)} octets, 10 per connection (and 1 per connection for TLS setup cost)")
            print(f"{'concurrency':>11} {'plain msg/s':>12} {'STARTTLS msg/s':>15} {'ratio':>6} "
                  f"{'TLS conn/s (1 msg each)':>24}")
            run(server.port, context, 200, 10, 10, body)  # warm up (imports, first handshakes)
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                plain = run(server.port, None, args.messages, concurrency, 10, body)
                tls = run(server.port, context, args.messages, concurrency, 10, body)
                tls_one = run(server.port, context, args.messages // 4, concurrency, 1, body)
                print(f"{concurrency:>11} {plain:>12.0f} {tls:>15.0f} {tls / plain:>6.2f} {tls_one:>24.0f}",
                      flush=True)
        finally:
            server.process.terminate()
            server.process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
