"""sender_permitted_from: SPF (RFC 7208): may the client send mail for the sender's domain?

At MAIL, the client's address is checked against the SPF record of the envelope
sender's domain (``check_host()`` with pyspf); for the null sender ``<>``, against the
HELO name's record (RFC 7208 2.4, the identity is ``postmaster@<helo>``). Every DNS
query goes through qpgevent's resolver (cooperative, cached, under the session's DNS
budget), and the RFC's processing limits hold: at most 10 mechanisms or modifiers that
look the DNS up (4.6.4; more is ``permerror``), at most 2 void look-ups, at most 10 MX
or PTR names followed.

The result (pass, fail, softfail, neutral, none, permerror, temperror) is

- refused when listed in ``reject_on`` (default: fail): ``550 5.7.1 SPF fail: <ip> is
  not allowed to send mail for <domain>`` plus the domain's explanation (``exp=``) when
  it has one
  (``reject`` / ``reject_type`` apply; ``reject = naughty`` defers it);
- deferred when listed in ``defer_on`` (default: temperror): ``450 4.7.1 SPF check of
  <domain> failed temporarily, try again later``;
- recorded otherwise: ``transaction.notes["spf"] = {"result", "domain", "identity",
  "reason"}`` for dmarc, a ``Received-SPF`` header (RFC 7208 9.1, at data_post; off
  with ``received_spf = no``), and ``spf=<result> smtp.mailfrom=<sender>`` in the
  message's one Authentication-Results header.

With DMARC, set ``reject_on =`` (empty): a DKIM-aligned message must get to dmarc even
when SPF fails (forwarded mail). Relay clients and whitelisted hosts are not checked.

Options:
  reject_on     results that refuse (default fail; e.g. fail, softfail, permerror)
  defer_on      results that defer (default temperror; empty: accept them)
  received_spf  add the Received-SPF header (default yes)
  plus the standard reject, reject_type, loglevel, timeout

Example::

    [[sender_permitted_from]]
      reject_on = fail, permerror
"""

import re

import spf
from dns.name import from_text
from dns.reversename import to_address

from qpgevent import authresults, dns
from qpgevent.plugin import DECLINED, DENYSOFT, Plugin

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")


def lookup(name, qtype, strict=True, timeout=None):
    """pyspf's DNS function, on qpgevent's resolver: ``[((name, type), value), ...]``."""
    try:
        if qtype == "A":
            values = dns.a(name)
        elif qtype == "AAAA":
            values = dns.aaaa(name)
        elif qtype == "MX":
            values = dns.mx(name)
        elif qtype == "PTR":
            values = dns.ptr(to_address(from_text(name)))
        elif qtype in ("TXT", "SPF"):
            values = [(text.encode("utf-8"),) for text in dns.txt(name)] if qtype == "TXT" else []
        else:
            return []
    except dns.TemporaryFailure as error:
        raise spf.TempError(f"DNS {error}") from None
    return [((name, qtype), value) for value in values]


# pyspf asks one module-level function (its documented plug point, as for pydns/dnspython).
spf.DNSLookup = lookup


class SenderPermittedFrom(Plugin):
    configspec = [
        'reject_on = force_list(default=list("fail"))',
        'defer_on = force_list(default=list("temperror"))',
        "received_spf = boolean(default=yes)",
    ]

    def setup(self):
        for option in ("reject_on", "defer_on"):
            self.config[option] = [result for result in self.config[option] if result]
            unknown = set(self.config[option]) - set(RESULTS)
            if unknown:
                raise ValueError(f"{option}: unknown SPF result {', '.join(sorted(unknown))}")

    def hook_mail(self, session, sender, params):
        if self.is_immune(session):
            return DECLINED
        connection, transaction = session.connection, session.transaction
        helo = connection.hello_host or ""
        identity = str(sender.address) if not sender.is_null else f"postmaster@{helo}"
        domain = identity.rpartition("@")[2]
        query = spf.query(i=connection.remote_ip, s="" if sender.is_null else identity, h=helo,
                          receiver=session.me)
        result, _, explanation = query.check()
        result = {"ambiguous": "permerror", "unknown": "permerror", "error": "temperror"}.get(result, result)
        spf_note = {"result": result, "domain": domain, "identity": "helo" if sender.is_null else "mailfrom",
                    "reason": explanation}
        transaction.notes["spf"] = spf_note
        self.log.info("spf=%s domain=%s ip=%s: %s", result, domain, connection.remote_ip, explanation)
        authresults.record(transaction, "spf", result,
                           **({"smtp_helo": helo} if sender.is_null else {"smtp_mailfrom": identity}))
        if result in self.config["defer_on"]:
            return DENYSOFT, f"SPF check of {domain} failed temporarily, try again later"
        if result in self.config["reject_on"]:
            text = f"SPF {result}: {connection.remote_ip} is not allowed to send mail for {domain}"
            if result == "permerror":
                text = f"SPF permerror: the SPF record of {domain} is broken ({explanation})"
            elif result == "fail" and explanation and explanation != spf.EXPLANATIONS.get("fail"):
                text += f": {explanation}"
            return self.reject(text.replace("\r", " ").replace("\n", " "), session)
        return DECLINED

    def hook_data_post(self, session):
        note = session.transaction.notes.get("spf")
        if note is None or not self.config["received_spf"]:
            return DECLINED
        connection = session.connection
        session.transaction.headers.prepend("Received-SPF", "%s (%s: %s) client-ip=%s; envelope-from=%s; helo=%s;" % (
            note["result"], session.me, note["reason"] or note["result"], connection.remote_ip,
            _quoted(session.transaction.sender), _key_value(connection.hello_host or "")))
        return DECLINED


def _quoted(sender):
    return _quoted_string(sender.address) if sender is not None and not sender.is_null else '"<>"'


_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def _key_value(text):
    """A Received-SPF value (RFC 7208 9.1: dot-atom or quoted-string): the client's HELO
    cannot add a ``; client-ip=...`` of its own."""
    return text if _DOT_ATOM.match(text) else _quoted_string(text)


def _quoted_string(text):
    text = "".join(c if c.isprintable() else "?" for c in text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
