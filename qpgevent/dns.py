"""The plugin API name of :mod:`qpgevent.backends.dns`: the same module object, so plugins import
it as ``qpgevent.dns`` whatever the layout."""
import sys

from .backends import dns

sys.modules[__name__] = dns
