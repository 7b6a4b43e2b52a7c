"""qpgevent: a plugin-driven SMTP server on gevent, in the tradition of qpsmtpd.

This module holds only the version: importing the package must not import socket,
ssl or threading, so that ``__main__`` can monkey-patch before anything else.
"""

__version__ = "0.1.0"
