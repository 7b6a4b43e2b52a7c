"""The SMTP client side of the directory tests: AUTH over STARTTLS, and RCPT replies (smtplib)."""

from __future__ import annotations

import smtplib


def auth_reply(server, user: str, password: str, mechanism: str = "PLAIN") -> tuple[int, bytes]:
    """STARTTLS, EHLO, then AUTH PLAIN (initial response) or LOGIN: the server's final reply."""
    with server.smtp(timeout=30) as client:
        client.starttls(context=server.certs.client_context())
        client.ehlo()
        client.user, client.password = user, password
        method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        try:
            return client.auth(mechanism, method, initial_response_ok=mechanism == "PLAIN")
        except smtplib.SMTPAuthenticationError as error:
            return error.smtp_code, error.smtp_error


def auth_code(server, user: str, password: str, mechanism: str = "PLAIN") -> int:
    return auth_reply(server, user, password, mechanism)[0]


def rcpt_replies(server, *recipients: str) -> list[tuple[int, bytes]]:
    """One transaction from sender@example.net: the reply to each RCPT."""
    with server.smtp(timeout=30) as client:
        client.ehlo()
        client.mail("sender@example.net")
        return [client.rcpt(recipient) for recipient in recipients]
