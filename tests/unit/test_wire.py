"""Tests for qpgevent.core.wire: command-line framing and the DATA stream, byte by byte.

What is at stake: only CRLF ends a line (RFC 5321 2.3.8, the SMTP-smuggling defence),
line length limits that hold without unbounded buffering (4.5.3.1.4 and .6),
dot-unstuffing (4.5.2) and the end marker found however the bytes are chunked.
Expected messages are built here from logical lines, independently of the reader.
"""

from __future__ import annotations

import random

import pytest

from qpgevent.core.wire import BareLineEnding, CommandFramer, DataReader, LineTooLong

CRLF = b"\r\n"
MB = 1 << 20
CHUNK = 1 << 16  # what the session reads at a time


def lines_of(framer: CommandFramer) -> list[object]:
    out = []
    while (line := framer.next_line()) is not None:
        out.append(line)
    return out


# --- CommandFramer -------------------------------------------------------------


def test_lines_come_out_in_order_without_crlf():
    framer = CommandFramer()
    framer.feed(b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\n\r\nNOOP\r\n")
    assert lines_of(framer) == [b"EHLO a.test", b"MAIL FROM:<a@b.test>", b"", b"NOOP"]


@pytest.mark.parametrize("cut", range(1, len(b"NOOP\r\nRSET\r\n")))
def test_a_line_split_anywhere_waits_for_its_crlf(cut):
    data = b"NOOP\r\nRSET\r\n"
    framer = CommandFramer()
    framer.feed(data[:cut])
    first = lines_of(framer)
    framer.feed(data[cut:])
    assert first + lines_of(framer) == [b"NOOP", b"RSET"]
    assert first == ([b"NOOP"] if cut >= 6 else [])


def test_512_octets_with_crlf_is_the_longest_command():
    # RFC 5321 4.5.3.1.4: 512 octets including the CRLF.
    framer = CommandFramer(512)
    longest = b"NOOP " + b"x" * (512 - 7)
    framer.feed(longest + CRLF + longest + b"y" + CRLF + b"QUIT\r\n")
    assert lines_of(framer) == [longest, LineTooLong(), b"QUIT"]


def test_overlong_line_in_pieces_is_reported_once_and_skipped_to_its_end():
    framer = CommandFramer(512)
    framer.feed(b"x" * 600)
    assert lines_of(framer) == [LineTooLong()]
    framer.feed(b"x" * 600)
    assert lines_of(framer) == []  # same line: no second report
    framer.feed(b"tail of it\r\nNOOP\r\n")
    assert lines_of(framer) == [b"NOOP"]


def test_ten_megabytes_without_crlf_are_never_buffered():
    framer = CommandFramer(512)
    reports = []
    for _ in range(10 * MB // CHUNK):
        framer.feed(b"A" * CHUNK)
        reports += lines_of(framer)
        assert len(framer.buffer) < 512  # dropped as it comes, not kept
    framer.feed(b"\r\nRSET\r\n")
    assert reports + lines_of(framer) == [LineTooLong(), b"RSET"]


@pytest.mark.parametrize("raw", [
    b"NOOP\n",  # bare LF ends nothing legal
    b"NOOP\rRSET\r\n",  # bare CR inside
    b"NOOP\r\r\n",  # CR before the CRLF
    b"\n",
])
def test_bare_line_endings_in_commands_are_refused(raw):
    framer = CommandFramer()
    framer.feed(raw + b"QUIT\r\n")
    assert lines_of(framer) == [BareLineEnding(), b"QUIT"]


def test_cr_and_lf_in_separate_feeds_are_one_crlf():
    framer = CommandFramer()
    framer.feed(b"NOOP\r")
    assert lines_of(framer) == []
    framer.feed(b"\n")
    assert lines_of(framer) == [b"NOOP"]


def test_take_rest_hands_over_and_forgets_the_buffer():
    framer = CommandFramer()
    framer.feed(b"DATA\r\nSubject: x\r\n")
    assert framer.next_line() == b"DATA"
    assert framer.take_rest() == b"Subject: x\r\n"
    assert framer.take_rest() == b""
    assert framer.next_line() is None


# --- DataReader ----------------------------------------------------------------


def stuffed(lines: list[bytes]) -> bytes:
    """What a correct client sends for these message lines (RFC 5321 4.5.2), end marker included."""
    return b"".join((b"." + line if line.startswith(b".") else line) + CRLF for line in lines) + b".\r\n"


def joined(lines: list[bytes]) -> bytes:
    return b"".join(line + CRLF for line in lines)


def read(reader: DataReader, chunks: list[bytes]) -> tuple[bytes, bytes | None]:
    """Feed chunks until the end marker: the message, and all that followed the marker
    (the rest the reader handed back plus the chunks not fed), or None if no end came."""
    message = bytearray()
    for i, chunk in enumerate(chunks):
        data, rest = reader.feed(chunk)
        message += data
        if rest is not None:
            return bytes(message), rest + b"".join(chunks[i + 1:])
    return bytes(message), None


MESSAGE = [b"Subject: dots", b"", b".", b"..", b".leading", b"middle . dot", b"", b". ", b"last."]
AFTER = b"MAIL FROM:<next@client.test>\r\nRCPT TO:<bob@example.test>\r\nDA"


def test_message_is_unstuffed_and_what_follows_is_handed_back():
    reader = DataReader(0)
    message, rest = read(reader, [stuffed(MESSAGE) + AFTER])
    assert message == joined(MESSAGE)
    assert rest == AFTER
    assert reader.size == len(joined(MESSAGE))
    assert not (reader.problems.too_big or reader.problems.line_too_long
                or reader.problems.bare_line_ending)


def test_empty_message_ends_at_once():
    assert read(DataReader(0), [b".\r\nQUIT\r\n"]) == (b"", b"QUIT\r\n")


def test_single_dot_without_stuffing_is_still_removed():
    # 4.5.2: "If the first character is a period and there are other characters on the
    # line, the first character is deleted" -- whether or not the client doubled it.
    assert read(DataReader(0), [b".x\r\n. y\r\n.\r\n"]) == (b"x\r\n y\r\n", b"")


def test_every_split_point_gives_the_same_message():
    wire = stuffed(MESSAGE) + AFTER
    for cut in range(len(wire) + 1):
        message, rest = read(DataReader(0), [wire[:cut], wire[cut:]])
        assert (message, rest) == (joined(MESSAGE), AFTER), cut


def test_every_pair_of_split_points_around_dot_lines():
    # Three chunks, cut at every two places: covers a CR, LF or dot alone in a chunk,
    # the end marker in three pieces, and a stuffed dot cut from its line.
    lines = [b"a", b".", b"..b", b""]
    wire = stuffed(lines) + b"QUIT\r\n"
    for i in range(len(wire) + 1):
        for j in range(i, len(wire) + 1):
            result = read(DataReader(0), [wire[:i], wire[i:j], wire[j:]])
            assert result == (joined(lines), b"QUIT\r\n"), (i, j)


def test_one_byte_at_a_time():
    wire = stuffed(MESSAGE) + AFTER
    message, rest = read(DataReader(0), [wire[i:i + 1] for i in range(len(wire))])
    assert (message, rest) == (joined(MESSAGE), AFTER)


def test_random_chunkings():
    rng = random.Random(5321)  # seeded: the same chunkings on every run
    lines = MESSAGE * 3
    wire = stuffed(lines) + AFTER
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randint(1, 12)))
        chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)])]
        assert read(DataReader(0), chunks) == (joined(lines), AFTER), cuts


@pytest.mark.parametrize("chunks", [
    [b"a\r\n", b".\r\n"],
    [b"a\r\n.", b"\r\n"],
    [b"a\r\n.\r", b"\n"],
    [b"a\r", b"\n.\r\n"],
    [b"a", b"\r", b"\n", b".", b"\r", b"\n"],
])
def test_end_marker_split_across_chunks(chunks):
    assert read(DataReader(0), chunks) == (b"a\r\n", b"")


@pytest.mark.parametrize("ending", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\n"])
@pytest.mark.parametrize("allow", [False, True])
def test_bare_line_endings_never_end_the_message(ending, allow):
    # The smuggling shapes: none of them is CRLF.CRLF, so the message goes on, and the
    # bare LF/CR is either a problem (default) or kept as data.
    smuggled = b"MAIL FROM:<evil@x.test>\r\n"
    reader = DataReader(0, allow_bare_lf=allow)
    message, rest = read(reader, [b"hello" + ending + smuggled])
    assert rest is None
    message, rest = read(reader, [b"real end\r\n.\r\n"])
    assert rest == b""
    assert reader.problems.bare_line_ending is not allow


def test_bare_lf_kept_verbatim_when_allowed():
    reader = DataReader(0, allow_bare_lf=True)
    wire = b"a\nb\rc\r\n\n.\nd\r\n.\r\n"
    assert read(reader, [wire]) == (b"a\nb\rc\r\n\n.\nd\r\n", b"")
    assert not reader.problems.bare_line_ending


def test_dot_after_crlf_then_bare_lf_is_unstuffed_as_a_dot_line():
    # "\r\n.\nX" is a line ".\nX": it starts with a dot, so the dot goes (4.5.2).
    reader = DataReader(0, allow_bare_lf=True)
    assert read(reader, [b"a\r\n.\nX\r\n.\r\n"]) == (b"a\r\n\nX\r\n", b"")


@pytest.mark.parametrize("line", [b"a\nb", b"a\rb", b"ab\r", b"\n", b"\r"])
def test_bare_cr_or_lf_in_data_is_found_at_any_split(line):
    wire = line + b"\r\n.\r\n"
    for cut in range(len(wire) + 1):
        reader = DataReader(0)
        _, rest = read(reader, [wire[:cut], wire[cut:]])
        assert rest == b"", cut
        assert reader.problems.bare_line_ending, cut


def test_crlf_only_message_has_no_bare_ending_at_any_split():
    wire = stuffed(MESSAGE)
    for cut in range(len(wire) + 1):
        reader = DataReader(0)
        read(reader, [wire[:cut], wire[cut:]])
        assert not reader.problems.bare_line_ending, cut


def test_text_line_of_1000_octets_passes_1001_does_not():
    # RFC 5321 4.5.3.1.6: 1000 octets including CRLF.
    ok = DataReader(0)
    read(ok, [b"x" * 998 + b"\r\n.\r\n"])
    assert not ok.problems.line_too_long
    long = DataReader(0)
    message, rest = read(long, [b"x" * 999 + b"\r\n.\r\n"])
    assert long.problems.line_too_long
    assert rest == b""


def test_the_stuffed_dot_does_not_count_toward_the_line_limit():
    # 4.5.3.1.6: "not counting the leading dot duplicated for transparency".
    reader = DataReader(0)
    message, _ = read(reader, [b"." + b"." + b"x" * 997 + b"\r\n.\r\n"])
    assert message == b"." + b"x" * 997 + CRLF
    assert not reader.problems.line_too_long


def test_ten_megabyte_line_streams_through_without_being_held():
    reader = DataReader(0, max_line=1000)
    fed = out = 0
    for _ in range(10 * MB // CHUNK):
        data, rest = reader.feed(b"B" * CHUNK)
        fed += CHUNK
        out += len(data)
        assert rest is None
        # Everything but at most one legal line's worth has been handed on.
        assert fed - out <= 1000
    data, rest = reader.feed(b"\r\nnext line\r\n.\r\nQUIT\r\n")
    assert data.endswith(b"\r\nnext line\r\n")
    assert rest == b"QUIT\r\n"
    assert reader.problems.line_too_long
    assert not reader.problems.bare_line_ending
    assert reader.size == 10 * MB + len(b"\r\nnext line\r\n")


def test_long_line_starting_with_a_dot_is_unstuffed_and_not_an_end():
    reader = DataReader(0, max_line=1000)
    message, rest = read(reader, [b"." * 1500, b"\r\n.\r\n"])
    assert message == b"." * 1499 + CRLF
    assert rest == b""


def test_a_long_line_ending_in_a_chunk_boundary_cr():
    # The CR held back must still pair with the LF of the next chunk.
    reader = DataReader(0, max_line=1000)
    message, rest = read(reader, [b"y" * 1200 + b"\r", b"\n.\r\n"])
    assert message == b"y" * 1200 + CRLF
    assert rest == b""
    assert not reader.problems.bare_line_ending


@pytest.mark.parametrize("size, too_big", [(99, False), (100, False), (101, True)])
def test_size_limit_counts_unstuffed_octets(size, too_big):
    body = b"." + b"x" * (size - 3) + CRLF  # ``size`` octets once unstuffed
    reader = DataReader(100)
    message, rest = read(reader, [b"." + body + b".\r\n"])  # the doubled dot is free
    assert reader.size == size
    assert reader.problems.too_big is too_big
    assert rest == b""
    assert message == (b"" if too_big else body)


def test_bytes_past_the_size_limit_are_not_kept():
    reader = DataReader(1000)
    kept = 0
    for _ in range(MB // CHUNK):
        data, _ = reader.feed((b"z" * 98 + CRLF) * (CHUNK // 100))
        kept += len(data)
    _, rest = reader.feed(b".\r\n")
    assert rest == b""
    assert reader.problems.too_big
    assert kept <= 1000
    assert reader.size > MB // 2  # counted, though not kept


def test_bytes_past_the_size_limit_are_not_kept_even_without_crlf():
    # One endless line: its bytes are flushed as it streams (it is too long to hold),
    # and the size limit must still stop them reaching the spool.
    reader = DataReader(1000)
    kept = 0
    for _ in range(10 * MB // CHUNK):
        data, _ = reader.feed(b"z" * CHUNK)
        kept += len(data)
    assert kept <= 1000
    assert reader.problems.too_big
    _, rest = reader.feed(b"\r\n.\r\n")
    assert rest == b""
