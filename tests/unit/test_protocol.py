"""Tests for qpgevent.core.protocol: the SMTP state machine, bytes in and events out.

The session decides whether a command succeeds (its reply); the protocol decides what
that means: a positive reply moves the state, a negative one keeps it, 421 or a
closing reply ends the conversation, and syntax errors spend the bad-command budget.
No sockets here: bytes go in with ``receive_data`` and replies with ``send``.
"""

from __future__ import annotations

import pytest

from qpgevent.core.protocol import (CONNECTION_CLOSED, NEED_DATA, Data, Ehlo, Helo, Help, Limits,
                               Mail, MessageData, MessageEnd, Noop, Quit, Rcpt, Rejected, Rset,
                               SmtpProtocol, State, Unknown, Vrfy)
from qpgevent.core.reply import Canned, Reply, reply

OK = reply(250, "2.0.0", "OK")
HELLO = reply(250, None, "mx.example.test Hi there")
GO = reply(354, None, "go ahead")
DENIED = reply(550, "5.7.1", "denied")
LATER = reply(450, "4.7.1", "later")
BYE = reply(221, "2.0.0", "bye", close=True)
SHUTDOWN = reply(421, "4.3.2", "shutting down")


def command(protocol: SmtpProtocol, line: bytes):
    """Send one command line and take its event (which then awaits a reply)."""
    protocol.receive_data(line + b"\r\n")
    return protocol.next_event()


def answer(protocol: SmtpProtocol, line: bytes, response: Reply) -> bytes:
    command(protocol, line)
    return protocol.send(response)


def in_state(state: State, limits: Limits = Limits()) -> SmtpProtocol:
    """A protocol walked to ``state`` by accepted commands."""
    protocol = SmtpProtocol(limits)
    steps = [(b"EHLO client.test", HELLO), (b"MAIL FROM:<a@client.test>", OK),
             (b"RCPT TO:<b@example.test>", OK), (b"DATA", GO)]
    targets = [State.READY, State.MAIL, State.RCPT, State.DATA]
    if state is not State.NEED_HELLO:
        for (line, response), reached in zip(steps, targets):
            answer(protocol, line, response)
            if reached is state:
                break
    assert protocol.state is state
    return protocol


def drain(protocol: SmtpProtocol, respond=lambda event: OK) -> list[object]:
    """Take events until more input is needed, answering each that awaits a reply."""
    events = []
    for _ in range(1000):
        event = protocol.next_event()
        events.append(event)
        if event is NEED_DATA or event is CONNECTION_CLOSED:
            return events
        if protocol.awaiting_reply:
            protocol.send(respond(event))
    raise AssertionError("no end of events")


# --- greeting and hello ----------------------------------------------------------


def test_starts_waiting_for_hello_and_greets_without_enhanced_code():
    protocol = SmtpProtocol()
    assert protocol.state is State.NEED_HELLO
    # RFC 2034 3: no enhanced status code on the greeting.
    assert protocol.greeting(reply(220, "2.0.0", "mx ready")) == b"220 mx ready\r\n"
    assert protocol.state is State.NEED_HELLO


@pytest.mark.parametrize("banner", [reply(554, "5.7.1", "go away", close=True),
                                    reply(421, "4.7.0", "busy")])
def test_a_refusing_greeting_closes(banner):
    protocol = SmtpProtocol()
    protocol.greeting(banner)
    assert protocol.state is State.CLOSED
    protocol.receive_data(b"EHLO client.test\r\n")
    assert protocol.next_event() is CONNECTION_CLOSED


def test_helo_and_ehlo_events_carry_the_domain():
    protocol = SmtpProtocol()
    event = command(protocol, b"helo client.test extra words")
    assert event == Helo("HELO", "client.test extra words", "helo client.test extra words",
                         domain="client.test")
    protocol.send(HELLO)
    assert (protocol.state, protocol.esmtp) == (State.READY, False)
    assert isinstance(command(protocol, b"EHLO other.test"), Ehlo)
    protocol.send(HELLO)
    assert (protocol.state, protocol.esmtp) == (State.READY, True)


def test_refused_hello_keeps_waiting_for_hello():
    protocol = SmtpProtocol()
    answer(protocol, b"EHLO spammer.test", DENIED)
    assert protocol.state is State.NEED_HELLO
    assert command(protocol, b"MAIL FROM:<a@client.test>") == Rejected(
        Canned.SAY_HELLO_FIRST, "MAIL FROM:<a@client.test>")


def test_hello_mid_transaction_resets_it():
    # RFC 5321 4.1.4: a HELO/EHLO after a transaction started is like RSET.
    protocol = in_state(State.RCPT)
    answer(protocol, b"HELO client.test", HELLO)
    assert (protocol.state, protocol.recipients_accepted, protocol.recipients_tried) == (State.READY, 0, 0)
    assert isinstance(command(protocol, b"MAIL FROM:<a@client.test>"), Mail)  # not nested


def test_refused_hello_mid_transaction_changes_nothing():
    protocol = in_state(State.RCPT)
    answer(protocol, b"EHLO client.test", LATER)
    assert protocol.state is State.RCPT
    assert protocol.esmtp


# --- the transaction -------------------------------------------------------------


def test_accepted_mail_rcpt_data_walk_the_states():
    protocol = SmtpProtocol()
    for line, response, state in [(b"EHLO c.test", HELLO, State.READY),
                                  (b"MAIL FROM:<a@c.test>", OK, State.MAIL),
                                  (b"RCPT TO:<b@example.test>", OK, State.RCPT),
                                  (b"RCPT TO:<c@example.test>", OK, State.RCPT),
                                  (b"DATA", GO, State.DATA)]:
        answer(protocol, line, response)
        assert protocol.state is state, line
    assert (protocol.recipients_tried, protocol.recipients_accepted) == (2, 2)


def test_refused_mail_keeps_ready_and_is_not_a_transaction():
    protocol = in_state(State.READY)
    answer(protocol, b"MAIL FROM:<a@c.test>", DENIED)
    assert protocol.state is State.READY
    assert isinstance(command(protocol, b"MAIL FROM:<b@c.test>"), Mail)  # not "nested"


def test_refused_recipients_are_counted_but_do_not_move_the_state():
    protocol = in_state(State.MAIL)
    answer(protocol, b"RCPT TO:<x@elsewhere.test>", DENIED)
    answer(protocol, b"RCPT TO:<y@elsewhere.test>", LATER)
    assert protocol.state is State.MAIL
    assert (protocol.recipients_tried, protocol.recipients_accepted) == (2, 0)
    # RFC 2920 3.1: DATA after every recipient was refused is 554, not 503.
    assert command(protocol, b"DATA").reply == Canned.NO_VALID_RECIPIENTS


def test_data_before_any_rcpt_is_503():
    protocol = in_state(State.MAIL)
    assert command(protocol, b"DATA").reply == Canned.RCPT_FIRST


@pytest.mark.parametrize("refusal", [reply(554, "5.7.1", "no"), reply(451, "4.3.0", "later")])
def test_refused_data_ends_the_transaction(refusal):
    protocol = in_state(State.RCPT)
    answer(protocol, b"DATA", refusal)
    assert protocol.state is State.READY
    assert command(protocol, b"RCPT TO:<b@example.test>").reply == Canned.MAIL_FIRST


def test_rset_ends_the_transaction_but_keeps_the_greeting():
    protocol = in_state(State.RCPT)
    answer(protocol, b"RSET", OK)
    assert (protocol.state, protocol.recipients_accepted) == (State.READY, 0)
    before_hello = SmtpProtocol()
    answer(before_hello, b"RSET", OK)
    assert before_hello.state is State.NEED_HELLO


@pytest.mark.parametrize("state, line, expected", [
    (State.NEED_HELLO, b"MAIL FROM:<a@c.test>", Canned.SAY_HELLO_FIRST),
    (State.NEED_HELLO, b"RCPT TO:<b@example.test>", Canned.SAY_HELLO_FIRST),
    (State.NEED_HELLO, b"DATA", Canned.MAIL_FIRST),
    (State.READY, b"RCPT TO:<b@example.test>", Canned.MAIL_FIRST),
    (State.READY, b"DATA", Canned.MAIL_FIRST),
    (State.MAIL, b"MAIL FROM:<a@c.test>", Canned.NESTED_MAIL),
    (State.RCPT, b"MAIL FROM:<a@c.test>", Canned.NESTED_MAIL),
])
def test_out_of_order_commands_are_rejected_and_change_nothing(state, line, expected):
    protocol = in_state(state)
    before = (protocol.recipients_tried, protocol.recipients_accepted)
    event = command(protocol, line)
    assert event == Rejected(expected, line.decode())
    assert expected.code == 503
    protocol.send(event.reply)
    assert protocol.state is state
    assert (protocol.recipients_tried, protocol.recipients_accepted) == before
    assert protocol.bad_commands == 1


@pytest.mark.parametrize("line", [b"NOOP", b"VRFY bob", b"HELP", b"HELP DATA", b"RSET", b"QUIT"])
@pytest.mark.parametrize("state", [State.NEED_HELLO, State.READY, State.RCPT])
def test_commands_allowed_in_any_state(line, state):
    # RFC 5321 4.1.4: NOOP, HELP, VRFY and RSET may be sent at any time.
    kinds = {b"NOOP": Noop, b"VRFY": Vrfy, b"HELP": Help, b"RSET": Rset, b"QUIT": Quit}
    event = command(in_state(state), line)
    assert type(event) is kinds[line.split()[0]]


# --- closing -----------------------------------------------------------------------


@pytest.mark.parametrize("closing", [BYE, SHUTDOWN, reply(521, "5.5.1", "bye", close=True)])
def test_a_closing_reply_or_any_421_ends_the_conversation(closing):
    protocol = in_state(State.RCPT)
    protocol.receive_data(b"NOOP\r\nNOOP\r\n")
    protocol.next_event()
    assert protocol.send(closing) == closing.to_bytes()
    assert protocol.state is State.CLOSED
    assert protocol.next_event() is CONNECTION_CLOSED  # the second NOOP is never read
    assert protocol.next_event() is CONNECTION_CLOSED


def test_421_at_message_end_closes():
    protocol = in_state(State.DATA)
    protocol.receive_data(b".\r\n")
    assert isinstance(protocol.next_event(), MessageEnd)
    protocol.send(SHUTDOWN)
    assert protocol.state is State.CLOSED


def test_a_reply_must_come_before_the_next_event():
    protocol = SmtpProtocol()
    protocol.receive_data(b"NOOP\r\nNOOP\r\n")
    protocol.next_event()
    assert protocol.awaiting_reply
    with pytest.raises(RuntimeError):
        protocol.next_event()
    protocol.send(OK)
    assert not protocol.awaiting_reply
    assert isinstance(protocol.next_event(), Noop)


# --- the bad-command budget --------------------------------------------------------


def test_syntax_and_sequence_errors_spend_the_budget_then_421():
    protocol = SmtpProtocol(Limits(max_bad_commands=3))
    assert protocol.send(command(protocol, b"MAIL FROM:<a@c.test>").reply).startswith(b"503 ")
    answer(protocol, b"EHLO c.test", HELLO)  # good commands do not refund
    assert protocol.send(command(protocol, b"MAIL FROM <a@c.test>").reply).startswith(b"501 ")
    assert protocol.state is State.READY
    out = answer(protocol, b"XYZZY", reply(500, "5.5.1", "Unrecognized command"))
    assert out == b"500 5.5.1 Unrecognized command\r\n421 4.7.0 Too many errors, closing connection\r\n"
    assert protocol.state is State.CLOSED
    assert protocol.bad_commands == 3


def test_policy_refusals_do_not_spend_the_budget():
    # A 550 relaying denial or a 452 is a decision, not a client error.
    protocol = in_state(State.MAIL, Limits(max_bad_commands=2, max_recipients=1))
    for _ in range(5):
        answer(protocol, b"RCPT TO:<x@elsewhere.test>", DENIED)
        answer(protocol, b"RCPT TO:<y@elsewhere.test>", LATER)
    answer(protocol, b"RCPT TO:<b@example.test>", OK)
    event = command(protocol, b"RCPT TO:<c@example.test>")
    protocol.send(event.reply)
    assert event.reply == Canned.TOO_MANY_RECIPIENTS
    assert (protocol.bad_commands, protocol.state) == (0, State.RCPT)


def test_zero_means_no_budget():
    protocol = SmtpProtocol(Limits(max_bad_commands=0))
    for _ in range(100):
        protocol.send(command(protocol, b"DATA").reply)
    assert (protocol.state, protocol.bad_commands) == (State.NEED_HELLO, 100)


# --- limits and framing errors as events ---------------------------------------------


def test_max_recipients_counts_accepted_recipients_only():
    protocol = in_state(State.MAIL, Limits(max_recipients=2))
    answer(protocol, b"RCPT TO:<x@elsewhere.test>", DENIED)
    answer(protocol, b"RCPT TO:<a@example.test>", OK)
    answer(protocol, b"RCPT TO:<b@example.test>", OK)
    event = command(protocol, b"RCPT TO:<c@example.test>")
    assert event == Rejected(Canned.TOO_MANY_RECIPIENTS, "RCPT TO:<c@example.test>")
    assert event.reply.to_bytes() == b"452 4.5.3 Too many recipients\r\n"  # RFC 5321 4.5.3.1.10
    protocol.send(event.reply)
    answer(protocol, b"DATA", GO)
    protocol.receive_data(b".\r\n")
    protocol.next_event()
    protocol.send(OK)
    answer(protocol, b"MAIL FROM:<a@c.test>", OK)
    assert isinstance(command(protocol, b"RCPT TO:<c@example.test>"), Rcpt)  # a new count


@pytest.mark.parametrize("raw, expected", [
    (b"NOOP " + b"x" * 506 + b"\r\n", Canned.COMMAND_TOO_LONG),  # 513 octets
    (b"NOOP\n", Canned.BARE_LF_IN_COMMAND),
    (b"NO\rOP\r\n", Canned.BARE_LF_IN_COMMAND),
    (b"MAIL FROM:<\xff@c.test>\r\n", Canned.NOT_UTF8),
])
def test_framing_errors_are_rejected_and_the_next_command_is_read(raw, expected):
    protocol = in_state(State.READY)
    protocol.receive_data(raw + b"NOOP\r\n")
    event = protocol.next_event()
    assert isinstance(event, Rejected) and event.reply == expected
    assert expected.to_bytes().startswith(b"500 5.5.2 ")
    protocol.send(event.reply)
    assert isinstance(protocol.next_event(), Noop)


def test_a_512_octet_command_is_fine():
    protocol = in_state(State.READY)
    line = b"NOOP " + b"x" * 505
    assert len(line + b"\r\n") == 512
    assert isinstance(command(protocol, line), Noop)


def test_ten_megabytes_without_crlf_make_one_rejection():
    protocol = in_state(State.READY)
    events = []
    for _ in range(160):
        protocol.receive_data(b"A" * (1 << 16))
        events += drain(protocol, respond=lambda event: event.reply)
    protocol.receive_data(b"\r\nNOOP\r\n")
    events += drain(protocol)
    rejected = [e for e in events if isinstance(e, Rejected)]
    assert rejected == [Rejected(Canned.COMMAND_TOO_LONG)]
    assert isinstance(events[-2], Noop)
    assert protocol.bad_commands == 1


# --- parsing ---------------------------------------------------------------------------


def test_mail_and_rcpt_carry_path_and_upper_cased_params():
    protocol = in_state(State.READY)
    event = command(protocol, b"mail from: <a@c.test> size=100 Body=8BITMIME SMTPUTF8")
    assert isinstance(event, Mail)
    assert event.path == "<a@c.test>"
    assert event.params == {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}
    protocol.send(OK)
    assert protocol.smtputf8
    event = command(protocol, b'RCPT TO:<"odd > name"@example.test>')
    assert isinstance(event, Rcpt) and event.path == '<"odd > name"@example.test>'


def test_smtputf8_lasts_one_transaction():
    protocol = in_state(State.READY)
    answer(protocol, b"MAIL FROM:<a@c.test> SMTPUTF8", OK)
    answer(protocol, b"RSET", OK)
    assert not protocol.smtputf8
    answer(protocol, b"MAIL FROM:<a@c.test>", OK)
    assert not protocol.smtputf8


@pytest.mark.parametrize("line, expected", [
    (b"MAIL <a@c.test>", Canned.SYNTAX),
    (b"MAIL FROM:", Canned.SYNTAX),
    (b"MAIL FROM:<a@c.test", Canned.SYNTAX),
    (b"MAIL FROM:<a@c.test>x", Canned.SYNTAX),
    (b"MAIL FROM:<a@c.test> SIZE=1 SIZE=2", Canned.SYNTAX),
    (b"MAIL FROM:<a@c.test> SIZE=", Canned.SYNTAX),
    (b"MAIL FROM:<a@c.test> =1", Canned.SYNTAX),
    (b"MAIL FROM:<a@c.test> SIZE=-1", Canned.BAD_SIZE),
    (b"MAIL FROM:<a@c.test> SIZE", Canned.BAD_SIZE),
    ("MAIL FROM:<a@c.test> SIZE=²".encode(), Canned.BAD_SIZE),  # a digit to str.isdigit()
    ("MAIL FROM:<a@c.test> SIZE=١٢".encode(), Canned.BAD_SIZE),  # Arabic-Indic digits
    (b"MAIL FROM:<a@c.test> BODY=BINARY", Canned.BAD_BODY),
    (b"MAIL FROM:<a@c.test> SMTPUTF8=1", Canned.SYNTAX),
    (b"MAIL FROM:<a@c.test> XAUTH=<>", Canned.UNKNOWN_PARAMETER),  # AUTH= is known (RFC 4954 5)
    (b"MAIL FROM:<a@c.test> SIZE=1001", Canned.TOO_BIG),
    (b"HELO", Canned.HELO_NEEDS_DOMAIN),
    (b"EHLO   ", Canned.HELO_NEEDS_DOMAIN),
    (b"VRFY", Canned.SYNTAX),
    (b"RSET x", Canned.NO_ARGUMENTS),
    (b"QUIT x", Canned.NO_ARGUMENTS),
])
def test_malformed_commands(line, expected):
    protocol = in_state(State.READY, Limits(max_message_size=1000))  # after EHLO
    assert command(protocol, line) == Rejected(expected, line.decode())


def test_size_at_the_limit_or_without_a_limit_is_accepted():
    at_limit = in_state(State.READY, Limits(max_message_size=1000))
    assert isinstance(command(at_limit, b"MAIL FROM:<a@c.test> SIZE=1000"), Mail)
    no_limit = in_state(State.READY, Limits(max_message_size=0))
    assert isinstance(command(no_limit, b"MAIL FROM:<a@c.test> SIZE=99999999999"), Mail)


def test_parameters_need_ehlo():
    # RFC 1869 6: a client that said HELO may not use service extensions.
    protocol = SmtpProtocol()
    answer(protocol, b"HELO c.test", HELLO)
    assert command(protocol, b"MAIL FROM:<a@c.test> BODY=7BIT").reply == Canned.UNKNOWN_PARAMETER
    protocol.send(Canned.UNKNOWN_PARAMETER)
    answer(protocol, b"MAIL FROM:<a@c.test>", OK)
    assert command(protocol, b"RCPT TO:<b@example.test> X=1").reply == Canned.UNKNOWN_PARAMETER


@pytest.mark.parametrize("line, verb", [(b"XYZZY plugh", "XYZZY"), (b"", ""), (b"N0-OP!", "N0-OP!"),
                                        (b"x" * 30, "X" * 20), (b"  noop  ", None)])
def test_unknown_verbs_come_out_as_unknown(line, verb):
    event = command(in_state(State.READY), line)
    if verb is None:
        assert isinstance(event, Noop)  # surrounding spaces are tolerated
    else:
        assert type(event) is Unknown and event.verb == verb


# --- pipelining, DATA and EOF ------------------------------------------------------------


def test_pipelined_commands_come_out_one_by_one_in_order():
    protocol = in_state(State.READY)
    protocol.receive_data(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
                          b"RCPT TO:<b@example.test>\r\nDATA\r\n")
    out = []
    kinds = []
    for response in (OK, DENIED, OK, GO):
        event = protocol.next_event()
        kinds.append(type(event))
        out.append(protocol.send(response))
    assert kinds == [Mail, Rcpt, Rcpt, Data]
    assert out == [r.to_bytes() for r in (OK, DENIED, OK, GO)]
    assert protocol.state is State.DATA
    assert protocol.next_event() is NEED_DATA


def test_data_mode_reads_commands_as_message_text():
    protocol = in_state(State.DATA)
    protocol.receive_data(b"MAIL FROM:<evil@x.test>\r\nQUIT\r\n")
    assert protocol.next_event() == MessageData(b"MAIL FROM:<evil@x.test>\r\nQUIT\r\n")
    assert protocol.next_event() is NEED_DATA
    assert protocol.state is State.DATA


def test_input_after_the_final_dot_is_commands_again():
    protocol = in_state(State.RCPT)
    protocol.receive_data(b"DATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\nNOOP\r\nQUIT\r\n")
    assert isinstance(protocol.next_event(), Data)
    protocol.send(GO)
    assert protocol.next_event() == MessageData(b"Subject: x\r\n\r\n.dot\r\n")
    assert not protocol.awaiting_reply  # message pieces need no reply
    end = protocol.next_event()
    assert end == MessageEnd(len(b"Subject: x\r\n\r\n.dot\r\n"))
    assert protocol.awaiting_reply
    protocol.send(OK)
    assert (protocol.state, protocol.recipients_accepted) == (State.READY, 0)
    assert isinstance(protocol.next_event(), Noop)
    protocol.send(OK)
    assert isinstance(protocol.next_event(), Quit)


def test_message_refused_at_data_leaves_the_rest_as_commands():
    # RFC 2920 3.1: the client must wait for 354; if DATA fails, what it sent anyway
    # can only be read as commands (and they are unknown ones here).
    protocol = in_state(State.RCPT)
    protocol.receive_data(b"DATA\r\nhello\r\n.\r\n")
    protocol.next_event()
    protocol.send(reply(554, "5.7.1", "no"))
    events = drain(protocol, lambda event: Canned.UNRECOGNIZED)
    assert [type(e) for e in events] == [Unknown, Unknown, type(NEED_DATA)]


def test_message_end_after_the_last_piece_of_data_in_the_same_input():
    protocol = in_state(State.DATA)
    protocol.receive_data(b"one\r\n")
    assert protocol.next_event() == MessageData(b"one\r\n")
    protocol.receive_data(b"two\r\n.\r\n")
    assert protocol.next_event() == MessageData(b"two\r\n")
    assert protocol.next_event() == MessageEnd(10)


@pytest.mark.parametrize("message, problem", [
    (b"a\nb\r\n", Canned.BARE_LINE_ENDING),
    (b"a\rb\r\n", Canned.BARE_LINE_ENDING),
    (b"x" * 999 + b"\r\n", Canned.TEXT_LINE_TOO_LONG),
    (b"y\r\n" * 700, Canned.TOO_BIG),
    (b"z\n" * 600 + b"\r\n" + b"x" * 1200 + b"\r\n", Canned.TOO_BIG),  # too big wins
    (b"\n" + b"w" * 1000 + b"\r\n", Canned.BARE_LINE_ENDING),  # bare LF wins over length
])
def test_message_problems_come_with_the_end(message, problem):
    protocol = in_state(State.DATA, Limits(max_message_size=2000))
    protocol.receive_data(message + b".\r\nNOOP\r\n")
    events = drain(protocol)
    end = next(e for e in events if isinstance(e, MessageEnd))
    assert end.problem == problem
    assert isinstance(events[-2], Noop)  # the session goes on


def test_allow_bare_lf_keeps_the_message():
    protocol = in_state(State.DATA, Limits(allow_bare_lf=True))
    protocol.receive_data(b"a\nb\r.\r\n.\r\n")
    events = drain(protocol)
    assert events[:2] == [MessageData(b"a\nb\r.\r\n"), MessageEnd(7)]


def test_eof_after_complete_commands_reads_them_first():
    protocol = in_state(State.READY)
    protocol.receive_data(b"NOOP\r\nRSET\r\nQUI")
    protocol.receive_data(b"")
    events = drain(protocol)
    assert [type(e) for e in events] == [Noop, Rset, type(CONNECTION_CLOSED)]
    assert protocol.next_event() is CONNECTION_CLOSED


def test_eof_with_nothing_buffered():
    protocol = SmtpProtocol()
    assert protocol.next_event() is NEED_DATA
    protocol.receive_data(b"")
    assert protocol.next_event() is CONNECTION_CLOSED


@pytest.mark.parametrize("sent, pieces", [
    (b"half a message\r\nno end in sight", [MessageData(b"half a message\r\n")]),
    (b"no end in sight", []),
    (b"almost\r\n.", [MessageData(b"almost\r\n")]),
])
def test_eof_in_data_never_ends_the_message(sent, pieces):
    # A message cut off by the client is not a message: no MessageEnd, so nothing
    # can be delivered (RFC 5321 4.1.1.4: only CRLF.CRLF ends it).
    protocol = in_state(State.DATA)
    protocol.receive_data(sent)
    protocol.receive_data(b"")
    events = []
    for _ in range(5):  # a socket at EOF keeps answering b""
        event = protocol.next_event()
        events.append(event)
        if event is CONNECTION_CLOSED:
            break
        if event is NEED_DATA:
            protocol.receive_data(b"")
    assert events[-1] is CONNECTION_CLOSED
    assert [e for e in events if isinstance(e, (MessageData, MessageEnd))] == pieces


def test_discard_input_forgets_pipelined_bytes():
    protocol = in_state(State.READY)
    protocol.receive_data(b"NOOP\r\nMAIL FROM:<injected@x.test>\r\n")
    assert isinstance(protocol.next_event(), Noop)
    protocol.send(OK)
    protocol.discard_input()
    assert protocol.next_event() is NEED_DATA


def test_replies_carry_enhanced_codes_except_354():
    protocol = in_state(State.RCPT)
    assert answer(protocol, b"DATA", reply(354, "2.0.0", "go ahead")) == b"354 go ahead\r\n"
    assert Canned.NESTED_MAIL.to_bytes() == b"503 5.5.1 Nested MAIL command\r\n"
