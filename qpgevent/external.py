"""The plugin API name of :mod:`qpgevent.backends.external`: the same module object, so plugins import
it as ``qpgevent.external`` whatever the layout."""
import sys

from .backends import external

sys.modules[__name__] = external
