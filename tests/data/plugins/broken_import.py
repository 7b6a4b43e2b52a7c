"""broken_import: a test plugin whose import fails (for the loader's error message)."""

import qpgevent_no_such_module_anywhere  # noqa: F401

from qpgevent.plugin import Plugin


class BrokenImport(Plugin):
    pass
