"""The plugin API name of :mod:`qpgevent.backends.tls_policy`: the same module object, so plugins import
it as ``qpgevent.tls_policy`` whatever the layout."""
import sys

from .backends import tls_policy

sys.modules[__name__] = tls_policy
