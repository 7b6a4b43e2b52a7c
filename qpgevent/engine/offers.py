"""What a session offers its client now: the EHLO keywords and the verbs HELP lists.

The core's, as far as this moment of the session allows (STARTTLS before TLS and not after,
REQUIRETLS only inside TLS, AUTH until the client has authenticated), then the ones plugins
add (``runner.extensions``: keywords, verbs and their help) and the ``capabilities`` a plugin
noted for this connection (xclient's XCLIENT/XFORWARD, to its upstreams only).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.help import CORE_HELP
from .dialogue import Dialogue

#: The core's verbs, in the order HELP lists them.
CORE_VERBS = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "VRFY", "NOOP", "HELP", "QUIT")


def ehlo_keywords(conversation: Dialogue, mechanisms: Sequence[str]) -> list[str]:
    """The EHLO keywords we offer (RFC 5321 4.1.1.1), plus the ones plugins add;
    ``mechanisms``: the SASL mechanisms offered now."""
    connection = conversation.session.connection
    size = conversation.settings.max_message_size
    offered = ["PIPELINING", f"SIZE {size}" if size else "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES",
               "CHUNKING", "BINARYMIME", "SMTPUTF8", "DSN"]  # RFC 3030: BDAT, and BODY=BINARYMIME with it
    if conversation.tls_offered and not connection.tls:
        offered.append("STARTTLS")
    if connection.tls:
        offered.append("REQUIRETLS")  # RFC 8689 4: only inside TLS
    if mechanisms and not conversation.protocol.authenticated:
        offered.append("AUTH " + " ".join(mechanisms))
    offered += conversation.runner.extensions.keywords
    offered += list(connection.notes.get("capabilities", ()))
    return offered


def verbs(conversation: Dialogue, mechanisms: Sequence[str]) -> list[str]:
    """The verbs this session answers: the core's it offers now, then the plugins'."""
    offered = list(CORE_VERBS)
    if conversation.tls_offered and not conversation.session.connection.tls:
        offered.append("STARTTLS")
    if mechanisms and not conversation.protocol.authenticated:
        offered.append("AUTH")
    if conversation.runner.has("expn"):
        offered.append("EXPN")
    return offered + sorted(conversation.runner.extensions.verbs)


def help_texts(conversation: Dialogue, mechanisms: Sequence[str]) -> dict[str, str]:
    """HELP's text for each verb offered now: the core's, a plugin's own, or a plain line."""
    extensions = conversation.runner.extensions
    texts = {verb: CORE_HELP[verb] for verb in verbs(conversation, mechanisms) if verb in CORE_HELP}
    texts.update(extensions.help_texts)
    for verb in extensions.verbs - texts.keys():
        texts[verb] = f"{verb}: a command added by a plugin"
    return texts
