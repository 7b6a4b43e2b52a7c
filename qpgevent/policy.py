"""The plugin API name of :mod:`qpgevent.backends.policy`: the same module object, so plugins import
it as ``qpgevent.policy`` whatever the layout."""
import sys

from .backends import policy

sys.modules[__name__] = policy
