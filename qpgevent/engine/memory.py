"""A conversation driven in memory: bytes in, the bytes a client would read out, no socket.

What the plugin harness, ``qpgevent plugin test`` and the transcript tests use to run the
real conversation (real protocol core, real hook runner, real reply table) without a
network. Time does not pass here: a requested pause (after a failed AUTH) is skipped,
and STARTTLS, which needs a socket, ends the conversation after its 220.
"""

from __future__ import annotations

from .conversation import Conversation
from .dialogue import CLOSE, FLUSH, READ, START_TLS


class InMemory:
    """Feeds a Conversation and collects what it says."""

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.closed = False  #: the conversation is over (the server closed)
        self.output = bytearray()  #: what the server said and nobody has read yet

    def open(self) -> None:
        """The client connects: the greeting (or a refusal) lands in ``output``."""
        self.conversation.open()
        self._run()

    def send(self, data: bytes) -> None:
        """The client writes ``data``; the replies land in ``output``."""
        if not self.closed:
            self.conversation.receive(data)
            self._run()

    def close(self) -> None:
        """The client goes away (if the server has not closed already)."""
        self.send(b"")

    def read(self) -> bytes:
        out = bytes(self.output)
        self.output.clear()
        return out

    def _run(self) -> None:
        conversation = self.conversation
        while not self.closed:
            request = conversation.next_request()
            self.output += conversation.out
            conversation.out.clear()
            if request is READ:
                return
            if request is CLOSE or request is START_TLS:
                self.closed = True
                conversation.end()
            elif request is not FLUSH:
                continue  # a Wait: no time passes in memory
