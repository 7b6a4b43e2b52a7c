"""rcpt_map reads its map as Postfix reads one: comments, continuation lines, an ``@domain`` catch-all."""

from __future__ import annotations

import pytest

from qpgevent.core.errors import PluginLoadError

from policy_helpers import ACCEPT, rcpt, section

MAP = """# example.org, written as for postmap
me@example.org   OK          # a comment after an entry
moved@example.org DENY 5.1.6 This mailbox has moved;
    write to the new address
\tgiven on our web site
@example.org     DENYSOFT Mailbox not ready, try later
"""


@pytest.fixture
def server(make_server, tmp_path):
    (tmp_path / "map").write_text(MAP)
    return make_server(section("rcpt_map", domain="example.org", file="map") + ACCEPT)


@pytest.mark.parametrize("recipient, reply", [
    ("me@example.org", (250, b"2.1.5 <me@example.org>, recipient ok")),
    ("moved@example.org", (550, b"5.1.6 This mailbox has moved; write to the new address given on our web site")),
    ("anyone@example.org", (450, b"4.7.1 Mailbox not ready, try later")),  # the catch-all, not default
    ("bob@example.test", (250, b"2.1.5 <bob@example.test>, recipient ok")),  # other domains: rcpt_ok
])
def test_postfix_style_map(server, recipient, reply):
    assert rcpt(server, recipient) == reply


def test_catch_all_for_another_domain_is_an_error(make_server, tmp_path):
    (tmp_path / "map").write_text("me@example.org OK\n@example.net OK\n")
    with pytest.raises(PluginLoadError, match="this map is for example.org"):
        make_server(section("rcpt_map", domain="example.org", file="map") + ACCEPT)
