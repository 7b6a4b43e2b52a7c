"""post_fork_probe: a test plugin that shows where and when ``post_fork`` runs.

Used by ``tests/e2e/test_master.py``. In each worker, after the fork and before it
serves, it writes a file named after the worker's pid into ``folder``; and if the file
``die_if`` exists then, the worker exits at once (status 3), as a worker whose pool
cannot open would: the master must respawn it with a growing backoff.
"""

import os

from qpgevent.plugin import Plugin


class PostForkProbe(Plugin):
    configspec = """
    folder = string(default="")
    die_if = string(default="")
    """

    def hook_post_fork(self):
        if self.config["folder"]:
            with open(os.path.join(self.config["folder"], str(os.getpid())), "w") as marker:
                marker.write(f"{os.getppid()}\n")
        if self.config["die_if"] and os.path.exists(self.config["die_if"]):
            os._exit(3)
