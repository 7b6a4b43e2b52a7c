"""greylisting: ask unknown senders to come back later; real mail servers do, spam engines rarely.

Each recipient of a message makes a *triplet*: the client's address (or its /24 or
/64 network with ``subnet``), the envelope sender, the recipient (each part can be
left out). A triplet never seen gets a temporary refusal
(``450 4.7.1 This mail is temporarily denied``) and is noted. A retry before
``black_timeout`` is refused again; a retry after it, but within ``grey_timeout`` of
the first attempt, passes, and the triplet becomes white: it passes at once for
``white_timeout`` after its last message (each message renews it). A triplet not
retried within ``grey_timeout`` is forgotten and starts over.

The triplets live in the shared store (``[store]``): every worker of the host sees
them, and with Redis every host behind the balancer, so a retry that lands elsewhere
still passes. If the store is unreachable, ``[store] fail`` decides (open: no
greylisting meanwhile; temp: 4xx).

Not greylisted: relay clients, whitelisted hosts and senders (``is_immune``), and
recipients in the ``whitelistrcpt`` note (the ``whitelist`` plugin, listed before
this one). A message from the null sender (a bounce, or an address-verification
probe) is refused at DATA instead of RCPT, so that probes, which never reach DATA,
get a straight answer. ``deny_late`` does the same for every message: all triplets
are noted at RCPT, and the message is refused at DATA
(``451 4.7.1 This mail is temporarily denied``).

Options (and the standard ``reject``: 0 notes triplets but refuses nothing, to seed
the store; ``reject_type`` defaults to ``temp``):
  remote_ip      include the client's address (default yes)
  subnet         use its /24 (IPv4) or /64 (IPv6) network instead (default no): for
                 senders that retry from another address of the same pool
  sender         include the envelope sender (default yes)
  recipient      include the recipient (default yes)
  black_timeout  retries sooner than this are refused (default 50m)
  grey_timeout   a first retry must come within this (default 200m, i.e. 3h20m)
  white_timeout  a passed triplet stays white this long after its last message (default 36d)
  deny_late      refuse at DATA rather than at RCPT (default no)
Durations are seconds, or a number with s, m, h, d or w.

Unlike qpsmtpd (remote_ip only, by default), the default here is the full triplet.

Example::

    [[greylisting]]
      black_timeout = 5m
      subnet = yes
"""

import ipaddress
import time

from qpgevent import store
from qpgevent.plugin import DECLINED, Plugin
from qpgevent.policy import duration

MESSAGE = "This mail is temporarily denied"
WHITE = "white"


class Greylisting(Plugin):
    reject_options = ("reject", "reject_type")
    default_reject_type = "temp"
    configspec = """
    remote_ip = boolean(default=True)
    subnet = boolean(default=False)
    sender = boolean(default=True)
    recipient = boolean(default=True)
    black_timeout = string(default="50m")
    grey_timeout = string(default="200m")
    white_timeout = string(default="36d")
    deny_late = boolean(default=False)
    """

    def setup(self):
        self.black = duration(self.config["black_timeout"])
        self.grey = duration(self.config["grey_timeout"])
        self.white = duration(self.config["white_timeout"])
        if self.grey <= self.black:
            raise ValueError(f"grey_timeout ({self.grey:g}s) must be longer than black_timeout ({self.black:g}s)")
        if self.white <= 0:
            raise ValueError("white_timeout must be longer than 0")

    def hook_rcpt(self, session, recipient, params):
        transaction = session.transaction
        if self.is_immune(session) or recipient.address.lower() in transaction.notes.get("whitelistrcpt", ()):
            return DECLINED
        try:
            passed = self.check(self.triplet(session, recipient))
        except store.StoreUnavailable as error:
            return store.degraded(self, error)
        if passed:
            return DECLINED
        if self.config["deny_late"] or transaction.sender is None or transaction.sender.is_null:
            transaction.results.add(self, fail="greylisted", late=True)  # refused at DATA
            return DECLINED
        transaction.results.add(self, fail="greylisted")
        return self.reject(MESSAGE, session)

    def hook_data(self, session):
        found = session.transaction.results.get(self)
        if found is not None and found.get("late") and not self.is_immune(session):
            return self.reject(MESSAGE, session)
        return DECLINED

    def triplet(self, session, recipient):
        parts = []
        if self.config["remote_ip"]:
            ip = session.connection.remote_ip
            if self.config["subnet"]:
                address = ipaddress.ip_address(ip)
                prefix = 24 if address.version == 4 else 64
                ip = str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
            parts.append(ip)
        if self.config["sender"]:
            sender = session.transaction.sender
            parts.append(sender.address.lower() if sender is not None else "")
        if self.config["recipient"]:
            parts.append(recipient.address.lower())
        return "greylist:" + " ".join(f"<{part}>" for part in parts)

    def check(self, key):
        """Whether the triplet passes now; notes a new one, whitens one retried in time."""
        shared = store.default()
        state = shared.get(key)
        now = time.time()
        if state == WHITE:
            shared.set(key, WHITE, self.white)
            return True
        if state is not None:
            age = now - float(state)
            if age < self.black:
                self.log.info("%s retried after %.0fs, before %gs: still grey", key, age, self.black)
                return False
            if age < self.grey:
                self.log.info("%s retried after %.0fs: white now", key, age)
                shared.set(key, WHITE, self.white)
                return True
        self.log.info("%s is new: grey", key)
        shared.set(key, repr(now), self.grey)
        return False
