"""queue/smtp_forward: forward each message to a next-hop SMTP server (a smarthost, Postfix...).

The client gets 250 only once the next hop has said 250 to the end of DATA; if it cannot
be reached, breaks off, or answers 4xx, the client gets 4xx and retries; a 5xx from the
next hop is passed on as a 5xx with its words (``554`` after DATA, ``550`` at RCPT).
Never both: a message is never delivered and also refused.

qpsmtpd called this plugin ``smtp-forward``; plugin names here are Python file names,
so it is ``queue/smtp_forward`` (Haraka's name too). Compared with qpsmtpd's, it adds
routes per domain, failover, STARTTLS, AUTH, a connection pool, XFORWARD, and it reads
the reply to every recipient (qpsmtpd's dropped refused recipients without a word).

Recipients. A recipient the next hop refuses must not vanish. With ``callahead = yes``
each RCPT is checked with the next hop at once (MAIL, RCPT, then RSET on a pooled
connection), and its refusal becomes ours, word for word, to that recipient only. At
queue time every recipient is asked again; if one is refused then (it changed in
between, or callahead is off), nothing is sent and the whole message gets 4xx (5xx when
every recipient was refused for good): see ``qpgevent/backends/smtp_client.py``.

One next hop per transaction: a recipient whose route differs from the route of the
recipients already accepted gets ``450 4.5.3`` and the client sends it separately.

**Order matters**: put this plugin *before* ``rcpt_ok`` (or any plugin that accepts
recipients) in ``[plugins]``, so that its rcpt hook sees every recipient. It never
accepts a recipient by itself (it says DECLINED when the next hop would take it), so
``rcpt_ok`` still decides who may relay.

Options:
  routes            where mail goes, by recipient domain: ``DOMAIN:HOST[:PORT]``, comma
                    separated; ``.example.test`` covers subdomains, ``*`` the rest; IPv6
                    in brackets. E.g. ``routes = example.test:127.0.0.1:2526, *:smarthost:25``.
                    Failover: ``*:mx1:25|mx2:25`` opens new connections to the first of
                    them that answers (connect, greeting, EHLO, STARTTLS). Host names are
                    looked up through ``[dns]``'s servers (then the system's resolver,
                    for names only /etc/hosts knows)
  callahead         check each recipient with the next hop at RCPT time (default no)
  helo              our name in EHLO (default: [server] me)
  starttls          auto: use it when offered (default); required: refuse to talk
                    without it (4xx); off: never
  tls_verify        verify the next hop's certificate and name (default yes); a failed
                    verification is a 4xx, never a fall-back to plain text
  tls_ca_file       CA certificates to verify with (default: the system's)
  auth_user, auth_password   log in to the next hop (AUTH, only over TLS unless
                    ``auth_without_tls = yes``); a refused login is a 4xx
  forward_client    tell the next hop who the client is, with the first of these that
                    its EHLO offers: ``xclient`` (Postfix then applies its rules to the
                    client, as if it had connected itself; needs
                    smtpd_authorized_xclient_hosts, and costs the connection reuse: Postfix
                    takes one XCLIENT per connection), ``xforward`` (logging only; the
                    default), or ``none``
  pool_size         connections per route open at once, per worker (default 10);
                    idle ones are kept and reused, reset (RSET) first, dropped if dead
  pool_wait         seconds to wait for a free connection when all are busy (default 10)
  idle_timeout      seconds an idle connection is kept (default 60)
  connect_timeout, command_timeout, data_timeout   seconds (10, 60, 600: RFC 5321 4.5.3.2)
  timeout           the standard hook timeout; by default the sum of the above, so that
                    a slow next hop is waited for rather than cut off mid-reply

Example::

    [[queue/smtp_forward]]
      routes = example.test:127.0.0.1:2526, *:smarthost.example.net:587
      callahead = yes
      auth_user = relay
      auth_password = s3cret
    [[rcpt_ok]]
      domains = example.test
"""

from qpgevent.smtp_client import RelayPlugin


class SmtpForward(RelayPlugin):
    lmtp = False
