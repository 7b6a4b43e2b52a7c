"""show_notes: a test plugin that answers HELP with the notes and results other plugins left.

``HELP name`` answers ``214 name=<repr>`` for the connection note ``name``;
``HELP txn:name`` for the transaction note (``None`` when unset);
``HELP result:plugin:key`` for the evidence ``key`` of ``plugin``'s result, in the
transaction's results, else the connection's. Lets a test read, over SMTP, what a
plugin under test recorded (whitelist, karma, a deferred refusal...).
"""

from qpgevent.plugin import OK, Plugin


class ShowNotes(Plugin):
    def hook_help(self, session, argument):
        name = argument.strip()
        transaction = session.current_transaction
        if name.startswith("result:"):
            plugin, key = name[len("result:"):].rsplit(":", 1)
            value = None
            for results in ([transaction.results] if transaction is not None else []) + [session.connection.results]:
                found = results.get(plugin)
                if found is not None and key in found.evidence:
                    value = found[key]
                    break
        elif name.startswith("txn:"):
            value = transaction.notes.get(name[4:]) if transaction is not None else None
        else:
            value = session.connection.notes.get(name)
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        return OK, f"{name}={value!r}"
