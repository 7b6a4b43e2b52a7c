"""dnsbl: refuse clients whose address is listed on DNS blocklists; skip those on DNS whitelists.

At connect, the client's address is looked up in every zone of ``zones`` and
``whitelist_zones`` at once (RFC 5782: the reversed octets of an IPv4 address, the
reversed nibbles of an IPv6 one, in the zone; a listing is an A record in 127.0.0.0/8),
so five lists cost the wait of the slowest, not the sum (qpsmtpd asked them one after
another, 30 s each). With ``lookahead`` (the default) the questions go out as the client
connects (pre_connection), so their wait overlaps the core's reverse look-up of the
client (``[dns] reverse_lookup``) instead of following it (the pending answers wait in
the connection note ``dnsbl_lookahead`` until connect). Then:

- a client listed in a whitelist zone (DNSWL, qpsmtpd's ``dns_whitelist_soft``) is not
  refused, whatever the blocklists say; ``connection.notes["whitelisthost"]`` is set, so
  every plugin that honours ``is_immune`` (rhsbl, resolvable_fromhost...) skips it too.
  An answer ending in .255 (dnswl.org's 127.0.0.255: "query refused") is no listing;
- a client listed in a *reject* zone is refused, with the list's TXT record as reason:
  ``554 5.7.1 192.0.2.1 is listed in zen.example: <TXT>`` at connect, or
  ``550 5.7.1 ...`` at RCPT (see ``reject_at``);
- each *score* zone listing the client adds its score to the result's ``score``; the
  client is refused once the sum reaches ``score_threshold`` (0: scores never refuse,
  they are only noted for other plugins);
- a zone that cannot answer now (SERVFAIL, timeout) gives
  ``421 4.4.3 cannot check 192.0.2.1 against zen.example now, try again later`` unless
  a listing elsewhere already decides; ``fail_open = yes`` lets the client in instead.

Relay clients (``relay`` must come first in the plugin list), clients already
whitelisted (``whitelisthost``) and addresses in ``allow`` are not checked. With
``lookahead``, relay and whitelisted clients are still asked about (which they are is
known only at connect; the answers are not used): list them in ``allow`` to spare the
queries.

Where the refusal happens (``reject_at``):
  connect  (default) the greeting is the refusal: 554 and close. Cheapest.
  rcpt     the client is greeted; every RCPT is refused (550 5.7.1 with the listing),
           except to the ``exempt_recipients`` (postmaster, abuse: RFC 5321 4.5.1 and
           RFC 2142 ask that a blocked sender can still reach them), so the log shows
           the envelope of what was refused. qpsmtpd's dnsbl always did this. Put
           dnsbl before rcpt_ok. A DNS failure is deferred the same way (450 at RCPT).
``reject = naughty`` records the refusal as deferred at connect for the
naughty plugin to act on (a DNS failure too, as a temporary one); ``reject = 0`` only
logs, DNS failures included. ``reject_type`` chooses 5xx/4xx/disconnect as usual
(perm: 554 at connect, 550 at RCPT); a DNS failure is always temporary.

Options:
  zones               blocklist zones, each ``ZONE`` (a listing refuses) or
                      ``ZONE:score=N`` (a listing adds N); default none
  whitelist_zones     DNS whitelist zones (e.g. list.dnswl.org); default none
  score_threshold     refuse when the scores of the listing zones add up to this; 0: never
                      (default 0)
  reject_at           connect or rcpt (default connect)
  exempt_recipients   local parts that may always be reached at RCPT, any domain
                      (default postmaster, abuse)
  fail_open           a DNS failure lets the client in instead of 4xx (default no)
  allow               addresses/networks never looked up (default none)
  lookahead           ask at pre_connection, while the core looks up the client's name;
                      no: ask at connect (default yes)
  plus the standard reject, reject_type, loglevel, timeout

Results (``connection.results.get("dnsbl")``): ``fail`` the blocklist zones listing the
client, ``pass`` the zones that do not (and the whitelist zone that lists it), ``err``
the zones that did not answer; evidence:
  refusal      the refusal text, when the client is refused (also with reject = 0)
  listings     {zone: reason} of every blocklist zone listing the client
  score        the sum of the scores of the score zones listing the client
  whitelisted  the whitelist zone listing the client (also the note ``whitelisthost``,
               which ``is_immune`` reads)
  error        the DNS failure text, when the check could not be made

Example::

    [[relay]]
      clients = 192.0.2.0/24
    [[dnsbl]]
      zones = zen.spamhaus.org, b.barracudacentral.org:score=2, bl.spamcop.net:score=1
      score_threshold = 3
      whitelist_zones = list.dnswl.org
      reject_at = rcpt
    [[rcpt_ok]]
      domains = example.com
"""

import ipaddress
import re

from qpgevent import dns
from qpgevent.plugin import DECLINED, Plugin, ip_in

_ZONE = re.compile(r"^(?P<zone>[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+)\.?"
                   r"(?::score=(?P<score>\d+(?:\.\d+)?))?$")
#: The text a blocklist_reason gives when the zone has no TXT record for the address.
_NO_TXT = "listed in {zone}"


def parse_zone(entry, option="zones"):
    """``zen.example`` -> (zone, None); ``bl.example:score=2`` -> (zone, 2.0)."""
    match = _ZONE.match(entry.strip())
    if match is None or any(len(label) > 63 for label in match["zone"].split(".")):
        raise ValueError(f"{option}: {entry!r} is not ZONE or ZONE:score=N (N a number)")
    if option == "whitelist_zones" and match["score"] is not None:
        raise ValueError(f"{option}: {entry!r}: a whitelist zone takes no score")
    return match["zone"].lower(), None if match["score"] is None else float(match["score"])


class Dnsbl(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = """
    zones = force_list(default=list())
    whitelist_zones = force_list(default=list())
    score_threshold = float(min=0, default=0)
    reject_at = option("connect", "rcpt", default="connect")
    exempt_recipients = force_list(default=list("postmaster", "abuse"))
    fail_open = boolean(default=False)
    allow = force_list(default=list())
    lookahead = boolean(default=True)
    """

    def setup(self):
        self.zones = [parse_zone(entry) for entry in self.config["zones"]]
        self.whitelist_zones = [parse_zone(entry, "whitelist_zones")[0]
                                for entry in self.config["whitelist_zones"]]
        self.allow = [ipaddress.ip_network(n, strict=False) for n in self.config["allow"]]
        self.exempt = {user.lower() for user in self.config["exempt_recipients"]}
        scored = [zone for zone, score in self.zones if score is not None]
        if scored and not self.config["score_threshold"]:
            self.log.info("score zones %s only add to the result's score: score_threshold is 0",
                          ", ".join(scored))

    # -- pre_connection: ask ahead; connect: decide, refuse now or note for RCPT --
    def hook_pre_connection(self, session):
        ip = session.connection.remote_ip
        if self.config["lookahead"] and not ip_in(ip, self.allow) and (self.zones or self.whitelist_zones):
            session.connection.notes["dnsbl_lookahead"] = dns.ahead((self.ask, ip))
        return DECLINED

    def hook_connect(self, session):
        connection = session.connection
        ip = connection.remote_ip
        pending = connection.notes.pop("dnsbl_lookahead", None)
        if self.is_immune(session) or ip_in(ip, self.allow) or not (self.zones or self.whitelist_zones):
            if pending is not None:
                pending.cancel()
            return DECLINED
        refusal, failure = self.check(ip, connection, pending.result() if pending is not None else None)
        if refusal:
            connection.results.add(self, refusal=refusal)
        elif failure:
            connection.results.add(self, error=failure)
            if self.config["fail_open"]:
                self.log.warning("%s; letting the client in (fail_open)", failure)
                return DECLINED
        else:
            return DECLINED
        if self.config["reject_at"] == "rcpt" and self.config["reject"] == "1":
            return DECLINED  # hook_rcpt refuses
        return self._refuse(session)

    def ask(self, ip):
        """Every zone's answer for ``ip``, asked at once (a TemporaryFailure in place of one)."""
        calls = [(dns.blocklist_reason, ip, zone) for zone, _ in self.zones]
        calls += [(dns.blocklist, ip, zone) for zone in self.whitelist_zones]
        return dns.parallel(calls, return_exceptions=True)

    def check(self, ip, connection, answers=None):
        """Record what each zone said (``answers`` from ``ask``, asked now if None);
        (refusal text or None, DNS failure or None)."""
        results = connection.results
        if answers is None:
            answers = self.ask(ip)
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, dns.TemporaryFailure):
                raise answer  # a bug, not the DNS: the hook runner answers 451 and logs it
        blocked, allowed = answers[:len(self.zones)], answers[len(self.zones):]

        whitelist_failed = []
        for zone, listed in zip(self.whitelist_zones, allowed):
            if isinstance(listed, dns.TemporaryFailure):
                whitelist_failed.append((zone, listed))
                results.add(self, err=zone)
                continue
            if listed and any(value.endswith(".255") for value in listed):
                # list.dnswl.org answers 127.0.0.255 when it refuses the query (over quota,
                # public resolver): taken as a listing, it would whitelist every client.
                self.log.warning("%s answered %s for %s: a refused query, not a listing",
                                 zone, ", ".join(listed), ip)
                listed = [value for value in listed if not value.endswith(".255")]
            if listed:
                connection.notes["whitelisthost"] = zone  # what is_immune reads
                results.add(self, pass_=zone, whitelisted=zone)
                self.log.info("%s is whitelisted by %s (%s)", ip, zone, ", ".join(listed))
                return None, None

        threshold = self.config["score_threshold"]
        listings, score, scorers, failed = {}, 0.0, [], []
        for (zone, zone_score), reason in zip(self.zones, blocked):
            if isinstance(reason, dns.TemporaryFailure):
                results.add(self, err=zone)
                if zone_score is None or threshold:  # an unscored failure cannot matter
                    failed.append((zone, reason))
            elif reason is None:
                results.add(self, pass_=zone)
            else:
                results.add(self, fail=zone)
                listings[zone] = "" if reason == _NO_TXT.format(zone=zone) else reason
                if zone_score is not None:
                    score += zone_score
                    scorers.append(zone)
        if listings:
            results.add(self, listings=listings)
            self.log.info("%s is listed in %s", ip,
                          "; ".join(f"{zone} ({reason or 'no TXT'})" for zone, reason in listings.items()))
        if any(zone_score is not None for _, zone_score in self.zones):
            results.add(self, score=score)

        refusal = next((_listed(ip, [zone], listings) for zone, zone_score in self.zones
                        if zone_score is None and zone in listings), None)
        if refusal is None and threshold and score >= threshold:
            refusal = _listed(ip, scorers, listings, f" (score {score:g}, threshold {threshold:g})")
        # A listing known elsewhere decides, whatever the zones that did not answer would have
        # said; but a whitelist that did not answer might have excused it.
        undecided = whitelist_failed if refusal else failed
        if undecided:
            zone, error = undecided[0]
            self.log.warning("%s: %s", zone, error)
            return None, f"cannot check {ip} against {zone} now"
        return refusal, None

    # -- rcpt: the deferred refusal ------------------------------------------------
    def hook_rcpt(self, session, recipient, params):
        if self.config["reject_at"] != "rcpt" or self.config["reject"] != "1":
            return DECLINED  # refused (or noted) at connect already
        found = session.connection.results.get(self)
        if found is None or not (found.get("refusal") or (found.get("error") and not self.config["fail_open"])):
            return DECLINED
        if self.is_immune(session):  # AUTH, or a whitelisted sender, since connect
            return DECLINED
        if recipient.user.lower() in self.exempt:
            self.log.info("%s may reach %s despite: %s", session.connection.remote_ip,
                          recipient.format(), found.get("refusal") or found["error"])
            return DECLINED
        return self._refuse(session)

    def _refuse(self, session):
        """The listing as the reject options say; a DNS failure as a temporary refusal."""
        found = session.connection.results.get(self)
        if found.get("refusal"):
            return self.reject(f"{self.enhanced_status('7.1')} {found['refusal']}", session)
        return self.reject(f"4.4.3 {found['error']}, try again later", session, reject_type="temp")


def _listed(ip, zones, listings, extra=""):
    reasons = "; ".join(listings[zone] for zone in zones if listings[zone])
    return f"{ip} is listed in {', '.join(zones)}{extra}" + (f": {reasons}" if reasons else "")
