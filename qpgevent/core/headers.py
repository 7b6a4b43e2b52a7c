"""Message header fields as received, editable, written back byte for byte.

Fields keep their raw bytes (folding and all) until a plugin changes them, so a message
nobody edited leaves exactly as it came, with only our Received line on top.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

CRLF = b"\r\n"
_FIELD_START = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")  # RFC 5322 2.2 field-name


def is_field_start(line: bytes) -> bool:
    return _FIELD_START.match(line) is not None


def is_continuation(line: bytes) -> bool:
    return line[:1] in (b" ", b"\t")


class Headers:
    """An ordered list of header fields; names compare case-insensitively."""

    def __init__(self) -> None:
        self._fields: list[tuple[str, bytes]] = []  # (name, raw bytes with CRLFs)

    @classmethod
    def parse(cls, block: bytes) -> Headers:
        """Parse a header block (lines ending in CRLF, no empty separator line)."""
        headers = cls()
        for line in block.split(CRLF)[:-1] if block.endswith(CRLF) else block.split(CRLF):
            headers.append_raw_line(line + CRLF)
        return headers

    def append_raw_line(self, line: bytes) -> None:
        match = _FIELD_START.match(line)
        if match:
            self._fields.append((match.group(1).decode("ascii"), line))
        elif self._fields:
            name, raw = self._fields[-1]
            self._fields[-1] = (name, raw + line)
        else:
            raise ValueError("a header block cannot start with a continuation line")

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Unfolded values (RFC 5322 2.2.3), decoded as UTF-8 where they are not ASCII."""
        key = name.lower()
        return [_value(raw) for n, raw in self._fields if n.lower() == key]

    def add(self, name: str, value: str) -> None:
        self._fields.append((name, _encode(name, value)))

    def prepend(self, name: str, value: str) -> None:
        self._fields.insert(0, (name, _encode(name, value)))

    def remove(self, name: str) -> int:
        before, key = len(self._fields), name.lower()
        self._fields = [(n, raw) for n, raw in self._fields if n.lower() != key]
        return before - len(self._fields)

    def remove_if(self, name: str, predicate: Callable[[str], bool]) -> int:
        """Remove the ``name`` fields whose unfolded value ``predicate`` accepts; the rest stay as they were."""
        before, key = len(self._fields), name.lower()
        self._fields = [(n, raw) for n, raw in self._fields if n.lower() != key or not predicate(_value(raw))]
        return before - len(self._fields)

    def replace(self, name: str, value: str) -> None:
        """Set ``name`` to one value, where its first occurrence was (or at the end)."""
        for i, (n, _) in enumerate(self._fields):
            if n.lower() == name.lower():
                self._fields[i] = (name, _encode(name, value))
                self._fields[i + 1:] = [(m, r) for m, r in self._fields[i + 1:]
                                        if m.lower() != name.lower()]
                return
        self.add(name, value)

    def insert(self, index: int, name: str, value: str | bytes) -> None:
        """Insert a field at position ``index`` (0: first; past the end: last).

        A ``bytes`` value is kept as a filter wrote it (leading space, folds; LF or CRLF),
        as milters send them; a ``str`` is encoded as ``add`` does."""
        self._fields.insert(max(index, 0), (name, _encode_bytes(name, value) if isinstance(value, bytes)
                                            else _encode(name, value)))

    def change(self, name: str, occurrence: int, value: str | bytes | None) -> None:
        """Set the ``occurrence``-th ``name`` field (from 1) in place; ``None`` removes it.

        With fewer such fields a value is added at the end (sendmail's rule for milters)."""
        seen = 0
        for i, (n, _) in enumerate(self._fields):
            if n.lower() == name.lower():
                seen += 1
                if seen == max(occurrence, 1):
                    if value is None:
                        del self._fields[i]
                    else:
                        self.insert(i, name, value)
                        del self._fields[i + 1]
                    return
        if value is not None:
            self.insert(len(self._fields), name, value)

    def raw_fields(self) -> list[tuple[str, bytes]]:
        """(name, the field's bytes as held: ``Name: value`` with CRLF folds and end)."""
        return list(self._fields)

    def names(self) -> list[str]:
        return [n for n, _ in self._fields]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(n.lower() == name.lower() for n, _ in self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((n, _value(raw)) for n, raw in self._fields)

    def as_bytes(self) -> bytes:
        return b"".join(raw for _, raw in self._fields)


def _value(raw: bytes) -> str:
    text = raw.split(b":", 1)[1].decode("utf-8", "replace")
    return re.sub(r"\r\n(?=[ \t])", "", text).strip()


def _encode_bytes(name: str, value: bytes) -> bytes:
    lines = [line.rstrip(b"\r") for line in value.split(b"\n")]
    folded = b"\r\n".join(lines[:1] + [line if line[:1] in (b" ", b"\t") else b"\t" + line
                                        for line in lines[1:]])
    sep = b":" if folded[:1] in (b" ", b"\t") else b": "
    return name.encode("ascii") + sep + folded + b"\r\n"


def _encode(name: str, value: str) -> bytes:
    # A value with line breaks must keep them as folding, never start a new field:
    # a plugin must not be able to inject a header by accident.
    # A bare CR is a line break too (to some readers): it becomes folding as well.
    lines = value.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    folded = "\r\n".join(lines[:1] + [line if line[:1] in (" ", "\t") else "\t" + line
                                      for line in lines[1:]])
    return f"{name}: {folded}\r\n".encode("utf-8")
