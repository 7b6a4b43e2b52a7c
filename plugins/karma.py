"""karma: remember how each client address behaved, and treat it accordingly.

During a session, karma keeps a score in the connection note ``karma``: it listens to
the verdicts of the other plugins (the ``deny`` and ``ok`` notifications) and adds the
points ``scores`` gives them; any plugin may add to the note too (qpsmtpd's
``adjust_karma``). When the session ends, its score goes into the client address's
history in the shared store: a session below 0 counts as *naughty*, above 0 as
*nice*. The address's karma is nice - naughty; it is put in the connection note
``karma_history`` at connect, for other plugins to read.

What it does with it:
- the penalty box: a naughty session that leaves its address at ``-negative`` or
  below sends the address to the penalty box for ``penalty_days``; its connections
  are then refused at connect: ``You were naughty. You are penalized for 0.99 more
  days.`` (as the standard ``reject`` / ``reject_type`` say);
- tarpitting: while the address's karma plus this session's score is below 0, each
  reply at connect, HELO, MAIL, RCPT and DATA waits ``tarpit_delay`` seconds per
  point below 0, at most ``tarpit_max``: slow for spam engines, harmless for MTAs;
- recipients: a client with negative history may give at most
  ``naughty_recipients`` recipients per message (``450 4.5.3 too many recipients
  for karma -2``).

Relay clients and whitelisted hosts are neither scored nor refused. If the store is
unreachable, ``[store] fail`` decides at connect; history updates are then lost
(logged).

Scores: entries ``PLUGIN CODE POINTS``; PLUGIN is a plugin label or a glob
(``*``, ``queue/*``), CODE is OK, DENY, DENYSOFT, DENY_DISCONNECT or
DENYSOFT_DISCONNECT. The first entry that matches a verdict gives its points;
internal errors (a plugin that crashed) never count. The defaults score hard
refusals and reward delivered mail; temporary refusals (greylisting, rate limits)
score 0, so a legitimate first-time sender is never penalized for them.

Fixed from qpsmtpd: the history is nice minus naughty (its ``$nice || 0 - $naughty``
was nice alone), and a session of score +1 counts as nice (it needed +2).

Options (and the standard ``reject`` / ``reject_type``):
  negative            history at or below -N after a naughty session: penalty box (default 1)
  penalty_days        days in the penalty box (default 1; fractions allowed)
  history             how long an address's counts are kept after its last session (default 30d)
  scores              see above (default "* DENY -1", "* DENY_DISCONNECT -2", "queue* OK 1")
  tarpit_delay        seconds per point of bad karma (default 1; 0: no tarpit)
  tarpit_max          longest delay of one reply, seconds (default 5)
  naughty_recipients  recipients per message for negative history (default 1; 0: no limit)

Notes:
  connection.notes["karma"]          this session's score; any plugin may add to it
  connection.notes["karma_history"]  the address's karma (nice - naughty), set at connect

Example::

    [[karma]]
      negative = 2
      penalty_days = 0.5
      scores = "* DENY -1", "dnsbl DENY -3", "queue* OK 1"
"""

import fnmatch
import time

import gevent

from qpgevent import store
from qpgevent.plugin import DECLINED, DENYSOFT, Plugin, ReturnCode
from qpgevent.policy import duration

SCORED = {code.name: code for code in (ReturnCode.OK, ReturnCode.DENY, ReturnCode.DENYSOFT,
                                       ReturnCode.DENY_DISCONNECT, ReturnCode.DENYSOFT_DISCONNECT)}


def parse_scores(entries):
    rules = []
    for entry in entries:
        words = entry.split()
        if len(words) != 3 or words[1].upper() not in SCORED:
            raise ValueError(f"score {entry!r}: write PLUGIN CODE POINTS, CODE one of {', '.join(SCORED)}")
        try:
            points = int(words[2])
        except ValueError:
            raise ValueError(f"score {entry!r}: POINTS must be a whole number") from None
        rules.append((words[0], SCORED[words[1].upper()], points))
    return rules


class Karma(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = """
    negative = integer(min=1, default=1)
    penalty_days = float(min=0, default=1)
    history = string(default="30d")
    scores = force_list(default=list("* DENY -1", "* DENY_DISCONNECT -2", "queue* OK 1"))
    tarpit_delay = float(min=0, default=1)
    tarpit_max = float(min=0, default=5)
    naughty_recipients = integer(min=0, default=1)
    """

    def setup(self):
        self.history = duration(self.config["history"])
        self.scores = parse_scores(self.config["scores"])

    # -- the history ---------------------------------------------------------
    def hook_connect(self, session):
        notes = session.connection.notes
        notes.setdefault("karma", 0)
        if self.is_immune(session):
            return DECLINED
        ip = session.connection.remote_ip
        shared = store.default()
        try:
            penalty = shared.get(f"karma:penalty:{ip}")
            nice = int(shared.get(f"karma:nice:{ip}") or 0)
            naughty = int(shared.get(f"karma:naughty:{ip}") or 0)
        except store.StoreUnavailable as error:
            return store.degraded(self, error)
        notes["karma_history"] = nice - naughty
        if penalty is not None:
            left = self.config["penalty_days"] - (time.time() - float(penalty)) / 86400
            if left > 0:
                self.log.info("%s is in the penalty box: %d naughty, %d nice", ip, naughty, nice)
                return self.reject(f"You were naughty. You are penalized for {left:.2f} more days.", session)
        self.tarpit(session)
        return DECLINED

    def hook_disconnect(self, session):
        notes = session.connection.notes
        score = notes.get("karma", 0)
        if "karma_history" not in notes or self.is_immune(session) or not score:
            return
        ip = session.connection.remote_ip
        shared = store.default()
        try:
            if score < 0:
                naughty = shared.incr(f"karma:naughty:{ip}", 1, self.history)
                history = int(shared.get(f"karma:nice:{ip}") or 0) - naughty
                if history <= -self.config["negative"] and self.config["penalty_days"] > 0:
                    shared.set(f"karma:penalty:{ip}", repr(time.time()), self.config["penalty_days"] * 86400)
                    self.log.info("%s: session karma %d, history %d: penalty box", ip, score, history)
                    return
            else:
                history = shared.incr(f"karma:nice:{ip}", 1, self.history) - int(
                    shared.get(f"karma:naughty:{ip}") or 0)
        except store.StoreUnavailable as error:
            self.log.warning("karma of %s not recorded: %s", ip, error)
            return
        self.log.info("%s: session karma %d, history %d", ip, score, history)

    # -- scoring other plugins -----------------------------------------------
    def hook_deny(self, session, verdict):
        self._score(session, verdict)

    def hook_ok(self, session, verdict):
        self._score(session, verdict)

    def _score(self, session, verdict):
        if verdict.internal_error or verdict.plugin == self.name or session is None:
            return
        for pattern, code, points in self.scores:
            if code is verdict.code and fnmatch.fnmatchcase(verdict.plugin or "", pattern):
                if points:
                    notes = session.connection.notes
                    notes["karma"] = notes.get("karma", 0) + points
                    self.log.debug("%s %s: karma %+d, now %d", verdict.plugin, code.name, points, notes["karma"])
                return

    # -- treatment -------------------------------------------------------------
    def karma(self, session):
        notes = session.connection.notes
        return notes.get("karma_history", 0) + notes.get("karma", 0)

    def tarpit(self, session):
        karma = self.karma(session)
        if karma >= 0 or not self.config["tarpit_delay"] or self.is_immune(session):
            return
        delay = min(self.config["tarpit_max"], -karma * self.config["tarpit_delay"])
        self.log.debug("tarpit: karma %d, waiting %.2fs", karma, delay)
        gevent.sleep(delay)

    def hook_helo(self, session, host):
        self.tarpit(session)

    def hook_ehlo(self, session, host):
        self.tarpit(session)

    def hook_mail(self, session, sender, params):
        self.tarpit(session)

    def hook_rcpt(self, session, recipient, params):
        self.tarpit(session)
        limit = self.config["naughty_recipients"]
        history = session.connection.notes.get("karma_history", 0)
        if limit and history < 0 and len(session.transaction.recipients) >= limit and not self.is_immune(session):
            return DENYSOFT, f"4.5.3 too many recipients for karma {history}"
        return DECLINED

    def hook_data(self, session):
        self.tarpit(session)
