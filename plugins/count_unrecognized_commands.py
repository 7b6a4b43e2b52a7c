"""count_unrecognized_commands: close the session after too many unknown commands.

Each command the server does not know counts; at the ``count``-th one the client gets
``521 5.5.1 Closing connection, N unrecognized commands. Perhaps you should read RFC 5321?``
and is disconnected. The count lives in the connection notes (``unrec_cmd_count``).

Options:
  count  unknown commands allowed before closing (default 4, as qpsmtpd)

Example::

    [[count_unrecognized_commands]]
      count = 3
"""

from qpgevent.plugin import DECLINED, DENY_DISCONNECT, Plugin


class CountUnrecognizedCommands(Plugin):
    configspec = "count = integer(min=1, default=4)"

    def hook_unrecognized_command(self, session, verb, argument):
        notes = session.connection.notes
        notes["unrec_cmd_count"] = notes.get("unrec_cmd_count", 0) + 1
        if notes["unrec_cmd_count"] >= self.config["count"]:
            return (DENY_DISCONNECT,
                    f"Closing connection, {notes['unrec_cmd_count']} unrecognized commands."
                    " Perhaps you should read RFC 5321?")
        return DECLINED
