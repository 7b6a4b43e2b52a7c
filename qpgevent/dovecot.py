"""The plugin API name of :mod:`qpgevent.backends.dovecot`: the same module object, so plugins import
it as ``qpgevent.dovecot`` whatever the layout."""
import sys

from .backends import dovecot

sys.modules[__name__] = dovecot
