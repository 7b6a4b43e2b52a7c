"""Who may see the admin pages, checked on the WSGI application itself.

A request from a non-loopback address cannot be made on this machine's loopback-only
network, so the source address is set in the WSGI environ, as the HTTP server would set
it. The same app behind a real socket is tested in tests/e2e/test_admin.py.
"""

from __future__ import annotations

import json
from wsgiref.util import setup_testing_defaults

import pytest

from qpgevent.server.admin import AdminApp


def call(app: AdminApp, path: str = "/status.json", remote: str = "127.0.0.1", query: str = "",
         method: str = "GET", **headers: str) -> tuple[str, dict[str, str], bytes]:
    environ: dict = {"PATH_INFO": path, "QUERY_STRING": query, "REMOTE_ADDR": remote, "REQUEST_METHOD": method}
    environ.update({f"HTTP_{name.upper()}": value for name, value in headers.items()})
    setup_testing_defaults(environ)
    answer: dict = {}

    def start_response(status, response_headers):
        answer["status"], answer["headers"] = status, dict(response_headers)

    body = b"".join(app(environ, start_response))
    return answer["status"], answer["headers"], body


@pytest.mark.parametrize("remote", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"])
def test_without_a_token_loopback_clients_are_served(tmp_path, remote):
    status, _, body = call(AdminApp(str(tmp_path)), remote=remote)
    assert status == "200 OK"
    assert json.loads(body)["totals"]["sessions"] == 0


@pytest.mark.parametrize("remote", ["192.0.2.7", "10.1.2.3", "2001:db8::1", "::ffff:192.0.2.7", ""])
@pytest.mark.parametrize("path", ["/status", "/status.json", "/metrics", "/"])
def test_without_a_token_other_clients_are_refused(tmp_path, remote, path):
    status, _, body = call(AdminApp(str(tmp_path)), path, remote=remote)
    assert status == "403 Forbidden"
    assert b"loopback" in body and b"session" not in body


@pytest.mark.parametrize("remote", ["127.0.0.1", "192.0.2.7"])
def test_with_a_token_every_client_needs_it(tmp_path, remote):
    app = AdminApp(str(tmp_path), token="s3cret")
    assert call(app, remote=remote)[0] == "401 Unauthorized"
    assert call(app, remote=remote)[1]["WWW-Authenticate"].startswith("Bearer")
    assert call(app, remote=remote, authorization="Bearer wrong")[0] == "401 Unauthorized"
    assert call(app, remote=remote, query="token=wrong")[0] == "401 Unauthorized"
    assert call(app, remote=remote, authorization="Basic czNjcmV0")[0] == "401 Unauthorized"
    assert call(app, remote=remote, authorization="Bearer s3cret")[0] == "200 OK"
    assert call(app, remote=remote, authorization="bearer  s3cret ")[0] == "200 OK"
    assert call(app, remote=remote, query="token=s3cret")[0] == "200 OK"


def test_routes(tmp_path):
    app = AdminApp(str(tmp_path), refresh=3)
    status, headers, body = call(app, "/status")
    assert status == "200 OK" and headers["Content-Type"].startswith("text/html")
    assert b'<meta http-equiv="refresh" content="3">' in body
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none': no scripts
    assert call(app, "/", query="token=x")[1]["Location"] == "/status?token=x"
    assert call(app, "/nothing")[0] == "404 Not Found"
    assert call(app, "/status", method="POST")[0] == "405 Method Not Allowed"
    status, headers, _ = call(app, "/metrics")
    assert status == "200 OK" and headers["Content-Type"].startswith("text/plain; version=")


def test_what_clients_wrote_is_escaped_on_the_page(tmp_path):
    row = {"id": "1.1", "pid": 1, "remote_ip": "192.0.2.1", "helo": "<script>alert(1)</script>",
           "sender": "<\"&\"@example.test>", "state": "mail", "doing": "waiting", "recipients": 0,
           "bytes": 10, "started": 0}
    (tmp_path / "1.json").write_text(json.dumps({"pid": 1, "started": 0, "sessions": [row]}))  # pid 1: alive
    _, _, body = call(AdminApp(str(tmp_path)), "/status")
    assert b"<script>" not in body
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert b"&lt;&quot;&amp;&quot;@example.test&gt;" in body
