"""Logging set-up, and the per-session logger that puts the connection id on every line."""

from __future__ import annotations

import logging
import sys
from typing import Any

FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def configure(level: str = "info", path: str = "") -> None:
    handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger("qpgevent")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class SessionLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes ``conn=<id>`` (and ``txn=<id>`` inside a transaction) to every message."""

    def __init__(self, logger: logging.Logger, session: Any) -> None:
        super().__init__(logger, {})
        self.session = session

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        prefix = f"conn={self.session.connection.id}"
        transaction = self.session.current_transaction
        if transaction is not None:
            prefix += f" txn={transaction.id}"
        return f"{prefix} {msg}", kwargs
