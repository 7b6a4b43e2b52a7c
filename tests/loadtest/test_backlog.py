"""The listening socket's accept queue is as long as the kernel allows (up to 4096): a burst
of new connections (Locust ramping up thousands of users) must wait in it, not overflow it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def test_the_listener_queues_as_many_connections_as_the_kernel_allows(server):
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    listing = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True,
                             check=True).stdout.split()
    # For a listening socket, ss shows the backlog in Send-Q (the third column).
    assert int(listing[2]) == min(4096, somaxconn), listing
