"""The typed face of the plugin API: every hook's signature, as the docs show it, is typed.

``HookSpec.signature`` is what ``docs/hooks.md`` prints; a hook argument without a type in
``ARGUMENT_TYPES`` (or typed ``Any``) would leave plugin authors guessing.
"""

from __future__ import annotations

import typing

import pytest

from qpgevent import session as session_api
from qpgevent.engine.hooks import ARGUMENT_TYPES, HOOKS


@pytest.mark.parametrize("name", list(HOOKS))
def test_every_hook_signature_is_typed(name: str) -> None:
    spec = HOOKS[name]
    assert all(argument in ARGUMENT_TYPES for argument in spec.parameters())
    signature = spec.signature()
    assert "Any" not in signature and signature.endswith("-> HookResult")
    assert signature.startswith(f"hook_{name}(self")


def test_the_types_the_signatures_name_are_importable_by_plugins() -> None:
    # Session and HookResult come from qpgevent.session (a plugin API name).
    assert session_api.Session.__name__ == "Session"
    assert session_api.HookResult is not None
    hints = typing.get_type_hints(session_api.Session.respond)
    assert hints["code"] is int and hints["return"] is type(None)
    assert "Any" not in " ".join(ARGUMENT_TYPES.values())
