"""An MTA-STS policy server for tests (testing_netlab.PolicyServer): HTTPS on ADDRESS:443, policies by Host (RFC 8461 3.3).

``python -m qpgevent.testing.sts_server ADDRESS CHAIN KEY POLICIES.json``: POLICIES maps a domain to the
text served for ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` (text/plain, 200);
anything else is 404. A POST (a TLS-RPT report, RFC 8460 5.2) is kept as
``posted-N-HOST.bin`` beside POLICIES.json, and answered 201. Prints "ready" once
listening; logs each request.
"""

import http.server
import itertools
import json
import os
import socket
import ssl
import sys

POST_LIMIT = 1 << 20
_posts = itertools.count(1)

class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10

    def do_GET(self):  # noqa: N802
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        domain = host.removeprefix("mta-sts.")
        body = self.server.policies.get(domain) if self.path == "/.well-known/mta-sts.txt" and host.startswith("mta-sts.") else None
        data = (body or "not found").encode()
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        length = min(int(self.headers.get("Content-Length") or 0), POST_LIMIT)
        body = self.rfile.read(length)
        name = f"posted-{next(_posts)}-{host}.bin"
        with open(os.path.join(self.server.folder, name + ".tmp"), "wb") as handle:
            handle.write(f"{self.path}\n{self.headers.get('Content-Type')}\n".encode() + body)
        os.replace(os.path.join(self.server.folder, name + ".tmp"), os.path.join(self.server.folder, name))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):  # noqa: A002
        print(self.address_string(), format % args, flush=True)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    policies: dict[str, str] = {}
    folder = "."


def main() -> None:
    address, chain, key, policies_file = sys.argv[1:5]
    Server.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server = Server((address, 443), Handler)
    with open(policies_file, encoding="utf-8") as handle:
        server.policies = json.load(handle)
    server.folder = os.path.dirname(os.path.abspath(policies_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
