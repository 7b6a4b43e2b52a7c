"""The plugin API name of :mod:`qpgevent.backends.outqueue`: the same module object, so plugins import
it as ``qpgevent.outqueue`` whatever the layout."""
import sys

from .backends import outqueue

sys.modules[__name__] = outqueue
