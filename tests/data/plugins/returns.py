"""returns: a test plugin that gives one hook a chosen answer.

Used by ``tests/e2e/test_hooks.py``. It implements every hook that answers the client;
all of them decline except the configured ``hook``, which answers with ``code``.

Options:
  hook     the hook to answer (connect, mail, rcpt, data_post, ...)
  code     a return code name (OK, DENY, DENYSOFT, DENY_DISCONNECT, DENYSOFT_DISCONNECT,
           DECLINED, DONE), or a misbehaviour: ``raise`` (raise RuntimeError),
           ``sleep`` (time.sleep for ``sleep`` seconds), ``garbage`` (return 42)
  message  the reply lines returned with the code (default: none)
  respond  with DONE: send this reply first, written "CODE text" (default: send nothing)
  close    with DONE: whether that reply closes the connection (default: no)
  sleep    seconds to sleep for ``code = sleep`` (default 10)
  times    answer only the first N calls of ``hook``, then decline (default 0: always)

Every call of the configured hook is appended to the module-level ``CALLS`` as
``(label, hook)``, so a test can see which instances ran, and in which order.
"""

import itertools
import time

from qpgevent.plugin import DECLINED, Plugin, ReturnCode

CALLS = []


class Returns(Plugin):
    verbs = ("XTEST",)  # for the command hook
    sasl_mechanisms = ("X-TEST",)  # for the auth_sasl hook
    configspec = """
    hook = string
    code = option("OK", "DENY", "DENYSOFT", "DENY_DISCONNECT", "DENYSOFT_DISCONNECT", "DECLINED", "DONE", "raise", "sleep", "garbage")
    message = force_list(default=list())
    respond = string(default="")
    close = boolean(default=False)
    sleep = float(min=0, default=10)
    times = integer(min=0, default=0)
    """

    def setup(self):
        self._calls = itertools.count(1)

    def _answer(self, hook, session):
        if hook != self.config["hook"]:
            return DECLINED
        CALLS.append((self.name, hook))
        times = self.config["times"]
        if times and next(self._calls) > times:
            return DECLINED
        code = self.config["code"]
        if code == "raise":
            raise RuntimeError(f"{self.name} was told to raise at {hook}")
        if code == "sleep":
            time.sleep(self.config["sleep"])  # cooperative: the tests run monkey-patched
            return DECLINED
        if code == "garbage":
            return 42
        if code == "DONE" and self.config["respond"]:
            number, _, text = self.config["respond"].partition(" ")
            session.respond(int(number), text, close=self.config["close"])
        if self.config["message"]:
            return ReturnCode[code], list(self.config["message"])
        return ReturnCode[code]

    def hook_pre_connection(self, session):
        return self._answer("pre_connection", session)

    def hook_connect(self, session):
        return self._answer("connect", session)

    def hook_auth(self, session, mechanism, user, password, ticket):
        return self._answer("auth", session)

    def hook_auth_plain(self, session, mechanism, user, password, ticket):
        return self._answer("auth_plain", session)

    def hook_auth_login(self, session, mechanism, user, password, ticket):
        return self._answer("auth_login", session)

    def hook_auth_cram_md5(self, session, mechanism, user, password, ticket):
        return self._answer("auth_cram_md5", session)

    def hook_auth_sasl(self, session, mechanism, response):
        return self._answer("auth_sasl", session)

    def hook_auth_parse(self, session, argument):
        return self._answer("auth_parse", session)

    def hook_helo_parse(self, session, argument):
        return self._answer("helo_parse", session)

    def hook_ehlo_parse(self, session, argument):
        return self._answer("ehlo_parse", session)

    def hook_mail_parse(self, session, argument):
        return self._answer("mail_parse", session)

    def hook_rcpt_parse(self, session, argument):
        return self._answer("rcpt_parse", session)

    def hook_received_line(self, session, line):
        return self._answer("received_line", session)

    def hook_command(self, session, verb, argument):
        return self._answer("command", session)

    def hook_helo(self, session, host):
        return self._answer("helo", session)

    def hook_ehlo(self, session, host):
        return self._answer("ehlo", session)

    def hook_mail_pre(self, session, path, params):
        return self._answer("mail_pre", session)

    def hook_mail(self, session, sender, params):
        return self._answer("mail", session)

    def hook_rcpt_pre(self, session, path, params):
        return self._answer("rcpt_pre", session)

    def hook_rcpt(self, session, recipient, params):
        return self._answer("rcpt", session)

    def hook_data(self, session):
        return self._answer("data", session)

    def hook_data_headers_end(self, session):
        return self._answer("data_headers_end", session)

    def hook_data_post(self, session):
        return self._answer("data_post", session)

    def hook_queue_pre(self, session):
        return self._answer("queue_pre", session)

    def hook_queue(self, session):
        return self._answer("queue", session)

    def hook_vrfy(self, session, argument):
        return self._answer("vrfy", session)

    def hook_noop(self, session, argument):
        return self._answer("noop", session)

    def hook_expn(self, session, argument):
        return self._answer("expn", session)

    def hook_help(self, session, argument):
        return self._answer("help", session)

    def hook_unrecognized_command(self, session, verb, argument):
        return self._answer("unrecognized_command", session)

    def hook_quit(self, session):
        return self._answer("quit", session)

