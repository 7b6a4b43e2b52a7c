"""The plugin API name of :mod:`qpgevent.core.policy_protocol`: the same module object, so plugins import
it as ``qpgevent.policy_protocol`` whatever the layout."""
import sys

from .core import policy_protocol

sys.modules[__name__] = policy_protocol
