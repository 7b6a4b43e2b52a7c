"""xclient: Postfix's XCLIENT and XFORWARD commands, for trusted upstreams only.

When qpgevent sits behind Postfix (or another proxy or content filter), every client it
sees is that upstream. The upstream can tell us who the real client is:

* ``XCLIENT attr=value ...`` (Postfix's XCLIENT_README) replaces this connection's client
  attributes and starts the session over with a new ``220`` greeting; the upstream must
  say EHLO again. ``ADDR`` becomes ``connection.remote_ip``, ``PORT`` ``remote_port``,
  ``NAME`` ``remote_host`` (``[UNAVAILABLE]``/``[TEMPUNAVAIL]``: none), ``DESTADDR`` /
  ``DESTPORT`` ``local_ip`` / ``local_port``, and ``LOGIN`` makes the client an
  authenticated one (``notes["auth_user"]``, ``auth_method`` ``XCLIENT``, a relay client).
  Every attribute given (``PROTO``, ``HELO``... too) is kept, by lower-case name, in
  ``connection.notes["xclient"]``; the upstream's own address in
  ``connection.notes["xclient_upstream"]``. It is a new client, as in Postfix: the
  upstream's session ends for the plugins (the disconnect hook), nothing they noted or
  decided about the upstream carries over (a relay client, a whitelisted host: only LOGIN
  makes the new client a relay client), and the pre_connection and connect hooks judge the
  new client (dnsbl, hosts_allow, relay...); their refusal is the reply to XCLIENT.
* ``XFORWARD attr=value ...`` (Postfix's XFORWARD_README) records the original client of
  the next message only: ``NAME``, ``ADDR``, ``PORT``, ``PROTO``, ``HELO``, ``IDENT`` and
  ``SOURCE`` are moved at MAIL into ``transaction.notes["xforward"]`` (lower-case names,
  unavailable values as None), forgotten when the transaction ends (or at RSET). Our ``Received:``
  line then says ``from HELO (NAME [ADDR])`` of the original client.

Both are offered in the EHLO reply (with the attribute names, as Postfix does) only to
clients in ``xclient_hosts`` / ``xforward_hosts``; judged by the address the connection
came from, so it stays allowed after XCLIENT changed the address. To anyone else both
verbs get ``500 5.5.1 Unrecognized command``, the reply of any unknown verb. Values are
xtext (RFC 1891: ``+2B`` is "+"); a bad attribute gets ``501``, and either command
inside a mail transaction ``503``.

Options:
  xclient_hosts   addresses / networks that may send XCLIENT (default: none)
  xforward_hosts  addresses / networks that may send XFORWARD (default: none)

Postfix on the same host relaying to us with ``smtp_send_xforward_command = yes``.

Example::

    [[xclient]]
      xforward_hosts = 127.0.0.1, ::1
"""

import ipaddress
import re

from qpgevent.plugin import DECLINED, DENY, DONE, OK, Plugin, ip_in

UNKNOWN_VERB = "500 5.5.1 Unrecognized command"
ATTRIBUTES = {
    "XCLIENT": ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT"),
    "XFORWARD": ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE"),
}
UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
_XTEXT = re.compile(r"\+([0-9A-F]{2})")


class Xclient(Plugin):
    configspec = """
    xclient_hosts = force_list(default=list())
    xforward_hosts = force_list(default=list())
    """
    verbs = ("XCLIENT", "XFORWARD")

    def setup(self):
        self.hosts = {verb: [ipaddress.ip_network(n, strict=False) for n in self.config[f"{verb.lower()}_hosts"]]
                      for verb in ATTRIBUTES}

    def hook_connect(self, session):
        notes = session.connection.notes
        # Judged once, by the upstream's address: the client XCLIENT names inherits it.
        allowed = notes.setdefault("xclient_allowed", [
            verb for verb, hosts in self.hosts.items() if ip_in(session.connection.remote_ip, hosts)])
        capabilities = notes.setdefault("capabilities", [])
        capabilities += [f"{verb} {' '.join(ATTRIBUTES[verb])}" for verb in allowed]
        return DECLINED

    def hook_command(self, session, verb, argument):
        if verb not in ATTRIBUTES:
            return DECLINED
        if verb not in session.connection.notes.get("xclient_allowed", ()):
            return DENY, UNKNOWN_VERB
        transaction = session.current_transaction
        if transaction is not None and transaction.sender is not None:
            return DENY, "503 5.5.1 Error: MAIL transaction in progress"
        attributes = parse(argument, ATTRIBUTES[verb])
        if isinstance(attributes, str):
            return DENY, f"501 5.5.4 Bad {verb} syntax: {attributes}"
        if verb == "XFORWARD":
            session.connection.notes.setdefault("xforward", {}).update(attributes)
            return OK, "2.0.0 Ok"
        client = self.new_client(session.connection, attributes)
        if isinstance(client, str):
            return DENY, f"501 5.5.4 Bad XCLIENT attribute: {client}"
        self.log.info("XCLIENT from %s: the client is now %s", client.notes["xclient_upstream"], client.peer)
        session.restart(client)
        return DONE

    def new_client(self, connection, attributes):
        """The client XCLIENT describes (the upstream's values for what it leaves out), or a
        description of what is wrong."""
        ports = {}
        for name in ("PORT", "DESTPORT"):
            if attributes.get(name.lower()):
                if not attributes[name.lower()].isdigit() or int(attributes[name.lower()]) > 65535:
                    return f"{name}={attributes[name.lower()]}"
                ports[name] = int(attributes[name.lower()])
        addresses = {}
        for name in ("ADDR", "DESTADDR"):
            value = attributes.get(name.lower())
            if value:
                value = value[5:] if value.upper().startswith("IPV6:") else value
                try:
                    addresses[name] = str(ipaddress.ip_address(value))
                except ValueError:
                    return f"{name}={value}"
        old = connection.notes
        client = connection.successor(
            remote_ip=addresses.get("ADDR", connection.remote_ip),
            remote_port=ports.get("PORT", connection.remote_port),
            local_ip=addresses.get("DESTADDR", connection.local_ip),
            local_port=ports.get("DESTPORT", connection.local_port),
            remote_host=attributes.get("name") if "name" in attributes else connection.remote_host)
        client.notes.update(xclient_upstream=old.get("xclient_upstream", connection.peer),
                            xclient={**old.get("xclient", {}), **attributes},
                            xclient_allowed=old.get("xclient_allowed", []))
        if attributes.get("login"):
            client.notes["auth_user"], client.notes["auth_method"] = attributes["login"], "XCLIENT"
            client.relay_client = True
        return client

    def hook_mail(self, session, sender, params):
        forwarded = session.connection.notes.pop("xforward", None)
        if forwarded:
            session.transaction.notes["xforward"] = forwarded
        return DECLINED

    def hook_rset(self, session):
        session.connection.notes.pop("xforward", None)  # RSET forgets them too, as Postfix does
        return DECLINED

    def hook_received_line(self, session, line):
        forwarded = session.transaction.notes.get("xforward") or {}
        if not forwarded.get("addr"):
            return DECLINED
        rest = line.split("\n", 1)[1]
        helo, name, address = (printable(forwarded.get(key) or "unknown") for key in ("helo", "name", "addr"))
        return OK, f"from {helo} ({name} [{address}])\n{rest}"


def parse(argument, names):
    """``{name: value}`` (lower-case names, xtext decoded, unavailable values as None), or a
    description of what is wrong."""
    attributes = {}
    words = argument.split()
    if not words:
        return "no attributes"
    for word in words:
        name, equals, value = word.partition("=")
        if not equals or name.upper() not in names:
            return word[:40]
        decoded = _XTEXT.sub(lambda match: chr(int(match.group(1), 16)), value)
        attributes[name.lower()] = None if decoded.upper() in UNAVAILABLE else decoded
    return attributes


def printable(text):
    """Upstream text fit for our Received comment (as the engine cleans a client's)."""
    return "".join(c if c.isprintable() and c not in "()[]" else "?" for c in text)[:255]
