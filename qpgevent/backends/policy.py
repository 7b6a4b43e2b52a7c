"""What policy plugins share: list files re-read when they change, address patterns,
network lists, durations and rates written the way operators write them.

- ``ListFile``: a file of entries, one a line (``#`` comments, blank lines ignored),
  parsed once and re-parsed when its mtime, size or inode changes. A file that
  vanishes or no longer parses keeps its last good content (logged once): a typo in a
  live-edited list must not take mail down. At start (``load``), both are errors.
- ``AddressPattern``: one entry of badmailfrom / badrcptto / whitelist lists:
  ``user@example.com`` (the address, any case), ``@example.com`` or ``example.com``
  (anyone at that domain), ``/regex/`` or ``^regex`` (searched in the address, any case); text after
  the pattern is the reason. ``<>`` stands for the null sender.
- ``duration("50m")``: seconds from ``90``, ``90s``, ``50m``, ``3h``, ``36d``.
- ``rate("10/5m")``: ``(10, 300.0)``: at most 10 per 5 minutes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

__all__ = ["ListFile", "Entries", "AddressPattern", "parse_patterns", "match_address", "networks",
           "duration", "rate", "read_entries", "read_logical_lines", "reject_type_default"]

log = logging.getLogger("qpgevent.policy")
T = TypeVar("T")

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)


def duration(text: str | float | int) -> float:
    """Seconds in ``text``: a number, or a number with s, m, h, d or w."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration (write 90, 90s, 50m, 3h or 36d)")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def rate(text: str) -> tuple[int, float] | None:
    """``"N/PERIOD"`` -> (N, seconds); ``""`` or ``"0"`` -> None (no limit)."""
    text = str(text).strip()
    if text in ("", "0"):
        return None
    count, slash, period = text.partition("/")
    if not slash or not count.strip().isdigit():
        raise ValueError(f"{text!r} is not a rate (write N/PERIOD, such as 10/5m)")
    seconds = duration(period)
    if seconds <= 0:
        raise ValueError(f"{text!r}: the period must be longer than 0")
    return int(count), seconds


def reject_type_default(configspec_lines: list[str], default: str) -> list[str]:
    """The configspec lines with another default for the standard ``reject_type``.

    For checks whose refusals are temporary by nature (greylisting, rate limits, load), a
    plugin overrides ``configspec_lines`` (a classmethod) to return
    ``reject_type_default(super().configspec_lines(), "temp")``.
    """
    out = []
    for line in configspec_lines:
        if line.split("=", 1)[0].strip() == "reject_type":
            line = re.sub(r'default="[a-z_]+"', f'default="{default}"', line)
        out.append(line)
    return out


def networks(items: list[str]) -> list[Any]:
    """ipaddress networks from addresses or CIDR prefixes (a bad one raises ValueError)."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or network") from None
    return out


def read_entries(path: str) -> list[str]:
    """The entries of a list file: each line without its comment, stripped, blanks dropped."""
    with open(path, encoding="utf-8") as handle:
        lines = [line.split("#", 1)[0].strip() if not line.lstrip().startswith("/") else line.strip()
                 for line in handle]
    return [line for line in lines if line and not line.startswith("#")]


def read_logical_lines(path: str) -> list[str]:
    """Entries as Postfix reads a map (postmap(1)): a line that starts with whitespace
    continues the one before; comments and blank lines are dropped, as in ``read_entries``."""
    entries: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = line.split("#", 1)[0].rstrip()
            if not text:
                continue
            if text[0].isspace() and entries:
                entries[-1] += " " + text.strip()
            else:
                entries.append(text.strip())
    return entries


class ListFile(Generic[T]):
    """A list file, parsed by ``parse`` (entries -> T), re-parsed when the file changes.

    ``read`` turns the file into entries: ``read_entries`` (a line each), or
    ``read_logical_lines`` (Postfix's continuation lines).
    """

    def __init__(self, path: str, parse: Callable[[list[str]], T],
                 read: Callable[[str], list[str]] = read_entries) -> None:
        self.path = path
        self.parse = parse
        self.read = read
        self._stamp: tuple[int, int, int] | None = None
        self._value: T = self._load()  # errors here are load errors: the plugin will not start
        self._complained: Any = None

    def _load(self) -> T:
        stamp = _stamp(self.path)
        value = self.parse(self.read(self.path))
        self._stamp = stamp
        return value

    def get(self) -> T:
        """The current content: a stat call, and a re-read only if the file changed."""
        try:
            stamp = _stamp(self.path)
            if stamp != self._stamp:
                self._value = self._load()
                self._complained = None
                log.info("%s re-read", self.path)
        except (OSError, ValueError) as error:
            problem = str(error)
            if problem != self._complained:  # say it once, not on every message
                self._complained = problem
                log.error("%s: %s; still using its previous content", self.path, problem)
        return self._value


class Entries(Generic[T]):
    """A plugin's list: entries written in the ini plus those of a ``ListFile`` (if a path is given).

    ``parse`` turns entries into a list of T; the ini's are parsed once, the file's
    whenever it changes. ``get()`` is the ini's entries, then the file's.
    """

    def __init__(self, inline: list[str], path: str, parse: Callable[[list[str]], list[T]]) -> None:
        self._inline = parse([entry.strip() for entry in inline if entry.strip()])
        self._file = ListFile(path, parse) if path else None

    def get(self) -> list[T]:
        return self._inline + self._file.get() if self._file is not None else self._inline


def _stamp(path: str) -> tuple[int, int, int]:
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size, info.st_ino


@dataclass(frozen=True)
class AddressPattern:
    """One list entry: an address, ``@domain``, or a regex; and its reason (maybe empty)."""

    text: str
    reason: str = ""
    regex: re.Pattern[str] | None = None

    def matches(self, address: str) -> bool:
        """``address`` is "user@host" ("" for the null sender), as ``Address.address`` gives it."""
        address = address.lower()
        if self.regex is not None:
            return self.regex.search(address) is not None
        if self.text == "<>":
            return address == ""
        if self.text.startswith("@") or "@" not in self.text:  # a domain: anyone there
            return "@" in address and address.rpartition("@")[2] == self.text.lstrip("@")
        return address == self.text


def parse_patterns(entries: list[str]) -> list[AddressPattern]:
    """Entries "PATTERN [reason...]" -> AddressPatterns; a bad regex raises ValueError."""
    patterns = []
    for entry in entries:
        if entry.startswith("/"):
            end = entry.rfind("/")
            if end == 0:
                raise ValueError(f"{entry!r}: a /regex/ needs its closing slash")
            text, reason = entry[1:end], entry[end + 1:].strip()
        else:
            text, _, reason = entry.partition(" ")
            reason = reason.strip()
            if not text.startswith("^"):
                patterns.append(AddressPattern(text.lower().strip("<>") if text != "<>" else "<>", reason))
                continue
        try:
            patterns.append(AddressPattern(text, reason, re.compile(text, re.IGNORECASE)))
        except re.error as error:
            raise ValueError(f"{entry!r}: bad regex: {error}") from None
    return patterns


def match_address(patterns: list[AddressPattern], address: str) -> AddressPattern | None:
    """The first pattern that matches ``address``, or None."""
    for pattern in patterns:
        if pattern.matches(address):
            return pattern
    return None
