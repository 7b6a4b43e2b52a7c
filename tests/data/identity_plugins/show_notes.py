"""show_notes: a test plugin that tells the client what the connection knows, at MAIL.

Answers MAIL with ``451 notes: key=value ...`` for the connection note names in
``keys`` (``result:plugin:key``: that evidence of ``plugin``'s connection result;
``result:plugin``: its outcome, such as ``pass:fcrdns``), then ``remote_host`` and
``remote_info``: how a test over a real socket reads what plugins and the core wrote
down about the connection.

Options:
  keys  connection note names, or results (default none)
"""

from qpgevent.plugin import DENYSOFT, Plugin


class ShowNotes(Plugin):
    configspec = "keys = force_list(default=list())"

    def hook_mail(self, session, sender, params):
        connection = session.connection
        shown = [f"{key}={self._value(connection, key)}" for key in self.config["keys"]]
        shown += [f"remote_host={connection.remote_host}", f"remote_info={connection.remote_info}"]
        return DENYSOFT, "notes: " + " ".join(shown)

    def _value(self, connection, key):
        if not key.startswith("result:"):
            return connection.notes.get(key)
        plugin, _, evidence = key[len("result:"):].partition(":")
        found = connection.results.get(plugin)
        if found is None:
            return None
        return found.get(evidence) if evidence else found.summary()
