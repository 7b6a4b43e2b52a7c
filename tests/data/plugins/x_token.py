"""x_token: a test plugin that adds the SASL mechanism X-TOKEN (one response: ``user:token``).

``alice:s3cret`` authenticates as alice; anything else is refused (535). Used by
``tests/plugins/test_extensions.py``.
"""

from qpgevent.plugin import DENY, OK, Plugin

TOKENS = {"alice": b"s3cret"}


class XToken(Plugin):
    sasl_mechanisms = ("X-TOKEN",)

    def hook_auth_sasl(self, session, mechanism, response):
        user, _, token = response.partition(b":")
        name = user.decode("utf-8", "replace")
        if mechanism == "X-TOKEN" and TOKENS.get(name) == token:
            return OK, name
        return DENY
