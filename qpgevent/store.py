"""The plugin API name of :mod:`qpgevent.backends.store`: the same module object, so plugins import
it as ``qpgevent.store`` whatever the layout."""
import sys

from .backends import store

sys.modules[__name__] = store
