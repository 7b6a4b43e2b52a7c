"""commit_then_stall: a test double of a queue plugin that commits, then stalls.

It stands for a real queue plugin cut short after its commit (a Maildir written and
renamed, then a slow fsync of the folder; a next hop that said 250, then a slow QUIT):
it writes the message to ``path/<name>`` (write to a temporary name, fsync, rename),
says so with ``transaction.handed_off``, then sleeps cooperatively for ``seconds`` and
returns OK. The hook's timeout, or the server stopping, lands in the sleep.

Options:
  path     the folder to write into
  seconds  how long to stall after the commit (default 300)
"""

import os

import gevent

from qpgevent.plugin import OK, Plugin


class CommitThenStall(Plugin):
    configspec = """
    path = string
    seconds = float(default=300)
    """

    def hook_queue(self, session):
        transaction = session.transaction
        name = transaction.id
        os.makedirs(self.config["path"], exist_ok=True)
        tmp = os.path.join(self.config["path"], "." + name)
        with open(tmp, "wb") as file:
            for chunk in transaction.message_chunks():
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        os.rename(tmp, os.path.join(self.config["path"], name))
        transaction.handed_off(f"Queued as {name}")
        gevent.sleep(self.config["seconds"])
        return OK, f"Queued as {name}"
