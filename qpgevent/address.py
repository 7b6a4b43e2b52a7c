"""The plugin API name of :mod:`qpgevent.core.address`: the same module object, so plugins import it
as ``qpgevent.address`` whatever the layout."""
import sys

from .core import address

sys.modules[__name__] = address
