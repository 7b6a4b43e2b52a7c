"""The plugin API name of :mod:`qpgevent.backends.disk`: the same module object, so plugins import
it as ``qpgevent.disk`` whatever the layout."""
import sys

from .backends import disk

sys.modules[__name__] = disk
