"""Per-plugin results: what each check concluded about a connection or a transaction.

Haraka's ``results``, in qpsmtpd's vocabulary. A check records its verdict in the
results of the connection (``session.connection.results``: about the client) or of the
transaction (``session.transaction.results``: about one message), under its own name::

    session.connection.results.add(self, fail="zen.test", listings={"zen.test": "spam"})
    session.connection.results.add(self, pass_="iprev", name="mail.example.test")

    found = session.connection.results.get("dnsbl")
    if found is not None and found.failed:
        ...

Four outcomes, each a list of short words saying what passed or failed (the zones, the
rules, the methods): ``pass_`` (``pass`` is a Python keyword), ``fail``, ``skip`` (not
checked: immune client, nothing to check) and ``err`` (could not check: the DNS did not
answer, the scanner is down). Anything else given to ``add`` is evidence (key -> value,
the last one given wins). Adding twice for one plugin merges: the lists grow (a word
once), evidence is updated. ``record(plugin, "fail", word)`` is ``add`` with the outcome
as data (``AUTH_OUTCOMES`` maps RFC 8601 results such as softfail to outcomes). A result's ``outcome`` is its worst: err, then fail, then pass, then skip.

Verdicts go here, where another plugin (naughty, dmarc, karma) or the operator (the
session's log line) can read them by a name a plugin author does not have to guess;
``notes`` stay for free data that is nobody's verdict (a counter, a lease).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Result", "Results", "OUTCOMES", "AUTH_OUTCOMES"]

#: From worst to mildest: the order ``Result.outcome`` picks in.
OUTCOMES = ("err", "fail", "pass", "skip")
#: RFC 8601's method results (SPF, DKIM, DMARC, iprev) as outcomes: what was concluded,
#: or that it could not be (the errors), or that there was nothing to conclude.
AUTH_OUTCOMES = {"pass": "pass", "fail": "fail", "softfail": "fail", "neutral": "skip", "none": "skip",
                 "policy": "skip", "permerror": "err", "temperror": "err"}


@dataclass
class Result:
    """One plugin's findings: what passed, failed, was skipped, could not be checked; evidence."""

    plugin: str
    passed: list[str] = field(default_factory=list)
    fail: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.fail)

    @property
    def outcome(self) -> str:
        """err, fail, pass or skip: the worst recorded ("skip" when nothing was)."""
        for name, words in zip(OUTCOMES, (self.err, self.fail, self.passed, self.skip)):
            if words:
                return name
        return "skip"

    def __getitem__(self, key: str) -> Any:
        return self.evidence[key]

    def get(self, key: str, default: Any = None) -> Any:
        """A piece of evidence, or ``default``."""
        return self.evidence.get(key, default)

    def summary(self) -> str:
        """``fail:zen.test`` / ``pass:iprev,spf``: the outcome and its words, for a log line."""
        words = {"err": self.err, "fail": self.fail, "pass": self.passed, "skip": self.skip}[self.outcome]
        return f"{self.outcome}:{','.join(words)}" if words else self.outcome


_NONE_YET: dict[str, Result] = {}  #: every Results' dict before its first result: never written


class Results:
    """The results of one connection or one transaction, by plugin name, in recording order."""

    __slots__ = ("_by_plugin",)

    def __init__(self) -> None:
        # Shared and empty until the first result: most connections' results stay empty
        # for long (idle sessions by the thousand); ``add`` makes the connection's own.
        self._by_plugin: dict[str, Result] = _NONE_YET

    def add(self, plugin: Any, *, pass_: str | list[str] | None = None, fail: str | list[str] | None = None,
            skip: str | list[str] | None = None, err: str | list[str] | None = None,
            **evidence: Any) -> Result:
        """Record findings of ``plugin`` (a Plugin, or a name such as "core"); merged with earlier ones."""
        name = plugin if isinstance(plugin, str) else plugin.name
        result = self._by_plugin.get(name)
        if result is None:
            if self._by_plugin is _NONE_YET:
                self._by_plugin = {}
            result = self._by_plugin[name] = Result(name)
        for words, given in ((result.passed, pass_), (result.fail, fail), (result.skip, skip), (result.err, err)):
            for word in [given] if isinstance(given, str) else given or ():
                if word not in words:
                    words.append(word)
        result.evidence.update(evidence)
        return result

    def record(self, plugin: Any, outcome: str, word: str, **evidence: Any) -> Result:
        """``add`` with the outcome named: ``record(self, "fail", "spf", result="softfail")``."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
        return self.add(plugin, **{"pass_" if outcome == "pass" else outcome: word}, **evidence)

    def get(self, plugin: Any) -> Result | None:
        """The result of ``plugin`` (a Plugin or its name: "dnsbl", "dnsbl:2"), or None."""
        return self._by_plugin.get(plugin if isinstance(plugin, str) else plugin.name)

    def has(self, plugin: Any, outcome: str, word: str | None = None) -> bool:
        """Whether ``plugin`` recorded ``outcome`` ("pass", "fail", "skip", "err"), with ``word`` if given."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
        result = self.get(plugin)
        if result is None:
            return False
        words = {"err": result.err, "fail": result.fail, "pass": result.passed, "skip": result.skip}[outcome]
        return bool(words) if word is None else word in words

    def __iter__(self) -> Iterator[Result]:
        return iter(list(self._by_plugin.values()))

    def __len__(self) -> int:
        return len(self._by_plugin)

    def __contains__(self, plugin: Any) -> bool:
        return self.get(plugin) is not None

    def summary(self) -> str:
        """``dnsbl=fail:zen.test fcrdns=pass``: every plugin's outcome, for the session's log line."""
        return " ".join(f"{result.plugin}={result.summary()}" for result in self)

    def __repr__(self) -> str:
        return f"<Results {self.summary() or '(none)'}>"
