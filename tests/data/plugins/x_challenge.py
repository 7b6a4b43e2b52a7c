"""x_challenge: a test plugin with SASL mechanisms of several steps (session.challenge).

X-ECHO: the client names itself (initial response, or the answer to ``who?``), the
plugin challenges with ``nonce:<name>``, and the client must answer it reversed.
X-NEVER challenges for ever (the engine bounds the steps). Used by
``tests/plugins/test_extensions.py``.
"""

from qpgevent.plugin import DENY, OK, Plugin


class XChallenge(Plugin):
    sasl_mechanisms = ("X-ECHO", "X-NEVER")
    sasl_first_challenge = True  # no initial response: asked with None, says "who?"

    def hook_auth_sasl(self, session, mechanism, response):
        if session.auth_step == 0:
            session.notes.pop("x_echo", None)
        if mechanism == "X-NEVER":
            return session.challenge(b"again")
        if response is None:
            return session.challenge(b"who?")
        if "x_echo" not in session.notes:
            session.notes["x_echo"] = response.decode()
            return session.challenge(b"nonce:" + response)
        user = session.notes.pop("x_echo")
        return (OK, user) if response == (b"nonce:" + user.encode())[::-1] else DENY
