"""badmailfrom: refuse mail from listed envelope senders.

At MAIL, the sender is matched against the entries of ``list`` (in the ini) and of
``file`` (qpsmtpd's ``config/badmailfrom``; re-read when it changes). An entry is

  user@example.com   that address (any case)
  @example.com       anyone at that domain (``example.com`` alone means the same)
  /regex/  ^regex    a regular expression searched in the address, any case
  <>                 the null sender (bounces)

and any text after it is the reason given to the client; without one the client is
told ``Your envelope sender is in my badmailfrom list``. First match wins. ``#``
starts a comment, except in a ``/regex/`` line. Relay clients and whitelisted hosts
or senders (``whitelist``) are not checked.

Options (and the standard ``reject`` / ``reject_type``; ``reject = naughty`` lets the
``naughty`` plugin refuse later):
  list  entries written here, as a list: "@spam.example bulk sender", "/^sales\\d+@/"
  file  a file of entries, one a line

Example::

    [[badmailfrom]]
      file = badmailfrom
      list = "@spam.example we do not want this", "<> no bounces here"
"""

from qpgevent.plugin import DECLINED, Plugin
from qpgevent.policy import Entries, match_address, parse_patterns

DEFAULT_REASON = "Your envelope sender is in my badmailfrom list"


class Badmailfrom(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = """
    list = force_list(default=list())
    file = path(default="")
    """

    def setup(self):
        self.entries = Entries(self.config["list"], self.config["file"], parse_patterns)

    def hook_mail(self, session, sender, params):
        if self.is_immune(session):
            return DECLINED
        pattern = match_address(self.entries.get(), sender.address)
        if pattern is None:
            return DECLINED
        self.log.info("sender %s matches %r", sender.format(), pattern.text)
        return self.reject(pattern.reason or DEFAULT_REASON, session)
