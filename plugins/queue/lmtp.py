"""queue/lmtp: deliver each message over LMTP (RFC 2033) to a mail store, e.g. Dovecot.

LMTP answers once per recipient after DATA (RFC 2033 4.2). SMTP gives our client one
reply for the whole message, so the answers are folded into it:

- every recipient took it: ``250`` with the first answer's words;
- none did: their refusal is passed on, ``554`` if all were permanent, else ``451``;
- some did and some did not (a full mailbox, say): ``451``. The recipients that took it
  have it now, and the client's retry gives them a second copy; answering 250 instead
  would lose the message for the others without a word. Duplicates are the lesser
  evil (RFC 5321 6.1); the log says who has it. To make this rare, turn on
  ``callahead``: each recipient is then checked with the LMTP server at RCPT time
  (LHLO, MAIL, RCPT, RSET on a pooled connection) and its refusal goes to that recipient
  alone. With Dovecot, set ``lmtp_rcpt_check_quota = yes`` so that a full mailbox is
  refused at RCPT time too.

Before DATA, a refused recipient stops the whole delivery the same way (nothing is sent,
RSET, 4xx or 5xx), as in ``queue/smtp_forward``. Connections are pooled per route and
reused (RSET first; dead ones dropped). A recipient whose route differs from the
recipients before it in the transaction gets ``450 4.5.3`` (send it separately), so one
message goes to one LMTP server. Put this plugin before ``rcpt_ok`` in ``[plugins]`` so
that its rcpt hook sees every recipient; it never accepts a recipient itself.

Options (the same as ``queue/smtp_forward``; the defaults suit a local store):
  routes            ``DOMAIN:/path/to/socket`` (a unix socket) or ``DOMAIN:HOST[:PORT]``
                    (TCP, port 24 by default); ``*`` for every domain; ``A|B`` for
                    failover. E.g. ``routes = *:/var/run/dovecot/lmtp``
  callahead         check each recipient at RCPT time (default no)
  starttls, tls_verify, tls_ca_file, auth_user, auth_password, auth_without_tls,
  forward_client, pool_size, pool_wait, idle_timeout, connect_timeout, command_timeout,
  data_timeout, helo: as in ``queue/smtp_forward`` (STARTTLS is never tried on a unix
  socket)

Example::

    [[queue/lmtp]]
      routes = *:/var/run/dovecot/lmtp
      callahead = yes
    [[rcpt_ok]]
      domains = example.test
"""

from qpgevent.smtp_client import RelayPlugin


class Lmtp(RelayPlugin):
    lmtp = True
