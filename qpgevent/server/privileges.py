"""Who the server runs as: dropping root after binding, refusing root, the pidfile.

Started as root (to bind port 25), the master binds its listeners, creates ``spool_dir``
for ``[server] user``, writes the pidfile, and then drops to ``user``/``group`` for good:
setgroups (the user's supplementary groups), setgid, setuid. Only then does it load the
plugins, so whatever their ``setup`` creates (a Maildir, say) belongs to that user, and
a plugin that cannot reach its files as that user fails the start (exit 2) instead of
failing later in every worker. The workers are forked from the dropped master, so no
process that talks to a client ever runs as root. The price: the listen addresses are
fixed at start (a reload cannot bind port 25 again); see ``master``.

Serving as root is refused (exit 2) unless ``allow_root = yes`` says it is meant.
"""

from __future__ import annotations

import ctypes
import grp
import logging
import os
import pwd
import signal
from dataclasses import dataclass

from .. import config as config_module
from ..config import Settings
from ..core.errors import ConfigError

log = logging.getLogger("qpgevent.master")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True, slots=True)
class Identity:
    """The user and group to run as (names for the log, ids for the system calls)."""

    user: str | None
    uid: int | None
    group: str
    gid: int

    def __str__(self) -> str:
        return f"user {self.user} (uid {self.uid}), group {self.group} (gid {self.gid})" if self.user \
            else f"group {self.group} (gid {self.gid})"


def resolve(settings: Settings) -> Identity | None:
    """``[server] user`` / ``group`` as ids; None when neither is set. ConfigError if unknown."""
    if not settings.user and not settings.group:
        return None
    uid = gid = None
    if settings.user:
        try:
            entry = pwd.getpwnam(settings.user)
        except KeyError:
            raise _error(settings, "user", f"no such user {settings.user!r}") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    group = settings.group
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise _error(settings, "group", f"no such group {group!r}") from None
    else:
        assert gid is not None
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
    assert gid is not None
    return Identity(settings.user or None, uid, group, gid)


def plan(settings: Settings) -> Identity | None:
    """Before binding: the identity to drop to (None: stay as we are), or ConfigError.

    Not root: nothing to drop, and ``user``/``group`` are only checked for existence. Root:
    we drop to them; ending up as uid 0 (no ``user``, or ``user = root``) needs
    ``allow_root = yes``.
    """
    identity = resolve(settings)
    if os.geteuid() != 0:
        return None
    final_uid = identity.uid if identity is not None and identity.uid is not None else 0
    if final_uid == 0 and not settings.allow_root:
        raise _error(settings, "user", "refusing to serve as root: set user (and group), "
                     "or allow_root = yes if you really mean it")
    return identity


def prepare_dir(path: str, identity: Identity | None) -> None:
    """Create ``path`` and its missing parents (mode 0700); as root, each for ``identity``.

    Folders that exist already are left as they are: their owner is the operator's choice.
    """
    missing = []
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(missing):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if identity is not None and os.geteuid() == 0:
            os.chown(folder, identity.uid if identity.uid is not None else -1, identity.gid)


def drop(identity: Identity | None) -> None:
    """Become ``identity`` for good (supplementary groups, gid, then uid). Root only."""
    if identity is None or os.geteuid() != 0:
        return
    if identity.user is not None:
        os.initgroups(identity.user, identity.gid)
    else:
        os.setgroups([identity.gid])
    os.setgid(identity.gid)
    if identity.uid is not None:
        os.setuid(identity.uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass  # as it must be
        else:
            raise RuntimeError("could regain root after dropping privileges")


def announce(settings: Settings, identity: Identity | None) -> None:
    """Log who we run as, once logging works (and say if user/group could not apply)."""
    if identity is not None:
        log.info("running as %s", identity)
    elif (settings.user or settings.group) and os.geteuid() != 0:
        log.warning("not started as root: [server] user/group not applied; running as uid %d", os.getuid())
    elif os.geteuid() == 0:
        log.warning("serving as root (allow_root = yes)")


def write_pidfile(path: str) -> None:
    """Write our pid to ``path`` (replaced atomically: never a half-written pidfile)."""
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="ascii") as handle:
        handle.write(f"{os.getpid()}\n")
    os.replace(partial, path)


def remove_pidfile(path: str) -> None:
    """Remove ``path`` if it still names us (after dropping root, its folder may not let us)."""
    try:
        with open(path, encoding="ascii") as handle:
            if handle.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError as error:
        # Typically /run after dropping root: give the pidfile a folder of its own that
        # the user may write (systemd: RuntimeDirectory=), or live with a stale file.
        log.warning("cannot remove pidfile %s: %s", path, error.strerror)


def die_with_parent(master_pid: int) -> None:
    """In a worker: be killed if the master dies (Linux PR_SET_PDEATHSIG), whatever kills it.

    A worker without its master would keep the port and serve unsupervised, and a
    restarted server could not bind. SIGKILL, as if the whole server had been killed:
    a 250 is only ever given after the message is on disk, so nothing accepted is lost.
    """
    # The running process's own symbols (libc is loaded): find_library would run ldconfig.
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != master_pid:  # the master died before the line above
        os._exit(1)


def _error(settings: Settings, key: str, problem: str) -> ConfigError:
    where = config_module.line_of(settings.path, ["server"], key)
    return ConfigError(f"{settings.path}:{where}: [server] {key}: {problem}")
