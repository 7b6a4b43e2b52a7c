"""headers: refuse messages whose header breaks the rules: missing, duplicated, misdated, oversized.

As soon as the header of a message has been received (data_headers_end; the refusal is
the answer to the final dot), it is checked, in this order:

- size: more than ``max_fields`` fields, a header block over ``max_header_size``
  octets, or one field (folded lines and all) over ``max_field_size``:
  ``554 5.7.1 header too large: ...``. (The core stops parsing a header at 1 MiB: the
  rest counts as body, so a larger limit has no effect.)
- required fields (``require``, default From and Date; RFC 5322 3.6 requires both):
  ``554 5.7.1 missing required header: Date``;
- fields RFC 5322 3.6 allows at most once (Date, From, Sender, Reply-To, To, Cc, Bcc,
  Message-ID, In-Reply-To, References, Subject): ``554 5.7.1 only one Subject header
  allowed (RFC 5322 3.6)``;
- the Date: one that does not parse is refused; one more than ``future`` days ahead
  or ``past`` days behind the server's clock is refused (0 turns a check off; mail
  that waited in a queue for days is legitimate, so ``past`` is off by default).

``reject`` / ``reject_type`` apply (``reject = 0`` only logs). Relay clients and
whitelisted hosts or senders are not checked.

Options:
  require          fields that must be present (default From, Date)
  singletons       fields allowed at most once (default: RFC 5322's list above)
  future           days a Date may be ahead (default 2; 0: no check)
  past             days a Date may be behind (default 0: no check)
  max_fields       most header fields (default 500)
  max_header_size  octets of the whole header (default 131072)
  max_field_size   octets of one field, folded lines included (default 32768)
  plus the standard reject, reject_type, loglevel, timeout

Example::

    [[headers]]
      require = From, Date, Message-ID
      future = 2
      past = 30
"""

import email.utils
import time

from qpgevent.plugin import DECLINED, Plugin

SINGLETONS = ("Date", "From", "Sender", "Reply-To", "To", "Cc", "Bcc", "Message-ID", "In-Reply-To",
              "References", "Subject")
DAY = 86400


class HeaderChecks(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = [
        'require = force_list(default=list("From", "Date"))',
        "singletons = force_list(default=list(%s))" % ", ".join(f'"{name}"' for name in SINGLETONS),
        "future = integer(min=0, default=2)",
        "past = integer(min=0, default=0)",
        "max_fields = integer(min=1, default=500)",
        "max_header_size = integer(min=1, default=131072)",
        "max_field_size = integer(min=1, default=32768)",
    ]

    def hook_data_headers_end(self, session):
        if self.is_immune(session):
            return DECLINED
        problem = self.problem(session.transaction.headers)
        if problem is None:
            return DECLINED
        return self.reject(problem, session)

    def problem(self, headers):
        """The first rule ``headers`` breaks, as the refusal text; None if it keeps them all."""
        config = self.config
        if len(headers) > config["max_fields"]:
            return f"header too large: {len(headers)} fields, at most {config['max_fields']}"
        size = len(headers.as_bytes())
        if size > config["max_header_size"]:
            return f"header too large: {size} octets, at most {config['max_header_size']}"
        for name, value in headers:
            if len(name) + len(value) + 2 > config["max_field_size"]:
                return f"header too large: a {name} field over {config['max_field_size']} octets"
        for name in config["require"]:
            if name and name not in headers:
                return f"missing required header: {name}"
        for name in config["singletons"]:
            if name and len(headers.get_all(name)) > 1:
                return f"only one {name} header allowed (RFC 5322 3.6)"
        date = headers.get("Date")
        if date is not None and (config["future"] or config["past"]):
            return self._date_problem(date)
        return None

    def _date_problem(self, date):
        try:
            when = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return "the Date header is not a valid date"
        now = time.time()
        if self.config["future"] and when > now + self.config["future"] * DAY:
            return "the Date header is too far in the future"
        if self.config["past"] and when < now - self.config["past"] * DAY:
            return "the Date header is too far in the past"
        return None
