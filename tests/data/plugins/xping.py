"""xping: a test plugin that adds a verb, an EHLO keyword and a MAIL parameter.

``XPING [words]`` answers ``250 pong [words]`` (the command hook); EHLO offers ``XPING``;
``MAIL FROM:<...> XPRIO=<digit>`` is taken (any other XPRIO value is a syntax error, 501)
and the digit ends up in the delivered message as an ``X-Prio`` header (data_post).
Used by ``tests/e2e/test_extension_points.py``.
"""

from qpgevent.plugin import DECLINED, OK, Plugin


class Xping(Plugin):
    ehlo_keywords = ("XPING",)
    verbs = ("XPING",)
    mail_parameters = {"XPRIO": r"[0-9]"}

    def hook_command(self, session, verb, argument):
        if verb != "XPING":
            return DECLINED
        return OK, f"pong {argument}".strip()

    def hook_mail(self, session, sender, params):
        if "XPRIO" in params:
            session.transaction.notes["xprio"] = params["XPRIO"]
        return DECLINED

    def hook_data_post(self, session):
        priority = session.transaction.notes.get("xprio")
        if priority is not None:
            session.transaction.headers.add("X-Prio", priority)
        return DECLINED
