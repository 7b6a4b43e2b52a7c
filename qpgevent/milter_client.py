"""The plugin API name of :mod:`qpgevent.backends.milter_client`: the same module object, so plugins import
it as ``qpgevent.milter_client`` whatever the layout."""
import sys

from .backends import milter_client

sys.modules[__name__] = milter_client
