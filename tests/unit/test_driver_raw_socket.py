"""The driver's fast path (``_raw_socket``): a plain gevent socket is read and written through
its OS socket; a TLS socket, or a socket without gevent's private waiting parts, is not."""

import ssl

import gevent.socket
import gevent.ssl

from qpgevent.server.driver import _raw_socket


def test_a_plain_gevent_socket_is_read_and_written_through_its_os_socket():
    left, right = gevent.socket.socketpair()
    with left, right:
        raw = _raw_socket(left)
        assert raw is not None and raw.gettimeout() == 0.0  # the fast path is on with this gevent
        right.sendall(b"EHLO x\r\n")
        gevent.socket.wait_read(left.fileno(), timeout=5)
        assert raw.recv(100) == b"EHLO x\r\n"


def test_anything_else_takes_gevents_public_path():
    left, right = gevent.socket.socketpair()
    with left, right:
        wrapped = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).wrap_socket(left, server_side=True,
                                                                              do_handshake_on_connect=False)
        assert _raw_socket(wrapped) is None

        class WithoutPrivateParts(gevent.socket.socket):
            _wait = property(lambda self: (_ for _ in ()).throw(AttributeError("_wait")))

        assert _raw_socket(WithoutPrivateParts(fileno=right.detach())) is None
