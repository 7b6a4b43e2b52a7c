"""show_notes: a test plugin that tells the client what the connection knows, at MAIL.

Answers MAIL with ``451 notes: key=value ...`` for the connection note names in
``keys``, then ``remote_host`` and ``remote_info``: how a test over a real socket reads
what plugins and the core wrote down about the connection.

Options:
  keys  connection note names (default none)
"""

from qpgevent.plugin import DENYSOFT, Plugin


class ShowNotes(Plugin):
    configspec = "keys = force_list(default=list())"

    def hook_mail(self, session, sender, params):
        connection = session.connection
        shown = [f"{key}={connection.notes.get(key)}" for key in self.config["keys"]]
        shown += [f"remote_host={connection.remote_host}", f"remote_info={connection.remote_info}"]
        return DENYSOFT, "notes: " + " ".join(shown)
