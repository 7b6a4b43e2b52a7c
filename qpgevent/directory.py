"""The plugin API name of :mod:`qpgevent.backends.directory`: the same module object, so plugins import
it as ``qpgevent.directory`` whatever the layout."""
import sys

from .backends import directory

sys.modules[__name__] = directory
