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
- recorded otherwise: ``transaction.results.get("sender_permitted_from")`` (outcome pass,
  fail for fail and softfail, err for the errors, skip for none and neutral; evidence
  ``result``, ``domain``, ``identity``, ``reason``) for dmarc, a ``Received-SPF`` header (RFC 7208 9.1, at data_post; off
  with ``received_spf = no``), and ``spf=<result> smtp.mailfrom=<sender>`` in the
  message's one Authentication-Results header.

With ``lookahead`` (the default) the check starts as the MAIL command comes in
(mail_pre), in a greenlet of its own: the other plugins' look-ups at MAIL
(resolvable_fromhost's MX) run meanwhile, and hook_mail takes the result (it waits
in the connection note ``spf_lookahead`` in between). A path that another mail_pre
plugin rewrites afterwards is checked again at MAIL.

With DMARC, set ``reject_on =`` (empty): a DKIM-aligned message must get to dmarc even
when SPF fails (forwarded mail). Relay clients and whitelisted hosts are not checked.

Options:
  reject_on     results that refuse (default fail; e.g. fail, softfail, permerror)
  defer_on      results that defer (default temperror; empty: accept them)
  received_spf  add the Received-SPF header (default yes)
  lookahead     start the check at mail_pre, overlapping the other plugins' look-ups;
                no: at MAIL, in plugin order (default yes)
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
from qpgevent.address import Address, AddressError
from qpgevent.plugin import DECLINED, DENYSOFT, Plugin
from qpgevent.results import AUTH_OUTCOMES

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
    reject_options = ("reject", "reject_type")
    configspec = [
        'reject_on = force_list(default=list("fail"))',
        'defer_on = force_list(default=list("temperror"))',
        "received_spf = boolean(default=yes)",
        "lookahead = boolean(default=yes)",
    ]

    def setup(self):
        for option in ("reject_on", "defer_on"):
            self.config[option] = [result for result in self.config[option] if result]
            unknown = set(self.config[option]) - set(RESULTS)
            if unknown:
                raise ValueError(f"{option}: unknown SPF result {', '.join(sorted(unknown))}")

    def hook_mail_pre(self, session, path, params):
        if not self.config["lookahead"] or self.is_immune(session):
            return DECLINED
        try:
            sender = Address.parse(path, smtputf8=True, allow_null=True)
        except AddressError:
            return DECLINED  # the core refuses it; no check to start
        question = _question(session, sender)
        session.connection.notes["spf_lookahead"] = (question, dns.ahead((_check, *question)))
        return DECLINED

    def hook_mail(self, session, sender, params):
        pending = session.connection.notes.pop("spf_lookahead", None)
        if self.is_immune(session):
            return DECLINED
        connection, transaction = session.connection, session.transaction
        helo = connection.hello_host or ""
        identity = str(sender.address) if not sender.is_null else f"postmaster@{helo}"
        domain = identity.rpartition("@")[2]
        question = _question(session, sender)
        if pending is not None and pending[0] == question:
            result, explanation = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()  # the path was rewritten after mail_pre
            result, explanation = _check(*question)
        result = {"ambiguous": "permerror", "unknown": "permerror", "error": "temperror"}.get(result, result)
        transaction.results.record(self, AUTH_OUTCOMES[result], "spf", result=result, domain=domain,
                                   identity="helo" if sender.is_null else "mailfrom", reason=explanation)
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
        note = session.transaction.results.get(self)
        if note is None or not self.config["received_spf"]:
            return DECLINED
        connection = session.connection
        session.transaction.headers.prepend("Received-SPF", "%s (%s: %s) client-ip=%s; envelope-from=%s; helo=%s;" % (
            note["result"], session.me, note["reason"] or note["result"], connection.remote_ip,
            _quoted(session.transaction.sender), _key_value(connection.hello_host or "")))
        return DECLINED


def _question(session, sender):
    """What check_host() is asked: (client address, sender or "", HELO name, our name)."""
    return (session.connection.remote_ip, "" if sender.is_null else str(sender.address),
            session.connection.hello_host or "", session.me)


def _check(ip, sender, helo, receiver):
    """check_host()'s (result, explanation)."""
    result, _, explanation = spf.query(i=ip, s=sender, h=helo, receiver=receiver).check()
    return result, explanation


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
