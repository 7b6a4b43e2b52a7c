"""The open-file limit, which bounds the sessions a worker can hold: each one is a socket.

Many systems start a process with a soft limit of 1024 and a hard one far above it; a
server that keeps 1024 would refuse clients (``accept`` fails with EMFILE) long before
``[limits] max_connections``. So the master raises its soft limit to the hard one before it
forks, and every worker inherits it. The hard limit itself is the operator's (``ulimit -Hn``,
systemd's ``LimitNOFILE``): if a worker's share of ``max_connections`` does not fit under it,
the master says so at start. A worker that does run out stops accepting for a moment (gevent
backs off) and the other workers take the connections from the shared accept queue.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("qpgevent.master")

#: Descriptors a worker holds besides its sessions: listeners, pipes, log, DNS, store, spill files.
RESERVE = 100


def raise_open_files(max_connections: int, workers: int) -> tuple[int, str | None]:
    """Soft limit up to the hard one; the limit now, and a warning if the sessions may not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:  # a hard limit of "unlimited" is refused as a soft one
            log.debug("open-file limit left at %d: %s", soft, error)
    share = -(-max_connections // max(1, workers))  # each worker's share, rounded up
    if soft != resource.RLIM_INFINITY and share + RESERVE > soft:
        return soft, (f"open-file limit {soft} per process: each of {workers} worker(s) can hold about "
                      f"{max(0, soft - RESERVE)} sessions, less than its share of [limits] max_connections "
                      f"= {max_connections}; raise the hard limit (ulimit -Hn, systemd LimitNOFILE) or add workers")
    return soft, None
