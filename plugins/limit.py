"""limit: rate and concurrency limits per client, per sender, per connection.

Counts live in the shared store (``[store]``), so they hold across the workers of a
host, and with Redis across hosts. Rates are exact sliding windows; concurrency uses
leases, which free themselves within ``[store] lease_ttl`` when a worker dies, so a
crash never leaves an address locked out.

At connect (refusals close the connection with ``421``):
- ``concurrency``: sessions open at once from one address;
  ``Too many concurrent connections from 192.0.2.7``;
- ``rate_conn``: new connections from one address per period;
  ``Connection rate limit exceeded for 192.0.2.7``.
At RCPT (refusals are ``452 4.5.3`` (RFC 5321 4.5.3.1.10) / ``450 4.7.1``; the client may try the rest later):
- ``recipients``: recipients in one connection, all its messages together;
  ``Too many recipients``;
- ``rate_rcpt_host``: recipients from one address per period;
  ``Recipient rate limit exceeded for 192.0.2.7``;
- ``rate_rcpt_sender``: recipients from one envelope sender per period, whatever the
  client (``<>`` is one sender); ``Recipient rate limit exceeded for <sender>``.

A rate is ``N/PERIOD``: ``20/5m`` is 20 per 5 minutes (periods in s, m, h, d); an
empty value or 0 turns a limit off. Relay clients, whitelisted hosts and the
``exempt`` networks have no limits. Refused attempts are not counted, so a client
that keeps trying gets through as soon as its window has room. If the store is
unreachable, ``[store] fail`` decides.

Options (Haraka's limit plugin names; and ``reject``, ``reject_type`` defaulting to
``temp``: limits are about time, not about the mail):
  concurrency       sessions at once per address (default 0: no limit)
  rate_conn         connections per address per period
  recipients        recipients per connection (default 0: no limit)
  rate_rcpt_host    recipients per address per period
  rate_rcpt_sender  recipients per envelope sender per period
  exempt            addresses / networks without limits

Notes:
  connection.notes["limit_lease"]       the concurrency lease this session holds
  connection.notes["limit_recipients"]  recipients of this connection's finished transactions

Example::

    [[limit]]
      concurrency = 5
      rate_conn = 30/1m
      rate_rcpt_sender = 200/1h
"""

from qpgevent import store
from qpgevent.plugin import DECLINED, Plugin, ip_in
from qpgevent.policy import networks, rate

LEASE = "limit_lease"  #: connection note: the concurrency lease this session holds
DONE_RECIPIENTS = "limit_recipients"  #: connection note: recipients of finished transactions


class Limit(Plugin):
    reject_options = ("reject", "reject_type")
    default_reject_type = "temp"
    configspec = """
    concurrency = integer(min=0, default=0)
    rate_conn = string(default="")
    recipients = integer(min=0, default=0)
    rate_rcpt_host = string(default="")
    rate_rcpt_sender = string(default="")
    exempt = force_list(default=list())
    """

    def setup(self):
        self.rate_conn = rate(self.config["rate_conn"])
        self.rate_rcpt_host = rate(self.config["rate_rcpt_host"])
        self.rate_rcpt_sender = rate(self.config["rate_rcpt_sender"])
        self.exempt = networks(self.config["exempt"])

    def exempted(self, session):
        return self.is_immune(session) or ip_in(session.connection.remote_ip, self.exempt)

    def hook_connect(self, session):
        if self.exempted(session):
            return DECLINED
        ip = session.connection.remote_ip
        shared = store.default()
        try:
            if self.rate_conn:
                count, period = self.rate_conn
                if shared.hit(f"limit:conn:{ip}", count, period) > count:
                    return self.reject(f"Connection rate limit exceeded for {ip}", session)
            if self.config["concurrency"]:
                lease = shared.acquire(f"limit:concurrency:{ip}", self.config["concurrency"])
                if lease is None:
                    return self.reject(f"Too many concurrent connections from {ip}", session)
                session.connection.notes[LEASE] = lease
        except store.StoreUnavailable as error:
            return store.degraded(self, error)
        return DECLINED

    def hook_disconnect(self, session):
        lease = session.connection.notes.pop(LEASE, None)
        if lease is None:
            return
        try:
            store.default().release(lease)
        except store.StoreUnavailable as error:
            self.log.warning("lease not released (it lapses on its own): %s", error)

    def hook_reset_transaction(self, session):
        notes = session.connection.notes
        notes[DONE_RECIPIENTS] = notes.get(DONE_RECIPIENTS, 0) + len(session.transaction.recipients)

    def hook_rcpt(self, session, recipient, params):
        if self.exempted(session):
            return DECLINED
        notes, transaction = session.connection.notes, session.transaction
        limit = self.config["recipients"]
        if limit and notes.get(DONE_RECIPIENTS, 0) + len(transaction.recipients) >= limit:
            return self.reject("452 4.5.3 Too many recipients", session)  # RFC 5321 4.5.3.1.10
        ip = session.connection.remote_ip
        shared = store.default()
        try:
            if self.rate_rcpt_host:
                count, period = self.rate_rcpt_host
                if shared.hit(f"limit:rcpt_host:{ip}", count, period) > count:
                    return self.reject(f"Recipient rate limit exceeded for {ip}", session)
            if self.rate_rcpt_sender:
                count, period = self.rate_rcpt_sender
                sender = transaction.sender.address.lower() if transaction.sender is not None else ""
                if shared.hit(f"limit:rcpt_sender:<{sender}>", count, period) > count:
                    return self.reject(f"Recipient rate limit exceeded for <{sender}>", session)
        except store.StoreUnavailable as error:
            return store.degraded(self, error)
        return DECLINED
