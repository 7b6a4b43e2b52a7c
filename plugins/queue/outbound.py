"""queue/outbound: keep each message in a durable queue, then deliver it by MX (or a route).

This is qpgevent's outbound MTA queue, Haraka's ``outbound`` and Postfix's qmgr + smtp
in one: the client gets 250 as soon as the message and its envelope are safe on disk;
one queue runner process (started and supervised by the master, like the workers)
delivers it, retries what is deferred, and sends failure notices. See docs/outbound.md
for what is supported and what is not yet.

Accepting. The message (as it will go out, our Received line included) and its
envelope (sender, recipients, per-recipient state, the DSN parameters RET, ENVID,
NOTIFY and ORCPT when the client gave them) are written into ``queue_dir``, each into a
temporary file, fsynced, renamed into place, and the folders fsynced: only then 250
(``2.0.0 queued as ID``). If that fails (disk full), the client gets 451 and keeps the
message. So it does if the disk holds an fsync past the hook's ``timeout`` (a sick disk):
an envelope not in ``env/`` yet never gets there, not even once the disk lets go (what was
written is removed then); one already there is taken back out (and ``env/`` fsynced) before
the 451, which then waits for the disk, and the runner does not try it meanwhile (it tries a
message only once its client's answer is decided). Nothing here checks who may relay: put
``rcpt_ok``/``relay`` (or AUTH) first.

Delivering. For each recipient domain, one SMTP transaction carrying all of its
recipients, to the route configured for the domain (``routes``), else to its MX hosts in
preference order (RFC 5321 5.1: equal preferences shuffled, every address of a host, A
and AAAA, before the next host; no MX: the domain's own address; a null MX, RFC 7505:
fails at once). A host that refuses the connection is skipped for the next. STARTTLS is
used whenever the next hop offers it (opportunistic, the certificate not checked unless
``tls_verify``), unless ``tls_policy``, an MTA-STS policy or DANE records ask for more. A 2xx delivers; a 5xx fails only the recipients it was said to; a 4xx or
a broken connection defers them.

Retries. The next attempt of a deferred message waits ``minimal_backoff``, doubling at
each attempt up to ``maximal_backoff``; after ``lifetime`` the pending recipients fail.

Once per recipient. Each transaction's outcome is written to disk (fsynced) before the
runner does anything else with the message, so a delivered recipient is never sent the
message again, across restarts and crashes too, with one exception: if the runner is
killed after a next hop said 250 and before that write (or the connection breaks after
our final dot, before its reply), those recipients get the message again on the next
attempt: **at most one duplicate**, never a loss.

DSN. The client's RFC 3461 parameters, as the core keeps them (``transaction.dsn_ret``,
``dsn_envid``, each recipient's ``notify`` and ``orcpt``), are queued with the message
and passed on to a next hop that offers DSN (RET and ENVID on MAIL, NOTIFY and ORCPT on
RCPT, as xtext); the bounces honour NOTIFY and RET and carry ENVID and ORCPT. A recipient
that asked NOTIFY=SUCCESS and was taken by a next hop without DSN gets the sender one
"relayed" report (RFC 3464 ``Action: relayed``; the recipients of one attempt together),
queued like a bounce; none when the next hop offers DSN (it got the request), none for
the null sender.

REQUIRETLS (RFC 8689). A message sent with REQUIRETLS (which the core takes only inside
TLS) is queued with the flag. The runner delivers it only to MX hosts of a DNSSEC-validated
MX answer or named by the domain's MTA-STS policy, only over TLS whose certificate it
verified (PKIX for the MX host's name, ``tls_ca_file`` or the system's CAs; or a DANE-EE
or DANE-TA TLSA match where the domain has DANE), to a server that offers REQUIRETLS, with
``REQUIRETLS`` on its MAIL. Otherwise (a server without REQUIRETLS; no server whose TLS
could be verified) its recipients fail with 5.7.10, never a delivery in clear or
unverified; the notice goes with REQUIRETLS too, and returns only the message's header.

Bounces. Failed recipients are reported to the sender in an RFC 3464 report
(``multipart/report``; the original message, or its header only for RET=HDRS), queued
in the same queue. NOTIFY=NEVER suppresses it. A message from the null sender gets no
bounce; its failures go to ``postmaster`` (a double bounce), and a failing double
bounce is only logged.

Options:
  queue_dir         the queue folder (default ``queue``, beside the ini file)
  fsync             fsync files and folders before saying 250 (default yes)
  routes            static routes that win over the MX records, as in
                    ``queue/smtp_forward``: ``DOMAIN:HOST[:PORT]`` (``*`` for all: a smarthost)
  port              the port of MX hosts (default 25)
  inet_protocols    all, ipv4 or ipv6: the address families to deliver over (default all)
  helo              our EHLO name (default: [server] me)
  starttls          auto (when offered, default), required, off
  tls_verify        check the next hop's certificate (default no: opportunistic TLS)
  tls_ca_file       CA certificates for tls_verify, MTA-STS and ``verify`` (default: the system's)
  tls_policy        TLS per destination domain, ``DOMAIN:LEVEL``: none (never STARTTLS),
                    may (when offered, unchecked), encrypt (TLS or defer), verify (TLS with
                    a certificate valid for the MX name, or defer); wins over MTA-STS and DANE
  mta_sts           honour MTA-STS policies (RFC 8461; default yes): an ``enforce``
                    domain gets only its listed MX hosts, over verified TLS; policies are
                    fetched over HTTPS and cached in ``queue_dir/mta-sts``
  dane              honour DANE TLSA records (RFC 7672; default yes) when the resolver
                    validates DNSSEC (the AD bit: point [dns] at a validating resolver):
                    TLS required, the certificate must match a DANE-EE (3 x x) record,
                    or chain to a DANE-TA (2 x x) anchor sent by the server and name the
                    MX host (DANE-TA needs the ``cryptography`` package: the ``outbound`` extra)
  tlsrpt            send SMTP TLS reports (RFC 8460; default no): every TLS session to a
                    domain's servers is counted (success, or the failure's result type)
                    under the policy in force (sts, tlsa, no-policy-found), in
                    ``queue_dir/tlsrpt``; once a period the domains whose ``_smtp._tls``
                    TXT record asks for reports get them: a mail (queued here) to each
                    ``mailto:``, a POST to each ``https:`` (``qpgevent queue tlsrpt``: now)
  tlsrpt_period     seconds a report covers (default 86400: a day, from midnight UTC)
  tlsrpt_from       the reports' sender and contact-info (default postmaster@[server] me)
  tlsrpt_organization   organization-name of the reports (default [server] me)
  auth_user, auth_password, auth_without_tls   AUTH to the routes (a smarthost), as in
                    ``queue/smtp_forward``
  destination_concurrency   connections at once per destination (default 10); idle ones
                    are reused for the next message to it
  max_deliveries    messages being delivered at once (default 100)
  minimal_backoff, maximal_backoff   seconds (300, 4000: Postfix's)
  lifetime          seconds a message may stay queued (default 432000: 5 days)
  delay_warning     seconds after which the sender is told, once, that a message is still
                    being retried (an RFC 3464 "delayed" report; default 0: never, as Postfix)
  scan_interval     the runner looks at the folder at least this often (default 10 s;
                    new messages wake it at once)
  postmaster        where double bounces go (default postmaster@[server] me)
  connect_timeout, command_timeout, data_timeout   seconds (30, 300, 600)

Example::

    [[rcpt_ok]]
    [[queue/outbound]]
      queue_dir = /var/spool/qpgevent/outbound
      routes = corp.example:10.0.0.5:25
"""

from qpgevent import disk
from qpgevent.outqueue import Queue, QueueError, Recipient
from qpgevent.plugin import DECLINED, DENYSOFT, OK, Plugin
from qpgevent.smtp_client import ClientOptions, ConfigurationError, parse_routes
from qpgevent.tls_policy import parse_levels


class Outbound(Plugin):
    configspec = """
queue_dir = path(default="queue")
fsync = boolean(default=True)
routes = force_list(default=list())
port = integer(min=1, max=65535, default=25)
inet_protocols = option("all", "ipv4", "ipv6", default="all")
helo = string(default="")
starttls = option("auto", "required", "off", default="auto")
tls_verify = boolean(default=False)
tls_ca_file = path(default="")
tls_policy = force_list(default=list())
mta_sts = boolean(default=True)
dane = boolean(default=True)
tlsrpt = boolean(default=False)
tlsrpt_period = float(min=1, default=86400)
tlsrpt_from = string(default="")
tlsrpt_organization = string(default="")
auth_user = string(default="")
auth_password = string(default="")
auth_without_tls = boolean(default=False)
destination_concurrency = integer(min=1, default=10)
max_deliveries = integer(min=1, default=100)
minimal_backoff = float(min=0, default=300)
maximal_backoff = float(min=0, default=4000)
lifetime = float(min=0, default=432000)
delay_warning = float(min=0, default=0)
scan_interval = float(min=0.05, default=10)
postmaster = string(default="")
connect_timeout = float(min=0.01, default=30)
command_timeout = float(min=0.01, default=300)
data_timeout = float(min=0.01, default=600)
"""

    def setup(self):
        try:
            parse_routes(self.config["routes"], 25) if self.config["routes"] else None
            ClientOptions.from_config(dict(self.config, forward_client=["none"]), lmtp=False)
            parse_levels(self.config["tls_policy"])
        except ConfigurationError as error:
            raise ValueError(str(error)) from None
        self.queue = Queue(self.config["queue_dir"], fsync=self.config["fsync"])

    def hook_queue(self, session):
        transaction = session.transaction
        recipients = [Recipient(r.address, notify=",".join(r.notify) if r.notify else None, orcpt=r.orcpt)
                      for r in transaction.recipients]
        sender = transaction.sender.address if transaction.sender is not None else ""
        connection = session.connection
        client = f"{connection.remote_host or connection.hello_host or 'unknown'} [{connection.remote_ip}]"
        try:
            # The hook's timeout (a disk that holds the fsyncs) may give up on the thread: before
            # the envelope enters env/ it stops there; after, the 4xx waits until it is taken back.
            envelope = disk.run_blocking_undoable(lambda: self.queue.enqueue(
                sender, recipients, transaction.message_chunks(), ret=transaction.dsn_ret, envid=transaction.dsn_envid,
                received_from=client, requiretls=transaction.requiretls, settling=True), self.queue.take_back)
        except QueueError as error:
            self.log.error("%s", error)
            return DENYSOFT, "4.3.0 cannot queue the message right now, try again later"
        self.queue.settle(envelope)  # 250 it is: the runner may take it now
        self.queue.kick()
        self.log.info("queued %s for %d recipient(s)", envelope.id, len(recipients))
        return OK, f"2.0.0 queued as {envelope.id}"
