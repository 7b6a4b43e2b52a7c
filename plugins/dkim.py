"""dkim: verify the DKIM signatures of each message (RFC 6376) with dkimpy; record the results.

After the message is received (data_post) every ``DKIM-Signature`` field is checked:
the public keys (``<s>._domainkey.<d>`` TXT) are fetched first, all at once, through
qpgevent's resolver (cooperative, cached, under the session's DNS budget); then the
signatures are checked in a worker thread (canonicalising and hashing a large message
is CPU work that must not stall other sessions). Each signature gets a result (RFC 8601
2.7.1):

  pass       the signature verifies
  fail       it does not (the message was changed, or the key does not match)
  permerror  it cannot be checked: malformed, no key published, key too small
  temperror  the key could not be fetched now (DNS failure)
  policy     not checked: the message is over ``max_size``

recorded in ``transaction.results.get("dkim")`` (each signature's domain under its
outcome: pass, fail, err for the errors, skip for policy; the evidence ``signatures``,
``[{"domain", "selector", "result", "reason"}]``, for dmarc) and in the message's one Authentication-Results header
(``dkim=pass header.d=sender.test header.s=sel header.b=Ab12Cd34``; ``dkim=none``
when the message has no signature). A message is refused only for the results listed in
``reject_on`` (default none: RFC 6376 6.3 asks that a failed signature count like no
signature; dmarc decides what a missing aligned pass means).

Put dkim first among the data_post plugins: a plugin that edits the header before it
(spamassassin's subject tag) can break a valid signature.

The body is never read into memory to verify it: its hash (``bh=``) is computed while
reading the spool in chunks, with the canonicalisation of RFC 6376 3.4.3/3.4.4 done
line by line; dkimpy then checks the header signature over the header alone. Messages
over ``max_size`` octets get ``dkim=policy`` ("too large to verify"): hashing costs CPU.

Signing. Mail from an authenticated user (``connection.notes["auth_user"]``; with
``sign_relay_clients``, from any relay client too) whose From domain has a key in
``sign_keys`` is signed (rsa-sha256, relaxed/relaxed, the ``sign_headers`` fields)
instead of verified: the DKIM-Signature goes on top of the header. A message over
``max_sign_size`` is sent unsigned (logged): dkimpy signs a message held in memory. A
key file that cannot be read stops the server at start. The selector's TXT record
holds the public key: the ``p=`` value is
``openssl pkey -in key.pem -pubout -outform DER | base64 -w0``.

Options:
  max_size            largest message verified, octets (default 67108864)
  max_sign_size       largest message signed, octets (default 10485760)
  min_key_bits        smaller RSA keys are a permerror (default 1024; RFC 8301)
  reject_on           results that refuse the message (default none; e.g. fail, permerror)
  sign_keys           ``domain:selector:/path/to/private.pem``, one per signing domain
                      (default none: no signing)
  sign_headers        fields signed (default from, to, cc, subject, date, message-id,
                      reply-to, in-reply-to, references, mime-version, content-type)
  sign_relay_clients  sign mail from relay clients, not only from authenticated users
                      (default no)
  plus the standard reject, reject_type, loglevel, timeout

Example::

    [[dkim]]
      reject_on = fail, permerror
"""

import base64
import email.utils
import hashlib
import re

import dkim as dkimpy

from qpgevent import authresults, dns
from qpgevent.plugin import DECLINED, Plugin, run_blocking
from qpgevent.results import AUTH_OUTCOMES

_TAG = re.compile(r"\b([a-z]+)\s*=\s*([^;]*)")
_WSP = re.compile(rb"[ \t]+")
_CRLF = b"\r\n"


def body_hash_parameters(tags):
    """(body canonicalisation, hash name, l= length or None) of a signature; None if unusable."""
    body = tags.get("c", "simple/simple").lower().partition("/")[2] or "simple"
    algorithm = {"rsa-sha256": "sha256", "ed25519-sha256": "sha256", "rsa-sha1": "sha1"}.get(
        tags.get("a", "").lower())
    length = tags.get("l")
    if body not in ("simple", "relaxed") or algorithm is None or (length is not None and not length.isdigit()):
        return None
    return body, algorithm, int(length) if length is not None else None


def body_hash(chunks, canonicalization, algorithm, length=None):
    """The hash of the canonical body (RFC 6376 3.4.3, 3.4.4, 3.7), the body read in chunks.

    Empty lines are held back until a line with content follows: trailing ones are dropped.
    An empty body is one CRLF under simple, nothing under relaxed.
    """
    hasher = hashlib.new(algorithm)
    relaxed = canonicalization == "relaxed"
    state = {"left": length, "empty": 0, "content": False}

    def feed(line):
        if relaxed:
            line = _WSP.sub(b" ", line).rstrip(b" ")
        if not line:
            state["empty"] += 1
            return
        data = _CRLF * state["empty"] + line + _CRLF
        state["empty"], state["content"] = 0, True
        if state["left"] is not None:
            data = data[:state["left"]]
            state["left"] -= len(data)
        hasher.update(data)

    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(_CRLF)
        rest = lines.pop()
        for line in lines:
            feed(line)
    if rest:
        feed(rest)
    if not state["content"] and not relaxed and state["left"] != 0:
        hasher.update(_CRLF[:2 if state["left"] is None else state["left"]])
    return hasher.digest()


class _HeaderOnlyDkim(dkimpy.DKIM):
    """dkimpy given the header only: the body hash was computed from the spool (``body_hash``)."""

    body_hash = None

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):
        if self.body_hash is None:
            raise dkimpy.ValidationError("unsupported c=, a= or l= value")
        try:
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
        except (KeyError, ValueError, TypeError):
            raise dkimpy.ValidationError("bh= missing or not base64") from None
        if expected != self.body_hash:
            raise dkimpy.ValidationError("body hash mismatch")
        # The body is checked: dkimpy checks the header signature (it skips the body without bh).
        return super().verify_sig_process({k: v for k, v in sig.items() if k != b"bh"},
                                          include_headers, sig_header, dnsfunc)


def signature_tags(value):
    """The tags of a DKIM-Signature value: ``{"d": "sender.test", "s": "sel", ...}``."""
    return {name: re.sub(r"\s+", "", text) for name, text in _TAG.findall(value)}


class Dkim(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = [
        "max_size = integer(min=0, default=67108864)",
        "max_sign_size = integer(min=0, default=10485760)",
        "min_key_bits = integer(min=512, default=1024)",
        "reject_on = force_list(default=list())",
        "sign_keys = force_list(default=list())",
        'sign_headers = force_list(default=list("from", "to", "cc", "subject", "date", "message-id", '
        '"reply-to", "in-reply-to", "references", "mime-version", "content-type"))',
        "sign_relay_clients = boolean(default=no)",
    ]

    def setup(self):
        self.config["reject_on"] = [result for result in self.config["reject_on"] if result]
        self.keys = {}
        for entry in self.config["sign_keys"]:
            domain, selector, path = (entry.split(":", 2) + ["", ""])[:3]
            if not (domain and selector and path):
                raise ValueError(f"sign_keys: {entry!r} is not domain:selector:/path/to/key.pem")
            with open(path, "rb") as handle:
                self.keys[domain.strip().lower()] = (selector.strip(), handle.read())

    def _signing_key(self, session):
        connection = session.connection
        if not self.keys or not (connection.notes.get("auth_user") or
                                 (self.config["sign_relay_clients"] and connection.relay_client)):
            return None
        addresses = email.utils.getaddresses(session.transaction.headers.get_all("From"))
        if len(addresses) != 1:
            return None
        domain = addresses[0][1].rpartition("@")[2].lower()
        return (domain, *self.keys[domain]) if domain in self.keys else None

    def _sign(self, session, domain, selector, private):
        transaction = session.transaction
        if transaction.data_size > self.config["max_sign_size"]:
            self.log.warning("not signed: %d octets is over max_sign_size", transaction.data_size)
            return DECLINED
        message = b"".join(transaction.message_chunks())
        headers = [name.encode("ascii") for name in self.config["sign_headers"]]
        field = run_blocking(lambda: dkimpy.sign(message, selector.encode("ascii"), domain.encode("ascii"),
                                                 private, canonicalize=(b"relaxed", b"relaxed"),
                                                 include_headers=headers))
        name, _, value = field.decode("ascii").partition(":")
        transaction.headers.prepend(name, value.strip().replace("\r\n", "\n"))
        self.log.info("signed d=%s s=%s", domain, selector)
        return DECLINED

    def hook_data_post(self, session):
        transaction = session.transaction
        key = self._signing_key(session)
        if key is not None:
            return self._sign(session, *key)
        signatures = [signature_tags(value) for value in transaction.headers.get_all("DKIM-Signature")]
        results = []
        if not signatures:
            transaction.results.add(self, skip="no signature")
            authresults.record(transaction, "dkim", "none")
        elif transaction.data_size > self.config["max_size"]:
            results = [self._result(tags, "policy", "message too large to verify") for tags in signatures]
        else:
            names = [f"{tags.get('s', '')}._domainkey.{tags.get('d', '')}".lower() for tags in signatures]
            keys = dict(zip(names, dns.parallel([(self._key, name) for name in names], return_exceptions=True)))
            header = transaction.headers.as_bytes() + b"\r\n"
            verdicts = run_blocking(self._verify_all, header, transaction, signatures, keys, names)
            results = [self._result(tags, result, reason)
                       for tags, (result, reason) in zip(signatures, verdicts)]
        transaction.results.add(self, signatures=results)
        for entry, tags in zip(results, signatures):
            transaction.results.record(self, AUTH_OUTCOMES[entry["result"]], entry["domain"])
            authresults.record(transaction, "dkim", entry["result"], entry["reason"],
                               header_d=tags.get("d"), header_s=tags.get("s"),
                               header_b=tags.get("b", "")[:8] or None)
            self.log.info("dkim=%s d=%s s=%s%s", entry["result"], entry["domain"], entry["selector"],
                          f": {entry['reason']}" if entry["reason"] else "")
        for entry in results:
            if entry["result"] in self.config["reject_on"]:
                return self.reject(f"DKIM {entry['result']} for {entry['domain']}: "
                                   f"{entry['reason'] or 'signature does not verify'}", session)
        return DECLINED

    def _key(self, name):
        records = [text for text in dns.txt(name) if "p=" in text]
        return records[0].encode("utf-8") if records else None

    def _verify_all(self, header, transaction, signatures, keys, names):
        """In a worker thread: body hashes from the spool, then dkimpy over the header alone,
        keys from ``keys`` only (no DNS here)."""

        def dnsfunc(name, timeout=5):
            return keys.get(name.decode("ascii", "replace").rstrip(".").lower())

        hashes = {}
        for tags in signatures:
            how = body_hash_parameters(tags)
            if how is not None and how not in hashes:
                hashes[how] = body_hash(transaction.body_chunks(), *how)
        verifier = _HeaderOnlyDkim(header, logger=self.log, minkey=self.config["min_key_bits"])
        verdicts = []
        for index, (tags, name) in enumerate(zip(signatures, names)):
            key = keys[name]
            if isinstance(key, dns.TemporaryFailure):
                verdicts.append(("temperror", "key not available now"))
                continue
            if isinstance(key, BaseException):
                raise key
            verifier.body_hash = hashes.get(body_hash_parameters(tags))
            try:
                ok = verifier.verify(index, dnsfunc=dnsfunc)
            except dkimpy.DKIMException as error:
                if str(error).startswith("body hash mismatch"):  # the body was changed: a fail
                    verdicts.append(("fail", "body hash mismatch"))
                else:
                    verdicts.append(("permerror", str(error)))
                continue
            if ok:
                verdicts.append(("pass", None))
            elif key is None:
                verdicts.append(("permerror", "no key published"))
            else:
                verdicts.append(("fail", "signature does not verify"))
        return verdicts

    @staticmethod
    def _result(tags, result, reason):
        return {"domain": tags.get("d", "").lower(), "selector": tags.get("s", ""), "result": result,
                "reason": reason}
