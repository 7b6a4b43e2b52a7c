"""The plugin API name of :mod:`qpgevent.backends.maildir`: the same module object, so plugins import
it as ``qpgevent.maildir`` whatever the layout."""
import sys

from .backends import maildir

sys.modules[__name__] = maildir
