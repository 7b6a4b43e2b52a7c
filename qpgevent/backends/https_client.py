"""One HTTPS request for the outbound queue's policies and reports: MTA-STS fetches, TLS-RPT POSTs.

Owns how those reach a web server: the host's addresses come from qpgevent's resolver
(the lab's or the operator's ``[dns]``, not the system's), tried in turn until one
answers; the certificate is checked for the host name, against ``ca_file`` or the
system's CAs; no proxies, no redirects followed (RFC 8461 3.3); ``timeout`` bounds the
connection and each read; at most ``limit`` bytes of the answer are read.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass

from . import dns as qdns

__all__ = ["HttpsError", "Response", "request"]


class HttpsError(Exception):
    """No address of the host gave an answer; ``certificate``: a certificate check failed."""

    def __init__(self, message: str, certificate: bool = False) -> None:
        super().__init__(message)
        self.certificate = certificate


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    content_type: str  #: without parameters, lower case
    body: bytes


def request(method: str, host: str, port: int, path: str, *, ca_file: str, timeout: float, limit: int,
            body: bytes | None = None, content_type: str = "") -> Response:
    context = ssl.create_default_context(cafile=ca_file or None)
    try:
        addresses = qdns.addresses(host)
    except qdns.TemporaryFailure as error:
        raise HttpsError(f"{host}: {error}") from None
    failures, certificate = [], False
    for address in addresses:
        headers = {"Host": host} | ({"Content-Type": content_type} if content_type else {})
        try:
            raw = socket.create_connection((address, port), timeout=timeout)
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
            connection.sock = context.wrap_socket(raw, server_hostname=host)
            try:
                connection.request(method, path, body=body, headers=headers)
                answer = connection.getresponse()
                data = answer.read(limit)
            finally:
                connection.close()
        except (OSError, http.client.HTTPException) as error:
            certificate = certificate or isinstance(error, ssl.SSLCertVerificationError)
            failures.append(f"[{address}]: {error}")
            continue
        kind = (answer.getheader("Content-Type") or "").split(";")[0].strip().lower()
        return Response(answer.status, answer.reason, kind, data)
    raise HttpsError(f"{host}: {'; '.join(failures) or 'no address'}", certificate)
