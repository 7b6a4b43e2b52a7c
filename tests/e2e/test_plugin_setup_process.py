"""Where a plugin's ``setup()`` runs, as README, docs/writing-plugins.md and the
``Plugin.setup`` docstring say: in the master, once before the workers are forked and
again at each SIGHUP reload; ``post_fork`` runs in each worker. A plugin in the site
folder records the pid of each call, and the test compares them with the real master's
and workers' pids.
"""

from __future__ import annotations

import signal

from qpgevent.testing import DEFAULT_PLUGINS, ServerProcess, wait_until, write_ini

RECORDER = '''"""pid_recorder: write down which process runs setup and post_fork."""
import os

from qpgevent.plugin import Plugin


class PidRecorder(Plugin):
    configspec = "record = string"

    def setup(self):
        self._write("setup")

    def hook_post_fork(self):
        self._write("post_fork")

    def _write(self, what):
        with open(self.config["record"], "a", encoding="utf-8") as record:
            record.write(f"{what} {os.getpid()}\\n")
'''


def test_setup_runs_in_the_master_and_post_fork_in_each_worker(tmp_path):
    (tmp_path / "site_plugins").mkdir()
    (tmp_path / "site_plugins" / "pid_recorder.py").write_text(RECORDER, encoding="utf-8")
    record = tmp_path / "pids.txt"
    ini = write_ini(tmp_path, f"[[pid_recorder]]\n  record = {record}\n" + DEFAULT_PLUGINS,
                    plugin_dirs="site_plugins", workers=2)
    server = ServerProcess(ini)
    try:
        def calls(what: str) -> list[int]:
            lines = record.read_text(encoding="utf-8").splitlines() if record.exists() else []
            return [int(line.split()[1]) for line in lines if line.split()[0] == what]

        master = server.process.pid
        first_workers = wait_until(lambda: len(server.worker_pids()) == 2 and server.worker_pids(), 30,
                                   "two workers")
        assert calls("setup") == [master]
        wait_until(lambda: len(calls("post_fork")) == 2, 30, "post_fork in both workers")
        assert sorted(calls("post_fork")) == sorted(first_workers)
        assert master not in calls("post_fork")

        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: len(calls("post_fork")) == 4, 60, "post_fork in the new generation's workers")
        assert calls("setup") == [master, master]  # the reload loads the plugins again, in the master
        assert not set(calls("post_fork")[2:]) & {master, *first_workers}
    finally:
        assert server.terminate() == 0
