"""Level 1 of the transcripts: every file replayed against the real conversation, in memory.

No socket: ``transcript_replay.CorePeer`` feeds the client's bytes to the conversation
the server drives (``qpgevent.engine``), with the plugins and settings the file names,
and reads what it says; so every decision of the session is checked here (sequencing,
syntax, parameters, limits, DATA framing, pipelining, the hooks' replies, delivery into
the Maildir). ``tests/e2e/test_transcripts_e2e.py`` replays the same files over a real
socket. ``# level: core`` marks the files about what the protocol core decides alone.
"""

import pytest

# tests/ is on sys.path (tests/conftest.py lives there; see transcript_replay's docstring).
import transcript_replay as tr

ALL = tr.all_transcripts()
CORE = [path for path in ALL if tr.load(path).core]


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_transcript_is_well_formed(path):
    # Parsing checks the header, the greeting first and the close last; a broken
    # e2e-only file fails here, in the fast suite, with its file and line.
    transcript = tr.load(path)
    assert any(isinstance(step, tr.Send) for step in transcript.steps)


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_core_replay(path, tmp_path):
    transcript = tr.load(path)
    peer = tr.CorePeer(tr.settings_for(transcript, tmp_path))
    tr.replay(transcript, peer)
    if transcript.delivers_to_maildir:  # M: lines list every message it would hold
        assert peer.delivered == sorted(transcript.messages)


def test_there_are_enough_core_transcripts():
    # Guards the glob and the header parsing: a typo there would silently run nothing.
    assert len(ALL) >= 12
    assert len(CORE) >= 8


TINY = """\
# level: core
# plugins: rcpt_ok, queue/maildir
S: 220 mx.example.test ESMTP ...
C: NOOP
S: {noop}
C: QUIT
S: 221 2.0.0 mx.example.test closing connection...
S: <connection closed>
"""


def _replay_tiny(tmp_path, noop_reply):
    transcript = tr.parse(TINY.format(noop=noop_reply), "tiny.smtp")
    tr.replay(transcript, tr.CorePeer(tr.settings_for(transcript, tmp_path)))


def test_replay_accepts_the_right_reply(tmp_path):
    _replay_tiny(tmp_path, "250 2.0.0 OK")


@pytest.mark.parametrize("wrong", ["250 2.0.0 OK!", "503 5.5.1 MAIL first", "250 2.0.0 O"])
def test_replay_notices_a_wrong_reply(tmp_path, wrong):
    with pytest.raises(AssertionError, match=r"tiny\.smtp:5: expected"):
        _replay_tiny(tmp_path, wrong)


def test_replay_notices_an_unlisted_reply(tmp_path):
    # The NOOP reply is left out of the file: the core replay sees it before the QUIT.
    text = TINY.replace("S: {noop}\n", "")
    transcript = tr.parse(text, "tiny.smtp")
    with pytest.raises(AssertionError, match="does not list"):
        tr.replay(transcript, tr.CorePeer(tr.settings_for(transcript, tmp_path)))


def test_replay_notices_a_missing_close(tmp_path):
    text = TINY.format(noop="250 2.0.0 OK").replace("C: QUIT\n", "C: NOOP\n").replace(
        "S: 221 2.0.0 mx.example.test closing connection...", "S: 250 2.0.0 OK")
    transcript = tr.parse(text, "tiny.smtp")
    with pytest.raises(AssertionError, match="waited for a reply"):
        tr.replay(transcript, tr.CorePeer(tr.settings_for(transcript, tmp_path)))


def test_pipelined_lines_are_one_write():
    transcript = tr.parse(
        "# level: core\n# plugins: rcpt_ok\nS: 220 x\nC: NOOP\nC+ RSET\nC+\nC: QUIT\n"
        "S: <connection closed>\n", "p.smtp")
    sends = [step.data for step in transcript.steps if isinstance(step, tr.Send)]
    assert sends == [b"NOOP\r\nRSET\r\n\r\n", b"QUIT\r\n"]


@pytest.mark.parametrize("text, problem", [
    ("# plugins: rcpt_ok\nS: 220 x\nS: <connection closed>\n", "level"),
    ("# level: core\n# plugins: nosuch\nS: 220 x\nS: <connection closed>\n", "plugins"),
    ("# level: core\n# plugins: rcpt_ok\nC: NOOP\nS: <connection closed>\n", "greeting"),
    ("# level: core\n# plugins: rcpt_ok\nS: 220 x\nC: QUIT\n", "last line"),
    ("# level: core\n# plugins: rcpt_ok\nS: 220 x\nS: <connection closed>\nC: NOOP\n", "follow"),
    ("# level: core\n# plugins: rcpt_ok\nS: 220 x\nM: hi\nS: <connection closed>\n", "maildir"),
    ("# level: core\n# plugins: rcpt_ok\nS: 220 x\nC+ NOOP\nS: <connection closed>\n", "C+"),
    ("# level: core\n# plugins: rcpt_ok\nS: 220 x\nX: what\nS: <connection closed>\n", "not a"),
])
def test_malformed_transcripts_are_refused(text, problem):
    with pytest.raises(tr.TranscriptError, match=problem):
        tr.parse(text, "bad.smtp")
