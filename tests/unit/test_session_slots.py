"""The session a hook gets is slotted: what a plugin keeps goes in notes (docs/writing-plugins.md)."""

import pytest

from qpgevent.testing import DEFAULT_PLUGINS, PluginHarness


def test_a_plugin_keeps_its_state_in_notes_not_on_the_session(tmp_path):
    session = PluginHarness(tmp_path, after=DEFAULT_PLUGINS).session()
    with pytest.raises(AttributeError):
        session.my_flag = True  # type: ignore[attr-defined]
    session.connection.notes["my_flag"] = True
    assert session.notes["my_flag"] is True
