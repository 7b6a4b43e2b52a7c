"""Fixtures of the directory tests: a real Dovecot auth service and a real slapd, each test its own.

The daemons are stopped (and their directories removed) when the test ends, whatever
state the test left them in (stopped, paused). TLS material comes from the STARTTLS
tests' helpers (a throwaway trustme CA).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from gevent.server import StreamServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # tls_helpers, shared with the e2e tests

from directory_daemons import DOVECOT_USERS, PEOPLE, LoopbackDovecot, LoopbackSlapd  # noqa: E402
from tls_helpers import Certs  # noqa: E402

@pytest.fixture
def dovecot():
    with LoopbackDovecot(DOVECOT_USERS) as daemon:
        yield daemon


@pytest.fixture
def slapd():
    with LoopbackSlapd(PEOPLE) as daemon:
        yield daemon


@pytest.fixture
def certs(tmp_path):
    certs = Certs(tmp_path)
    certs.issue()
    return certs


@pytest.fixture
def tls_server(make_server, certs):
    """``tls_server(plugins_text, **settings)``: the real server with a certificate (STARTTLS)."""
    def make(plugin_text: str, **settings):
        server = make_server(plugin_text, tls_certificate="server.pem", auth_failure_delay=0, **settings)
        server.certs = certs
        return server
    return make


@pytest.fixture
def nonsense():
    """``nonsense(payload=HTTP 400, hang=False)``: a loopback ``host:port`` whose service sends
    ``payload`` and hangs up (or, with ``hang``, keeps the connection open and says nothing
    more). Not Dovecot or slapd: neither can be made to say this."""
    servers = []

    def start(payload: bytes = b"HTTP/1.1 400 Bad Request\r\n\r\n", hang: bool = False) -> str:
        def handle(sock, address):
            sock.sendall(payload)
            if hang:
                while sock.recv(65536):  # bounded by the client, which hangs up
                    pass
            sock.close()

        server = StreamServer(("127.0.0.1", 0), handle)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.stop(timeout=0)
