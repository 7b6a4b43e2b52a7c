"""loadcheck: turn clients away for a while when this host is overloaded.

At connect, when the 1-minute load average is above ``max_load``, the client gets
``421 4.7.0 Server load too high, please try again later`` and is disconnected; a
real MTA retries later, when the load may have dropped. The reading is reused for
``cache_time`` seconds, so a burst of connections costs one reading. Relay clients
and whitelisted hosts (listed before this plugin) are let in.

Options (and ``reject``; ``reject_type`` defaults to ``temp`` here: a refusal for load
must never be permanent):
  max_load      the load above which connections are refused (default 7)
  cache_time    seconds one reading is used (default 10; 0 reads at every connection)
  loadavg_file  read the load from this file (first number, as /proc/loadavg) instead
                of asking the kernel: a container's own view, or a test's

Example::

    [[loadcheck]]
      max_load = 12
      cache_time = 5
"""

import os
import time

from qpgevent.plugin import DECLINED, Plugin


class Loadcheck(Plugin):
    reject_options = ("reject", "reject_type")
    default_reject_type = "temp"
    configspec = """
    max_load = float(min=0, default=7)
    cache_time = float(min=0, default=10)
    loadavg_file = path(default="")
    """

    def setup(self):
        self._reading = (float("-inf"), 0.0)  # (when, load): a per-process cache, not per session
        self.load()  # an unreadable loadavg_file is a load error

    def load(self):
        when, value = self._reading
        now = time.monotonic()
        if now - when < self.config["cache_time"]:
            return value
        path = self.config["loadavg_file"]
        if path:
            with open(path, encoding="ascii") as handle:
                value = float(handle.read().split()[0])
        else:
            value = os.getloadavg()[0]
        self._reading = (now, value)
        return value

    def hook_connect(self, session):
        if self.is_immune(session):
            return DECLINED
        load = self.load()
        if load <= self.config["max_load"]:
            return DECLINED
        self.log.info("load %.2f is above %.2f", load, self.config["max_load"])
        return self.reject("Server load too high, please try again later", session)

