"""directory_lists: a test plugin that answers VRFY and EXPN from a small fixed directory.

``VRFY bob`` is 250 (a verified mailbox), ``VRFY nobody`` 550 (known not to exist), anything
else left to the core (252). ``EXPN staff`` lists its two members, one a line (250);
``EXPN nobody`` is 550; other names are left to the core (502). It declares HELP texts for
its verb ``XLISTS``, which lists the lists. Used by ``tests/plugins/test_help_verbs.py`` and
``tests/e2e/test_help_vrfy_expn_smtplib.py``.
"""

from qpgevent.plugin import DECLINED, DENY, OK, Plugin

MAILBOXES = {"bob": "Bob Example <bob@example.test>"}
LISTS = {"staff": ("Alice Example <alice@example.test>", "Bob Example <bob@example.test>")}


class DirectoryLists(Plugin):
    verbs = ("XLISTS",)
    help_texts = {"XLISTS": "XLISTS: name the mailing lists EXPN knows"}

    def hook_vrfy(self, session, argument):
        if argument in MAILBOXES:
            return OK, MAILBOXES[argument]
        if argument == "nobody":
            return DENY, "5.1.1 No such user here"
        return DECLINED

    def hook_expn(self, session, argument):
        if argument in LISTS:
            return OK, list(LISTS[argument])
        if argument == "nobody":
            return DENY
        return DECLINED

    def hook_command(self, session, verb, argument):
        if verb != "XLISTS":
            return DECLINED
        return OK, " ".join(sorted(LISTS))
