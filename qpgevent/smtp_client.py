"""The plugin API name of :mod:`qpgevent.backends.smtp_client`: the same module object, so plugins import
it as ``qpgevent.smtp_client`` whatever the layout."""
import sys

from .backends import smtp_client

sys.modules[__name__] = smtp_client
