"""What plugins add to the SMTP dialogue: EHLO keywords, MAIL/RCPT parameters, verbs, SASL mechanisms.

A plugin declares its additions as class attributes, read once when the hook runner is
built (a bad declaration is a load error naming the plugin and its file):

    ehlo_keywords = ("ETRN",)                 # offered in our EHLO reply, as written
    mail_parameters = {"XPRIO": r"[0-9]"}     # keyword -> syntax of its value (None: no value)
    rcpt_parameters = {"XNOTE": r"[a-z]+"}
    verbs = ("ETRN",)                         # new commands, answered by hook_command
    help_texts = {"ETRN": "ETRN <node>: ..."} # what HELP ETRN says (a verb of its own, one line)
    sasl_mechanisms = ("X-TOKEN",)            # AUTH mechanisms, checked by hook_auth_sasl
    sasl_first_challenge = True               # asked (response None) when AUTH has no initial response

A MAIL or RCPT parameter nobody declared still gets 555 (RFC 5321 4.1.1.11), and a
declared one whose value does not match its syntax (a full match) gets 501; what a
parameter means is the plugin's business, in the mail/rcpt hooks' ``params``. A declared
verb reaches the ``command`` hook instead of ``unrecognized_command``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import PluginLoadError

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*$")  # RFC 5321 4.1.2 esmtp-keyword
_VERB = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,19}$")  # as the protocol core reads a verb
#: What the core itself answers: a plugin cannot take these over.
CORE_VERBS = frozenset({"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP",
                        "STARTTLS", "AUTH", "BDAT", "EXPN"})
CORE_PARAMETERS = {"MAIL": frozenset({"SIZE", "BODY", "SMTPUTF8", "AUTH", "RET", "ENVID", "REQUIRETLS"}),
                   "RCPT": frozenset({"NOTIFY", "ORCPT"})}  # RFC 3461 DSN: core/dsn_request.py
#: CRAM-MD5 is not among them: the server makes its challenge, so a back end that makes
#: its own (Dovecot) must take the name over (engine/authentication.py).
CORE_MECHANISMS = frozenset({"PLAIN", "LOGIN"})

Syntax = re.Pattern[str] | None  #: a declared parameter's value syntax; None: it takes no value


@dataclass(frozen=True)
class Extensions:
    keywords: tuple[str, ...] = ()
    mail_parameters: dict[str, Syntax] = field(default_factory=dict)
    rcpt_parameters: dict[str, Syntax] = field(default_factory=dict)
    verbs: frozenset[str] = frozenset()
    help_texts: dict[str, str] = field(default_factory=dict)  #: verb -> what HELP <verb> says
    sasl_mechanisms: tuple[str, ...] = ()
    sasl_first_challenge: frozenset[str] = frozenset()  #: mechanisms whose plugin speaks first
    parses: bool = False  #: some plugin has a ``*_parse`` hook (the core then calls them)

    @classmethod
    def declared_by(cls, plugins: Iterable[Any]) -> Extensions:
        plugins = list(plugins)
        keywords: list[str] = []
        mail: dict[str, Syntax] = {}
        rcpt: dict[str, Syntax] = {}
        verbs: set[str] = set()
        help_texts: dict[str, str] = {}
        mechanisms: list[str] = []
        first: set[str] = set()
        for plugin in plugins:
            keywords += [k for k in _words(plugin, "ehlo_keywords", _KEYWORD_LINE) if k not in keywords]
            mail.update(_parameters(plugin, "mail_parameters", "MAIL"))
            rcpt.update(_parameters(plugin, "rcpt_parameters", "RCPT"))
            for verb in _words(plugin, "verbs", _VERB):
                if verb.upper() in CORE_VERBS:
                    raise _error(plugin, f"verbs: {verb} is the core's")
                verbs.add(verb.upper())
            help_texts.update(_help_texts(plugin))
            for mechanism in _words(plugin, "sasl_mechanisms", _KEYWORD):
                if mechanism.upper() in CORE_MECHANISMS:
                    raise _error(plugin, f"sasl_mechanisms: {mechanism} is built in")
                if mechanism.upper() not in mechanisms:
                    mechanisms.append(mechanism.upper())
                if getattr(plugin, "sasl_first_challenge", False) is True:
                    first.add(mechanism.upper())
        parses = any(callable(getattr(plugin, f"hook_{verb}_parse", None))
                     for plugin in plugins for verb in ("helo", "ehlo", "mail", "rcpt", "auth"))
        return cls(tuple(keywords), mail, rcpt, frozenset(verbs), help_texts, tuple(mechanisms),
                   frozenset(first), parses)


_KEYWORD_LINE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*( [\x21-\x7e]+)*$")  # RFC 5321 4.1.1.1 ehlo-line


def _words(plugin: Any, attribute: str, syntax: re.Pattern[str]) -> list[str]:
    value = getattr(plugin, attribute, ())
    if isinstance(value, str) or not all(isinstance(word, str) for word in value):
        raise _error(plugin, f"{attribute} must be a tuple of strings")
    for word in value:
        if not syntax.match(word):
            raise _error(plugin, f"{attribute}: {word!r} is not a valid name")
    return list(value)


def _parameters(plugin: Any, attribute: str, verb: str) -> dict[str, Syntax]:
    declared = getattr(plugin, attribute, {})
    if not isinstance(declared, dict):
        raise _error(plugin, f"{attribute} must be a dict: keyword -> value syntax (a regex) or None")
    out: dict[str, Syntax] = {}
    for keyword, syntax in declared.items():
        if not isinstance(keyword, str) or not _KEYWORD.match(keyword):
            raise _error(plugin, f"{attribute}: {keyword!r} is not an esmtp-keyword")
        if keyword.upper() in CORE_PARAMETERS[verb]:
            raise _error(plugin, f"{attribute}: {keyword} is the core's")
        try:
            out[keyword.upper()] = None if syntax is None else re.compile(syntax)
        except (re.error, TypeError) as error:
            raise _error(plugin, f"{attribute}: {keyword}: bad syntax {syntax!r}: {error}") from None
    return out


_HELP_LINE = re.compile(r"[\x20-\x7e]{1,400}$")  # one printable line: it goes into a 214 reply


def _help_texts(plugin: Any) -> dict[str, str]:
    """``help_texts``: one line per verb the plugin itself declares in ``verbs``."""
    declared = getattr(plugin, "help_texts", {})
    if not isinstance(declared, dict):
        raise _error(plugin, "help_texts must be a dict: verb -> one line of text")
    own = {verb.upper() for verb in getattr(plugin, "verbs", ())}
    out: dict[str, str] = {}
    for verb, text in declared.items():
        if not isinstance(verb, str) or verb.upper() not in own:
            raise _error(plugin, f"help_texts: {verb!r} is not one of this plugin's verbs")
        if not isinstance(text, str) or not _HELP_LINE.match(text):
            raise _error(plugin, f"help_texts: {verb}: the text must be one line of printable ASCII")
        out[verb.upper()] = text
    return out


def _error(plugin: Any, problem: str) -> PluginLoadError:
    return PluginLoadError(f"plugin {plugin.name} ({plugin.path}): {problem}")
