"""Every cell of the one reply table, walked through ``answer()``, and Reply's wire format.

The table maps (hook, return code) to what the session does and says. These tests do
not restate the table cell by cell; they check the properties every cell must have
(the reply class follows the return code, closing 4xx is 421, every reply has words and
an enhanced code of its class, plugin words and enhanced codes are honoured) and that
the table covers exactly the hooks that answer the client.
"""

from __future__ import annotations

import re

import pytest

from qpgevent.codes import DECLINED_VERDICT, DENY_DISCONNECT, ReturnCode, Verdict
from qpgevent.engine.hooks import HOOKS, HookRunner
from qpgevent.plugin import Plugin
from qpgevent.core.reply import INTERNAL_ERROR, REPLY_TABLE, Answer, Canned, Outcome, Reply, answer, reply

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
CELLS = [(hook, code) for hook in REPLY_TABLE for code in ReturnCode]
DECIDING = [code for code in ReturnCode if code is not ReturnCode.DONE]
DENIALS = [code for code in ReturnCode if code.is_deny]
NOTIFY_HOOKS = [name for name, spec in HOOKS.items() if name not in REPLY_TABLE]
FIELDS = {"address": "<someone@example.test>", "me": "mx.example.test"}
#: Passes that are refusals all the same: at rcpt someone must say OK before we take mail
#: for a recipient; at queue nobody took the message; at unrecognized_command nobody
#: handled the verb (a plugin that does returns DONE).
REFUSING_PASSES = {("rcpt", ReturnCode.DECLINED), ("queue", ReturnCode.DECLINED),
                   ("unrecognized_command", ReturnCode.DECLINED), ("unrecognized_command", ReturnCode.OK),
                   # a verb a plugin declared, which no plugin answered: not implemented (502)
                   ("command", ReturnCode.DECLINED),
                   # EXPN that no plugin expands: not implemented (502; RFC 5321 4.5.1 makes it optional)
                   ("expn", ReturnCode.DECLINED),
                   # AUTH: no backend said yes, so the credentials are refused (RFC 4954 6: 535).
                   *((hook, ReturnCode.DECLINED) for hook in ("auth", "auth_plain", "auth_login", "auth_cram_md5", "auth_sasl"))}
#: Hooks where the session is over whatever the verdict.
ALWAYS_CLOSE = {"pre_connection", "connect", "quit"}


def cell_id(value: object) -> str:
    return value.name if isinstance(value, ReturnCode) else str(value)


def klass(code: int) -> int:
    return code // 100


# --- the table covers the right hooks -----------------------------------------


def test_every_hook_in_the_table_is_a_known_hook() -> None:
    assert set(REPLY_TABLE) - set(HOOKS) == set()


def test_every_fired_hook_that_is_not_a_notification_is_in_the_table() -> None:
    answering = {name for name, spec in HOOKS.items() if spec.fired and not spec.notify}
    assert answering - set(REPLY_TABLE) == set()


def test_no_notification_hook_is_in_the_table() -> None:
    notifications = {name for name, spec in HOOKS.items() if spec.notify}
    assert notifications & set(REPLY_TABLE) == set()


@pytest.mark.parametrize("hook", list(REPLY_TABLE))
def test_every_hook_has_a_rule_for_every_deciding_code(hook: str) -> None:
    assert set(REPLY_TABLE[hook]) == set(DECIDING)


# --- every cell, without a plugin message ------------------------------------


@pytest.mark.parametrize("hook,code", CELLS, ids=cell_id)
def test_cell_reply_class_follows_the_return_code(hook: str, code: ReturnCode) -> None:
    result = answer(hook, Verdict(code), **FIELDS)
    if code is ReturnCode.DONE:
        # DONE at a hook that answers: the plugin has replied itself, we say nothing.
        assert result == answer(hook, Verdict(code)) and result.outcome is Outcome.ANSWERED
        assert result.reply is None
        return
    rule = REPLY_TABLE[hook][code]
    if rule.code == 0:
        assert code in (ReturnCode.OK, ReturnCode.DECLINED), "only a pass may be silent"
        assert result.outcome is Outcome.PROCEED and result.reply is None
        return
    sent = result.reply
    assert sent is not None
    assert sent.close == (result.outcome is Outcome.CLOSE)
    if hook == "quit":
        # RFC 5321 4.1.1.10: QUIT is answered 221 and the session ends, whatever plugins say.
        assert (sent.code, sent.close) == (221, True)
        return
    if code is ReturnCode.DENY:
        assert klass(sent.code) == 5
        assert sent.close == (hook in ALWAYS_CLOSE)
    elif code is ReturnCode.DENYSOFT:
        assert klass(sent.code) == 4
        assert sent.close == (hook in ALWAYS_CLOSE)
        if sent.close:
            assert sent.code == 421  # RFC 5321 3.8: the only 4xx after which we may close
    elif code is ReturnCode.DENY_DISCONNECT:
        assert klass(sent.code) == 5 and sent.close and result.outcome is Outcome.CLOSE
    elif code is ReturnCode.DENYSOFT_DISCONNECT:
        assert sent.code == 421 and sent.close and result.outcome is Outcome.CLOSE
    elif (hook, code) in REFUSING_PASSES:
        assert klass(sent.code) in (4, 5) and result.outcome is Outcome.REFUSE and not sent.close
    else:  # OK or DECLINED: the command succeeds
        assert klass(sent.code) in (2, 3) and result.outcome is Outcome.PROCEED and not sent.close


@pytest.mark.parametrize("hook,code", [c for c in CELLS if c[1] is not ReturnCode.DONE], ids=cell_id)
def test_cell_has_default_text_and_an_enhanced_code_of_its_class(hook: str, code: ReturnCode) -> None:
    result = answer(hook, Verdict(code), **FIELDS)
    if result.reply is None:
        return  # a silent pass: the session sends the command's own success reply
    sent = result.reply
    assert sent.text and all(line.strip() for line in sent.text)
    assert not any("{" in line for line in sent.text), "every template field is filled in"
    if sent.code == 354:
        # RFC 2034 3: enhanced codes go on 2xx, 4xx and 5xx only.
        assert sent.enhanced is None
        return
    assert sent.enhanced is not None and ENHANCED.match(sent.enhanced), sent
    assert sent.enhanced[0] == str(sent.code)[0], sent


@pytest.mark.parametrize("hook,code", [c for c in CELLS if c[1] in DENIALS], ids=cell_id)
def test_every_denial_refuses_or_closes(hook: str, code: ReturnCode) -> None:
    result = answer(hook, Verdict(code))
    if hook == "quit":
        assert result.outcome is Outcome.CLOSE
    elif code.disconnects or hook in ALWAYS_CLOSE:
        assert result.outcome is Outcome.CLOSE
    else:
        assert result.outcome is Outcome.REFUSE


def test_fields_are_filled_in_and_unknown_fields_stay_visible() -> None:
    denied = answer("mail", Verdict(ReturnCode.DENY), address="<spammer@bad.test>").reply
    assert denied is not None and denied.text == ("<spammer@bad.test>, denied",)
    bye = answer("quit", Verdict(ReturnCode.DECLINED), me="mx.example.test").reply
    assert bye is not None and bye.text[0].startswith("mx.example.test ")
    unfilled = answer("mail", Verdict(ReturnCode.DENYSOFT)).reply
    assert unfilled is not None and unfilled.text == ("{address}, temporarily denied",)


# --- a plugin's message --------------------------------------------------------


@pytest.mark.parametrize("hook,code", [c for c in CELLS if c[1] is not ReturnCode.DONE], ids=cell_id)
def test_plugin_message_replaces_the_default_text(hook: str, code: ReturnCode) -> None:
    default = answer(hook, Verdict(code), **FIELDS)
    mine = answer(hook, Verdict(code, ("words of the plugin",), "test"), **FIELDS)
    assert mine.outcome is default.outcome
    if default.reply is None:
        assert mine.reply is None  # a silent pass stays silent: the words have no reply to go in
        return
    assert mine.reply is not None
    assert mine.reply.text == ("words of the plugin",)
    assert (mine.reply.code, mine.reply.enhanced, mine.reply.close) == (
        default.reply.code, default.reply.enhanced, default.reply.close)


@pytest.mark.parametrize("hook,code", [c for c in CELLS if c[1] is not ReturnCode.DONE], ids=cell_id)
def test_leading_enhanced_code_in_the_message(hook: str, code: ReturnCode) -> None:
    default = answer(hook, Verdict(code)).reply
    if default is None:
        return
    for digit in "245":
        result = answer(hook, Verdict(code, (f"{digit}.1.1 no such user", "second line")))
        sent = result.reply
        assert sent is not None
        reply_class = str(default.code)[0]
        if default.enhanced is not None and (reply_class == digit or {reply_class, digit} <= {"4", "5"}):
            # Taken, with its class made to agree with the reply (RFC 3463 2).
            assert sent.enhanced == f"{reply_class}.1.1"
            assert sent.text == ("no such user", "second line")
        else:
            # A code of another class (or on a reply without one) is just words.
            assert sent.enhanced == default.enhanced
            assert sent.text == (f"{digit}.1.1 no such user", "second line")


def test_enhanced_code_alone_is_taken_and_leaves_an_empty_line() -> None:
    sent = answer("rcpt", Verdict(ReturnCode.DENY, ("5.1.1",))).reply
    assert sent is not None and (sent.enhanced, sent.text) == ("5.1.1", ("",))


def test_enhanced_code_lookalikes_are_not_taken() -> None:
    for text in ("5.1.1x no", "5.1 no", "5.1.1234 no", "3.1.1 no", " 5.1.1 no"):
        sent = answer("rcpt", Verdict(ReturnCode.DENY, (text,))).reply
        assert sent is not None and sent.enhanced == "5.7.1" and sent.text == (text,), text


def test_enhanced_code_only_counts_on_the_first_line() -> None:
    sent = answer("rcpt", Verdict(ReturnCode.DENY, ("no such user", "5.1.1 here"))).reply
    assert sent is not None and sent.enhanced == "5.7.1"
    assert sent.text == ("no such user", "5.1.1 here")


def test_multi_line_message_elements_and_newlines_become_lines() -> None:
    sent = answer("mail", Verdict(ReturnCode.DENY, ("one\ntwo", "three\r\nfour\r"))).reply
    assert sent is not None
    assert sent.text == ("one", "two", "three", "four")
    assert sent.to_bytes() == (b"550-5.7.1 one\r\n550-5.7.1 two\r\n"
                               b"550-5.7.1 three\r\n550 5.7.1 four\r\n")


# --- internal errors, DONE, notifications ----------------------------------------


@pytest.mark.parametrize("hook,code", CELLS, ids=cell_id)
def test_internal_error_is_451_whatever_the_code(hook: str, code: ReturnCode) -> None:
    result = answer(hook, Verdict(code, ("plugin error",), "broken", internal_error=True), **FIELDS)
    sent = result.reply
    assert sent is not None
    if hook == "quit":
        # Saying goodbye cannot fail: the normal 221, and the session ends.
        assert (sent.code, sent.close) == (221, True)
        assert sent == answer("quit", Verdict(ReturnCode.DECLINED), **FIELDS).reply
    elif hook in ("pre_connection", "connect"):
        # Nothing has been said yet and nothing sensible can follow: 421 and close.
        assert result.outcome is Outcome.CLOSE
        assert (sent.code, sent.enhanced, sent.close) == (421, "4.3.0", True)
        assert sent.text == INTERNAL_ERROR.text
    else:
        assert result.outcome is Outcome.REFUSE
        assert sent == INTERNAL_ERROR
        assert (sent.code, sent.enhanced, sent.close) == (451, "4.3.0", False)
    assert "plugin error" not in " ".join(sent.text), "the client never sees the plugin's failure text"


def test_internal_error_bytes() -> None:
    assert answer("mail", Verdict(internal_error=True)).reply.to_bytes() == (  # type: ignore[union-attr]
        b"451 4.3.0 Internal error, try again later\r\n")


@pytest.mark.parametrize("hook", NOTIFY_HOOKS)
@pytest.mark.parametrize("code", list(ReturnCode), ids=cell_id)
def test_hooks_outside_the_table_only_proceed(hook: str, code: ReturnCode) -> None:
    result = answer(hook, Verdict(code, ("text",), "plugin"))
    assert result.outcome is Outcome.PROCEED and result.reply is None


class _Failing(Plugin):
    def hook_disconnect(self, session):
        raise RuntimeError("boom")

    def hook_deny(self, session, verdict):
        return DENY_DISCONNECT, "ignored"


@pytest.mark.parametrize("hook,args", [("disconnect", ()), ("deny", (Verdict(ReturnCode.DENY),))])
def test_notification_failures_never_become_a_reply(hook: str, args: tuple) -> None:
    # The runner never hands answer() an internal error for a notification hook: a
    # notification plugin that raises, or that returns a denial, is logged and ignored.
    runner = HookRunner([_Failing("failing", {})], default_timeout=1.0)
    verdict = runner.run(hook, None, *args)
    assert verdict == DECLINED_VERDICT
    assert answer(hook, verdict) == Answer(Outcome.PROCEED, None)


# --- Reply on the wire ---------------------------------------------------------


def test_single_line_reply_bytes() -> None:
    assert Reply(250, ("OK",), "2.0.0").to_bytes() == b"250 2.0.0 OK\r\n"
    assert Reply(250, ("OK",), "2.0.0").to_bytes(enhanced_codes=False) == b"250 OK\r\n"


def test_multi_line_reply_uses_dash_then_space() -> None:
    sent = Reply(250, ("mx.example.test Hi", "PIPELINING", "8BITMIME"), "2.0.0")
    assert sent.to_bytes() == (b"250-2.0.0 mx.example.test Hi\r\n"
                               b"250-2.0.0 PIPELINING\r\n"
                               b"250 2.0.0 8BITMIME\r\n")
    assert sent.to_bytes(enhanced_codes=False) == (b"250-mx.example.test Hi\r\n"
                                                   b"250-PIPELINING\r\n250 8BITMIME\r\n")


def test_enhanced_code_only_on_2xx_4xx_5xx() -> None:
    assert Reply(354, ("go ahead",), "2.0.0").to_bytes() == b"354 go ahead\r\n"
    assert Reply(421, ("bye",), "4.3.2").to_bytes() == b"421 4.3.2 bye\r\n"


def test_empty_text_is_still_one_line() -> None:
    assert Reply(250, (), "2.0.0").to_bytes() == b"250 2.0.0 \r\n"
    assert reply(250, None) == Reply(250, ("",), None)


def test_utf8_text_is_sent_as_utf8() -> None:
    assert Reply(250, ("José",)).to_bytes() == "250 José\r\n".encode()


@pytest.mark.parametrize("char", [chr(c) for c in [*range(0x20), 0x7F]], ids=lambda c: f"{ord(c):#04x}")
def test_control_characters_cannot_break_the_line(char: str) -> None:
    data = Reply(550, (f"evil{char}250 2.0.0 injected", "next"), "5.7.1").to_bytes()
    lines = data.split(b"\r\n")
    assert lines[-1] == b""
    assert len(lines) == 3, data
    assert lines[0].startswith(b"550-5.7.1 evil") and lines[1].startswith(b"550 5.7.1 next")
    body = data.replace(b"\r\n", b"")
    assert not any(b < 0x20 or b == 0x7F for b in body), data


@pytest.mark.parametrize("char", ["\n", "\r", "\x00", "\x7f"], ids=lambda c: f"{ord(c):#04x}")
def test_control_characters_are_replaced_in_every_line_however_often_it_is_sent(char: str) -> None:
    # The later lines of a reply are encoded once and kept (EHLO's keywords): the kept bytes
    # are cleaned as the first were, and a reply with other lines gets its own.
    tail = (f"KEYWORD{char}250 injected", "LAST")
    for first in ("mx Hi there", f"mx Hi{char}250 forged", "mx Hi there"):
        data = Reply(250, (first, *tail), "2.0.0").to_bytes()
        assert data.count(b"\r\n") == 3 and data.endswith(b"250 2.0.0 LAST\r\n"), data
        assert b"250-2.0.0 KEYWORD?250 injected\r\n" in data
        assert not any(b < 0x20 or b == 0x7F for b in data.replace(b"\r\n", b"")), data
    assert Reply(250, ("mx", "OTHER", "LAST"), "2.0.0").to_bytes() == (
        b"250-2.0.0 mx\r\n250-2.0.0 OTHER\r\n250 2.0.0 LAST\r\n")
    assert Reply(451, ("mx", *tail), "4.3.0").to_bytes().startswith(b"451-4.3.0 mx\r\n451-4.3.0 KEYWORD?")


def test_a_reply_sent_again_gives_the_same_bytes_each_way() -> None:
    # Its bytes are kept once made: asking without enhanced codes must not get the kept ones.
    for sent in (Canned.OK, Reply(250, ("mx Hi", "PIPELINING"), "2.0.0"), Reply(220, ("mx ready",))):
        with_codes, without = sent.to_bytes(), sent.to_bytes(enhanced_codes=False)
        assert sent.to_bytes() == with_codes and sent.to_bytes(enhanced_codes=False) == without
        assert (with_codes == without) == (sent.enhanced is None)
    assert Canned.OK.to_bytes() == b"250 2.0.0 OK\r\n" and Canned.OK.to_bytes(False) == b"250 OK\r\n"
    fresh = Reply(250, ("OK",), "2.0.0")
    assert fresh == Canned.OK and hash(fresh) == hash(Canned.OK)  # the kept bytes are no part of the value
    assert repr(fresh) == "Reply(code=250, text=('OK',), enhanced='2.0.0', close=False)"


def test_plugin_newlines_become_lines_that_each_carry_the_code() -> None:
    # A plugin (or an attacker-controlled string it echoes) cannot forge a reply of its own.
    sent = answer("rcpt", Verdict(ReturnCode.DENY, ("no\r\n250 2.1.5 ok, relaying",))).reply
    assert sent is not None
    for line in sent.to_bytes().split(b"\r\n")[:-1]:
        assert line.startswith((b"550-", b"550 ")), line


# --- the core's own replies -------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in vars(Canned) if n.isupper()])
def test_canned_replies_have_words_and_an_enhanced_code_of_their_class(name: str) -> None:
    sent = getattr(Canned, name)
    assert isinstance(sent, Reply) and sent.text and sent.text[0]
    if sent.code == 354:
        assert sent.enhanced is None
    else:
        assert sent.enhanced is not None and ENHANCED.match(sent.enhanced)
        assert sent.enhanced[0] == str(sent.code)[0]
    assert sent.close == (sent.code == 421)


@pytest.mark.parametrize("hook,code", [c for c in CELLS if c[1] is not ReturnCode.DONE], ids=cell_id)
def test_leading_reply_code_in_the_message(hook: str, code: ReturnCode) -> None:
    """A plugin may choose its failure code inside the class the verdict fixed."""
    default = answer(hook, Verdict(code)).reply
    if default is None:
        return
    for wanted in (452, 421, 553, 250, 299):
        sent = answer(hook, Verdict(code, (f"{wanted} 4.5.3 words",))).reply
        assert sent is not None
        failure = default.code // 100 in (4, 5) and wanted // 100 in (4, 5)
        if failure and wanted // 100 == default.code // 100 and (wanted != 421 or default.close):
            assert sent.code == wanted and sent.text == ("words",)
        elif failure:
            # The other failure class: the verdict's code stands, the plugin's is dropped.
            assert sent.code == default.code and sent.text == ("words",)
        else:
            assert sent.code == default.code
            assert sent.text[0].startswith(f"{wanted} ")
        assert sent.close == default.close  # the verdict, never the words, decides closing


def test_too_many_recipients_can_say_452() -> None:
    sent = answer("rcpt", Verdict(ReturnCode.DENYSOFT, ("452 4.5.3 Too many recipients",))).reply
    assert sent is not None and (sent.code, sent.enhanced, sent.text) == (452, "4.5.3", ("Too many recipients",))
