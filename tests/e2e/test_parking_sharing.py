"""Parked sessions share what is the same for every session of a listener (issue 20, 6).

A parked session is its socket and its objects (``qpgevent.server.parking``): thousands of
them are cheap only if each keeps its own state and nothing more. These tests hold two
real sessions parked on the real server and check, by identity, that what is the same
for both is one object, and that the per-session objects carry no ``__dict__``. The
bytes themselves are measured by ``tools/idle_memory.py`` (docs/benchmarks.md), not here.
"""

from __future__ import annotations

from qpgevent.engine.session import Session
from qpgevent.testing import RawClient, wait_until


def two_parked_sessions(make_server):
    server = make_server(park_after=0.05)
    clients = [RawClient(server) for _ in range(2)]
    for client in clients:
        assert client.reply()[0] == 220
        assert client.command("EHLO client.test")[0] == 250

    def both_parked():
        return len(server.server.parking) == 2 and all(isinstance(h, Session) for h in server.server.sessions)
    wait_until(both_parked, 10, "both sessions to park")
    return server, clients, server.server.parking.oldest()


def test_two_parked_sessions_of_one_listener_share_their_limits_and_surroundings(make_server):
    server, clients, (first, second) = two_parked_sessions(make_server)
    one, two = first.conversation, second.conversation
    assert one.protocol is not two.protocol
    assert one.protocol.limits is two.protocol.limits  # one Limits object for the listener
    assert one.protocol.limits.max_command_line == server.server.settings.max_command_line
    assert one.surroundings is two.surroundings  # the limiter, the sender map, the server's count
    assert first.command_timeout is second.command_timeout  # the shedder's, bound once
    own = getattr(one.session, "_wait_for_input"), getattr(two.session, "_wait_for_input")
    assert own[0] is not own[1]  # each its own socket
    # Still each session's own answers: both go on where they stopped.
    for client in clients:
        assert client.command("NOOP")[0] == 250
        assert client.command("QUIT")[0] == 221
        client.close()
    wait_until(lambda: not server.server.sessions, 10, "the sessions to end")


def test_a_parked_sessions_objects_are_slotted(make_server):
    server, clients, (driver, _) = two_parked_sessions(make_server)
    conversation = driver.conversation
    for part in (driver, conversation, conversation.session, conversation.session.connection, conversation.protocol,
                 conversation.surroundings, conversation.auth, conversation.mail, conversation.tally):
        assert not hasattr(part, "__dict__"), type(part).__name__
    for client in clients:
        client.close()
    wait_until(lambda: not server.server.sessions, 10, "the sessions to end")


def test_each_sessions_wait_for_input_asks_its_own_socket(make_server):
    """The session's wait_for_input (earlytalker) is its own, on its own socket, beside the
    shared surroundings."""
    server, clients, drivers = two_parked_sessions(make_server)
    for driver in drivers:
        wait = getattr(driver.session, "_wait_for_input")
        assert getattr(wait, "sock") is driver.sock
        assert driver.session.wait_for_input(0) is False  # parked: nothing sent since our 250
    for client in clients:
        client.close()
    wait_until(lambda: not server.server.sessions, 10, "the sessions to end")
