"""The shortcuts of the per-message path give what the long way gives (docs/benchmarks.md,
"Round two: CPU per message").

Each shortcut skips work most sessions do not need; these tests hold it to the result of
the work it skips: the Received comment's cleaning against its character-by-character
definition on random text, the scoreboard's "doing" made from the event only when it is
read, a hook no plugin implements answered without running the chain, and the protocol
limits made once per settings.
"""

from __future__ import annotations

import dataclasses
import random

from qpgevent.config import load
from qpgevent.connection import Connection
from qpgevent.core.address import Address
from qpgevent.core.codes import DECLINED_VERDICT, OK
from qpgevent.core.events import Auth, Mail, MessageData
from qpgevent.engine.conversation import Conversation, limits_of
from qpgevent.engine.hooks import HOOKS, HookRunner
from qpgevent.engine.loader import load_plugins
from qpgevent.engine.memory import InMemory
from qpgevent.engine.received import printable
from qpgevent.engine.session import describe
from qpgevent.testing import write_ini

ALPHABET = "ab.-_ ()[]\t\n\r\x00\x7f\u00e9\u200b\u2028\U0001F600xyz09"


def printable_by_definition(text: str) -> str:
    return "".join(c if c.isprintable() and c not in "()[]" else "?" for c in text)[:255]


def test_printable_is_its_definition_on_random_text():
    rnd = random.Random(20)
    for number in range(20000):
        length = rnd.randint(0, 300) if number % 50 == 0 else rnd.randint(0, 20)
        text = "".join(rnd.choice(ALPHABET) for _ in range(length))
        assert printable(text) == printable_by_definition(text), repr(text)


def conversation(tmp_path, plugins: str = "[[rcpt_ok]]\n  domains = example.test\n[[queue/discard]]\n"):
    settings = load(str(write_ini(tmp_path, plugins)))
    runner = HookRunner(load_plugins(settings), settings.plugin_timeout)
    return Conversation(Connection("127.0.0.1", 40000, "127.0.0.1", 25), runner, settings), settings


def test_the_board_describes_the_event_in_progress_when_it_is_read(tmp_path):
    talk, _ = conversation(tmp_path)
    peer = InMemory(talk)
    assert talk.status()["doing"] == "connect"
    peer.open()
    peer.send(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
    assert talk.status()["doing"] == "waiting"
    for event, shown in ((Mail("MAIL", "FROM:<a@b>", "MAIL FROM:<a@b>", path="<a@b>"), "MAIL"),
                         (Auth("AUTH", "PLAIN c2VjcmV0", "AUTH PLAIN c2VjcmV0", mechanism="PLAIN"), "AUTH"),
                         (MessageData(b"Subject: x\r\n"), "DATA (receiving)")):
        talk.tally.doing = event  # as next_request leaves it while a hook runs
        assert talk.status()["doing"] == shown == describe(event)
    assert "c2VjcmV0" not in str(talk.status())


def test_a_hook_without_plugins_is_declined_without_running_anything(tmp_path):
    talk, _ = conversation(tmp_path)
    runner = talk.runner
    seen = []

    class Watcher:
        def hook_started(self, hook, plugin, session):
            seen.append(hook)

        def hook_finished(self, hook, plugin, session, verdict, seconds):
            pass

    runner.observe(Watcher())
    for hook, spec in HOOKS.items():
        if not runner.has(hook) and spec.session:
            assert runner.run(hook, talk.session, *([None] * len(spec.args))) is DECLINED_VERDICT
            runner.notify(hook, talk.session, *([None] * len(spec.args)))
    assert seen == []
    recipient = Address.parse("<bob@example.test>")
    assert runner.run("rcpt", talk.session, recipient, {}).code is OK and seen == ["rcpt"]  # rcpt_ok's


def test_limits_are_made_once_per_settings_and_follow_new_ones(tmp_path):
    _, settings = conversation(tmp_path)
    first = limits_of(settings)
    assert limits_of(settings) is first
    assert (first.max_command_line, first.max_recipients, first.nul_bytes) == (
        settings.max_command_line, settings.max_recipients, settings.nul_bytes)
    changed = dataclasses.replace(settings, max_recipients=settings.max_recipients + 7)
    assert limits_of(changed).max_recipients == settings.max_recipients + 7
    assert limits_of(settings) == first and limits_of(settings) is not first


def test_a_hook_no_plugin_decided_is_answered_as_the_table_says():
    # ask's shortcut (the answer made once per hook) against answer() on the long way, for
    # every hook, with the fields a caller may give.
    from qpgevent.core.reply import answer
    from qpgevent.engine.conversation import _DECLINED
    for hook in HOOKS:
        long_way = answer(hook, DECLINED_VERDICT, me="mx.example.test", address="<a@b.test>")
        settled = _DECLINED.get(hook)
        if settled is None:  # its text has fields to fill in: always the long way
            assert long_way.reply is not None and "{" not in str(long_way.reply.text), hook
            continue
        assert (settled.outcome, settled.reply, settled.verdict) == (long_way.outcome, long_way.reply,
                                                                      DECLINED_VERDICT), hook
    assert {"pre_connection", "connect", "helo", "data", "data_post", "queue_pre", "queue"} <= _DECLINED.keys()
    assert not {"mail", "quit"} & _DECLINED.keys()  # "{address}", "{me}"
