"""The engine: every decision of the SMTP dialogue, sans I/O. The conversation (``conversation``,
with its parts ``authentication``, ``mail``, ``sasl``, ``received``), the ``Session`` plugins get,
the hook table and the one hook runner (``hooks``), the extension points plugins declare
(``extensions``), the loader, and an in-memory driver (``memory``). No sockets, no gevent:
the server side drives it (``qpgevent.server.driver``)."""
