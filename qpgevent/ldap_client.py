"""The plugin API name of :mod:`qpgevent.backends.ldap_client`: the same module object, so plugins import
it as ``qpgevent.ldap_client`` whatever the layout."""
import sys

from .backends import ldap_client

sys.modules[__name__] = ldap_client
