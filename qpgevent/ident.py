"""The plugin API name of :mod:`qpgevent.backends.ident`: the same module object, so plugins import
it as ``qpgevent.ident`` whatever the layout."""
import sys

from .backends import ident

sys.modules[__name__] = ident
