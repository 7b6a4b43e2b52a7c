"""auth/checkpassword: check AUTH passwords with a checkpassword program (the qmail interface).

The program (vchkpw, checkpassword-pam, or any of the kind; see
https://cr.yp.to/checkpwd/interface.html) is run for each attempt with file descriptor 3
carrying ``user\\0password\\0timestamp\\0``; exit status 0 means the password is right,
1 wrong, 111 (or any other, or a timeout) a temporary failure. Its arguments: ``command``
(split like a shell would), then ``true_command`` (default /bin/true), which a real
checkpassword runs on success. Its output is ignored and never logged.

With ``cram_md5 = yes`` CRAM-MD5 is offered too, in vchkpw's convention: the password
field carries the client's hex digest and the timestamp field the challenge. Only for
programs that know the plaintext secret (vchkpw does).

Options:
  command      the checkpassword program and its arguments (required)
  true_command the program it runs on success (default /bin/true)
  timeout      seconds the program may take (default 10; the standard plugin option)
  cram_md5     offer CRAM-MD5 through this program (default no)

Example::

    [[auth/checkpassword]]
      command = /usr/local/bin/checkpassword-pam -s smtp
"""

from __future__ import annotations

import os
import shlex
import time
from typing import Any

from gevent import subprocess

from qpgevent.plugin import DENY, DENYSOFT, OK, Plugin


class Checkpassword(Plugin):
    configspec = """
command = string()
true_command = string(default="/bin/true")
cram_md5 = boolean(default=False)
"""

    def hook_auth_plain(self, session: Any, mechanism: str, user: str, password: str, ticket: Any) -> Any:
        return self._check(user, password, str(int(time.time())))

    def hook_auth_login(self, session: Any, mechanism: str, user: str, password: str, ticket: Any) -> Any:
        return self._check(user, password, str(int(time.time())))

    def hook_auth_cram_md5(self, session: Any, mechanism: str, user: str, password: str, ticket: Any) -> Any:
        if not self.config["cram_md5"]:
            return None
        return self._check(user, password, ticket)

    def setup(self) -> None:
        if not self.config["cram_md5"]:
            # The hook runner asks this instance which hooks it has, and offers CRAM-MD5 only
            # if some plugin hooks auth_cram_md5: without the option, we do not.
            hooks = [hook for hook in type(self).implemented_hooks() if hook != "auth_cram_md5"]
            self.implemented_hooks = lambda: hooks  # type: ignore[method-assign]

    def _check(self, user: str, password: str, stamp: str) -> Any:
        if "\0" in user or "\0" in password:
            return DENY, "bad characters"
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, f"{user}\0{password}\0{stamp}\0".encode())
        finally:
            os.close(write_end)
        seconds = (self.config.get("timeout") or 10) * 0.9  # inside the hook's own timeout
        argv = shlex.split(self.config["command"]) + shlex.split(self.config["true_command"])
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, pass_fds=(read_end, 3),
                                       preexec_fn=_fd3(read_end), start_new_session=True)
        except OSError as error:
            os.close(read_end)
            self.log.error("cannot run %s: %s", argv[0], error.strerror)
            return DENYSOFT, "authentication backend unavailable"
        os.close(read_end)
        try:
            status = process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            self.log.warning("%s took more than %.1fs; killed", argv[0], seconds)
            return DENYSOFT, "authentication backend timed out"
        if status == 0:
            return OK
        if status == 1:
            self.log.info("%s refused the password of %s", argv[0], user)
            return DENY  # default words: the reply must not tell which users exist
        self.log.warning("%s exited with %s (temporary failure)", argv[0], status)
        return DENYSOFT, "authentication backend failed"


def _fd3(read_end: int) -> Any:
    """In the child: the password pipe on file descriptor 3, as the interface says."""
    def move() -> None:
        if read_end != 3:
            os.dup2(read_end, 3)
            os.set_inheritable(3, True)
    return move
