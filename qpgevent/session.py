"""The plugin API name of :mod:`qpgevent.engine.session`: ``Session`` (the object every hook
gets) and ``HookResult`` (what a hook returns), for plugins' type annotations."""
import sys

from .engine import session

sys.modules[__name__] = session
