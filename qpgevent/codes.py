"""The plugin API name of :mod:`qpgevent.core.codes`: the same module object, so plugins import it
as ``qpgevent.codes`` whatever the layout."""
import sys

from .core import codes

sys.modules[__name__] = codes
