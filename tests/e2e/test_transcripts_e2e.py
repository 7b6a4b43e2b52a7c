"""Level 2 of the transcripts: EVERY file replayed over a real socket to the real server.

The in-process server runs with the plugins and settings the file's header names; a
raw socket sends the client lines byte for byte (pipelined groups in one write) and
checks every reply line, then the Maildir holds exactly the messages the file lists.
"""

import pytest

from qpgevent.testing import maildir_messages, strip_trace

# tests/ is on sys.path (tests/conftest.py lives there; see transcript_replay's docstring).
import transcript_replay as tr

ALL = tr.all_transcripts()


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_socket_replay(path, make_server):
    transcript = tr.load(path)
    server = make_server(transcript.plugins_ini(), **transcript.settings)
    peer = tr.SocketPeer(server.host, server.port)
    try:
        tr.replay(transcript, peer)
    finally:
        peer.close()
    if transcript.delivers_to_maildir:
        delivered = sorted(strip_trace(m) for m in maildir_messages(server.maildir).values())
        assert delivered == sorted(transcript.messages)
