#!/usr/bin/env python3
"""Scaffold a qpgevent plugin as a Python package, with its test.

Usage:
    tools/new_plugin.py NAME [--dir DIR] [--force]

Writes DIR/qpgevent-NAME/ (DIR defaults to the current folder):

  pyproject.toml        setuptools metadata; the plugin published as the entry point NAME
                        of the ``qpgevent.plugins`` group, so an ini names it ``[[NAME]]``
  qpgevent_NAME.py      the plugin: a module docstring (its documentation), one Plugin class
  tests/test_NAME.py    tests through the ``plugin_harness`` fixture (qpgevent's pytest plugin)
  README.md             how to install, configure and test it

The plugin it writes works: it refuses senders from the domains of its ``domains`` option.
Replace the check with yours, keep the shape. Then::

    pip install -e qpgevent-NAME
    python -m gevent.monkey --module pytest qpgevent-NAME/tests

NAME is a Python identifier (lower case, digits, underscores).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "qpgevent-{dash}"
version = "0.1.0"
description = "qpgevent plugin {name}: refuse senders from listed domains"
requires-python = ">=3.11"
dependencies = ["qpgevent"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points."qpgevent.plugins"]
{name} = "qpgevent_{name}"

[tool.setuptools]
py-modules = ["qpgevent_{name}"]
'''

MODULE = '''\
"""{name}: refuse senders whose domain is one of ``domains``.

At MAIL, the sender's domain (or any domain above it) is compared with ``domains``;
a match is refused as ``reject`` / ``reject_type`` say (default: 550 5.7.1). Relay
clients and whitelisted clients (``is_immune``) are not checked.

Options:
  domains      sender domains to refuse (default: none)
  reject       1 refuse, 0 only log, naughty leave it to the naughty plugin (default: 1)
  reject_type  perm, temp, disconnect or temp_disconnect (default: perm)

Notes:
  transaction.notes["{name}"]  the domain that matched, when one did

Example::

    [[{name}]]
      domains = spam.example, junk.example
"""

from qpgevent.plugin import DECLINED, Plugin


class {cls}(Plugin):
    configspec = """
    domains = force_list(default=list())
    """

    def hook_mail(self, session, sender, params):
        if self.is_immune(session) or not sender.host:
            return DECLINED
        domains = {{domain.lower() for domain in self.config["domains"]}}
        labels = sender.host.split(".")
        for i in range(len(labels)):
            domain = ".".join(labels[i:])
            if domain in domains:
                session.transaction.notes["{name}"] = domain
                return self.reject(f"mail from {{domain}} is not accepted here", session)
        return DECLINED
'''

TEST = '''\
"""{name} through qpgevent's plugin harness (the ``plugin_harness`` fixture).

Run as: python -m gevent.monkey --module pytest tests
"""

ACCEPT = "[[rcpt_ok]]\\n  domains = example.test\\n"


def test_refuses_a_listed_sender_domain_and_its_subdomains(plugin_harness):
    harness = plugin_harness("{name}", domains=["spam.example"], after=ACCEPT)
    for sender in ("a@spam.example", "a@mx.spam.example"):
        transcript = harness.run_session(["EHLO client.test", f"MAIL FROM:<{{sender}}>", "QUIT"])
        assert transcript.replies[2] == (550, "5.7.1 mail from spam.example is not accepted here")


def test_accepts_other_senders(plugin_harness):
    harness = plugin_harness("{name}", domains=["spam.example"], after=ACCEPT)
    transcript = harness.run_session(["EHLO client.test", "MAIL FROM:<a@good.example>",
                                      "RCPT TO:<bob@example.test>", "QUIT"])
    assert transcript.codes == [220, 250, 250, 250, 221]


def test_one_hook_and_the_note(plugin_harness):
    harness = plugin_harness("{name}", domains=["spam.example"], reject_type="temp")
    session = harness.session()
    result = harness.run_hook("mail", "a@spam.example", session=session)
    assert (result.code, result.reply.code) == ("DENYSOFT", 450)
    assert session.transaction.notes["{name}"] == "spam.example"
'''

README = '''\
# qpgevent-{dash}

A [qpgevent](https://github.com/qpgevent/qpgevent) plugin: {name} refuses senders from
the domains you list. Its documentation is the docstring of `qpgevent_{name}.py`.

    pip install qpgevent-{dash}

Then in `qpsmtpd.ini`, before `rcpt_ok`:

    [plugins]
      [[{name}]]
        domains = spam.example

Try it without a server: `qpgevent plugin test {name} -o domains=spam.example --from a@spam.example`.
Tests: `pip install -e .[test]`, then `python -m gevent.monkey --module pytest tests`.
'''


def scaffold(name: str, directory: Path, force: bool = False) -> Path:
    """Write the package for plugin ``name`` under ``directory``; its folder."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"{name!r}: a plugin name is lower case letters, digits and underscores")
    root = directory / f"qpgevent-{name.replace('_', '-')}"
    if root.exists() and not force:
        raise FileExistsError(f"{root} exists (--force to overwrite)")
    fields = {"name": name, "dash": name.replace("_", "-"),
              "cls": "".join(part.capitalize() for part in name.split("_"))}
    files = {"pyproject.toml": PYPROJECT, f"qpgevent_{name}.py": MODULE,
             f"tests/test_{name}.py": TEST, "README.md": README}
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields), encoding="utf-8")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Scaffold a qpgevent plugin package with its test.")
    parser.add_argument("name", help="the plugin's name, as the ini will write it: [[NAME]]")
    parser.add_argument("--dir", type=Path, default=Path("."), help="where to create it (default: here)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing folder")
    args = parser.parse_args(argv)
    try:
        root = scaffold(args.name, args.dir, args.force)
    except (ValueError, FileExistsError) as error:
        print(f"new_plugin: {error}", file=sys.stderr)
        return 2
    print(f"created {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
