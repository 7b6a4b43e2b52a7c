"""The plugin API name of :mod:`qpgevent.backends.scanner`: the same module object, so plugins import
it as ``qpgevent.scanner`` whatever the layout."""
import sys

from .backends import scanner

sys.modules[__name__] = scanner
