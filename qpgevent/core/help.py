"""What HELP says about each verb the core answers (RFC 5321 4.1.1.8), kept next to the verbs.

``HELP`` alone answers 214 with the verbs the session supports; ``HELP <verb>`` one line
about that verb. A plugin's verbs bring their own lines (``help_texts``, checked at load in
``engine/extensions.py``). A verb nobody knows gets 504: the argument of HELP is not one
we can help with (RFC 5321 4.2.4, 4.3.2).
"""

from __future__ import annotations

from .reply import Reply, reply

#: verb -> one line of help. The order is the order of HELP's list.
CORE_HELP = {
    "HELO": "HELO <domain>: say hello (plain SMTP)",
    "EHLO": "EHLO <domain>: say hello and list the extensions offered (RFC 5321 4.1.1.1)",
    "MAIL": "MAIL FROM:<sender> [parameters]: start a transaction (RFC 5321 4.1.1.2)",
    "RCPT": "RCPT TO:<recipient> [parameters]: add a recipient (RFC 5321 4.1.1.3)",
    "DATA": "DATA: send the message, ended by a line holding a single dot (RFC 5321 4.1.1.4)",
    "BDAT": "BDAT <size> [LAST]: send the message in chunks of that many octets (RFC 3030)",
    "RSET": "RSET: abandon the transaction in progress (RFC 5321 4.1.1.5)",
    "VRFY": "VRFY <user>: ask whether a mailbox exists (RFC 5321 4.1.1.6)",
    "NOOP": "NOOP: do nothing, answer 250 (RFC 5321 4.1.1.9)",
    "HELP": "HELP [verb]: this text (RFC 5321 4.1.1.8)",
    "QUIT": "QUIT: end the session (RFC 5321 4.1.1.10)",
    "STARTTLS": "STARTTLS: start TLS on this connection (RFC 3207)",
    "AUTH": "AUTH <mechanism> [initial-response]: authenticate (RFC 4954)",
    "EXPN": "EXPN <list>: ask for the members of a mailing list (RFC 5321 4.1.1.7)",
}


def verb_list(verbs: list[str]) -> Reply:
    """HELP alone: the verbs this session supports, a few to a line."""
    lines = ["Commands supported:"] + [" ".join(verbs[i:i + 8]) for i in range(0, len(verbs), 8)]
    lines.append("HELP <verb> says more about one of them.")
    return reply(214, "2.0.0", *lines)


def about(verb: str, texts: dict[str, str]) -> Reply:
    """HELP <verb>: its line, or 504 for a verb this session does not know."""
    text = texts.get(verb.upper())
    if text is None:
        return reply(504, "5.5.1", "HELP: no such command here")
    return reply(214, "2.0.0", text)
