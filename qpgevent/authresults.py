"""The plugin API name of :mod:`qpgevent.core.authresults`: the same module object, so plugins import it
as ``qpgevent.authresults`` whatever the layout."""
import sys

from .core import authresults

sys.modules[__name__] = authresults
