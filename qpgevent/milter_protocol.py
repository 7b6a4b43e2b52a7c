"""The plugin API name of :mod:`qpgevent.core.milter_protocol`: the same module object, so plugins import
it as ``qpgevent.milter_protocol`` whatever the layout."""
import sys

from .core import milter_protocol

sys.modules[__name__] = milter_protocol
