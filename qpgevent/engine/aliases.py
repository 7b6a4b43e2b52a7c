"""qpsmtpd's plugin names, accepted for the plugins that took their place here.

An operator moving a qpsmtpd ``config/plugins`` file over writes the names they know:
``check_earlytalker``, ``queue/smtp-forward``, ``require_resolvable_fromhost``. The
loader looks a name up here when no plugin file of that name exists, loads the plugin
it stands for, and logs a deprecation note (``--check-config`` prints it too) saying
which name to write instead. The plugin's label becomes the current name
(``check_badmailfrom:2`` is ``badmailfrom:2``), so logs, metrics, karma scores and
results all see one name, whichever was written.

Only plugins that do here what they did there are listed: a name whose plugin is not
bundled (``check_loop``, ``dns_whitelist_soft``: a dnsbl option here) stays an unknown
plugin, not a silent stand-in.
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["ALIASES", "canonical", "deprecation_note", "resolve"]

log = logging.getLogger("qpgevent.loader")

#: qpsmtpd's name -> ours. Debian's pre-0.94 ``check_*`` wrappers, names with a dash,
#: the older long names, and the auth back ends' ``auth_`` prefix.
ALIASES: dict[str, str] = {
    # Debian's check_* wrappers of the pre-0.94 names
    "check_earlytalker": "earlytalker",
    "check_relay": "relay",
    "check_badmailfrom": "badmailfrom",
    "check_badmailfromto": "badmailfromto",
    "check_badrcptto": "badrcptto",
    "check_spamhelo": "helo",
    "check_basicheaders": "headers",
    # older long names
    "require_resolvable_fromhost": "resolvable_fromhost",
    # a dash where Python module names have an underscore
    "queue/smtp-forward": "queue/smtp_forward",
    "queue/qmail-queue": "queue/qmail_queue",
    # the auth back ends, without their auth_ prefix
    "auth/auth_flat_file": "auth/flat_file",
    "auth/auth_checkpassword": "auth/checkpassword",
    "auth/auth_checkpasswd": "auth/checkpassword",
}


def canonical(name: str) -> str | None:
    """Our name for qpsmtpd's plugin ``name``, or None when ``name`` is not one of its old names."""
    return ALIASES.get(name)


def deprecation_note(written: str, name: str) -> str:
    """What the loader logs when ``written`` was loaded as ``name``."""
    return f"[[{written}]] is qpsmtpd's name of the {name} plugin: write [[{name}]] (the old name is deprecated)"


def resolve(name: str, label: str, dirs: list[Path], where: str = "") -> tuple[str, str]:
    """(the plugin name to load, its label): ours for qpsmtpd's old names, logged as deprecated.

    A file of the old name in a plugin folder wins: an operator's own ``check_relay.py``
    is theirs, not an alias.
    """
    renamed = canonical(name)
    if renamed is None or any((folder / f"{name}.py").is_file() for folder in dirs):
        return name, label
    new_label = renamed + label[len(name):]  # the instance suffix stays: check_relay:2 is relay:2
    log.warning("%s%s", f"{where} " if where else "", deprecation_note(label, new_label))
    return renamed, new_label
