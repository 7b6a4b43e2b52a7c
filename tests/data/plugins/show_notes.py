"""show_notes: a test plugin that answers HELP with the notes other plugins left.

``HELP name`` answers ``214 name=<repr>`` for the connection note ``name``;
``HELP txn:name`` for the transaction note (``None`` when unset). Lets a test read,
over SMTP, what a plugin under test noted (whitelist, karma ...).
"""

from qpgevent.plugin import OK, Plugin


class ShowNotes(Plugin):
    def hook_help(self, session, argument):
        name = argument.strip()
        if name.startswith("txn:"):
            transaction = session.current_transaction
            value = transaction.notes.get(name[4:]) if transaction is not None else None
        else:
            value = session.connection.notes.get(name)
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        return OK, f"{name}={value!r}"
