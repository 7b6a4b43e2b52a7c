"""qpgevent packaging: the single source of metadata."""

import os
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "qpgevent" / "__init__.py").read_text()).group(1)

# The optional compiled build (docs/architecture.md, "Compiled core"): QPGEVENT_MYPYC=1 compiles
# these pure modules with mypyc; the .py files stay the source, and the default build is pure.
# Chosen by the profile: the per-command path, and server/driver.py that drives it over the
# socket. None is a class plugins subclass or add attributes to: mypyc classes refuse both.
# engine/session.py stays out: plugins hold sessions weakly (auth/dovecot's WeakKeyDictionary,
# the session logger), which mypyc classes do not allow. Nothing holds a Conversation or a
# Driver weakly (Conversation.end breaks the cycle with its session: tests/unit/test_session_lifetime.py).
MYPYC_MODULES = [  # a literal: tests/unit/test_compiled.py reads it
    "qpgevent/core/address.py", "qpgevent/core/arguments.py", "qpgevent/core/chunking.py", "qpgevent/core/codes.py",
    "qpgevent/core/dsn_request.py", "qpgevent/core/events.py", "qpgevent/core/headers.py",
    "qpgevent/core/protocol.py", "qpgevent/core/reply.py", "qpgevent/core/wire.py",
    "qpgevent/engine/authentication.py", "qpgevent/engine/conversation.py", "qpgevent/engine/dialogue.py",
    "qpgevent/engine/extensions.py", "qpgevent/engine/hooks.py", "qpgevent/engine/mail.py",
    "qpgevent/engine/received.py", "qpgevent/engine/sasl.py", "qpgevent/engine/trace.py",
    "qpgevent/server/driver.py",
]


def compiled_modules() -> list:
    """The extension modules of the compiled build, or none (the default, pure build)."""
    if os.environ.get("QPGEVENT_MYPYC") != "1":
        return []
    from mypyc.build import mypycify  # a build requirement of the compiled build only

    return mypycify(MYPYC_MODULES, opt_level="3")


setup(
    name="qpgevent",
    version=VERSION,
    description="A plugin-driven, high-concurrency SMTP server on gevent, in the tradition of qpsmtpd",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The bundled plugins ship inside the package as qpgevent/plugins/.
    packages=[*find_packages(include=["qpgevent", "qpgevent.*"]),
              *(f"qpgevent.plugins{name}" for name in ("", ".queue", ".auth", ".virus"))],
    package_dir={"qpgevent.plugins": "plugins"},
    package_data={"qpgevent": ["configspec.ini", "py.typed"]},
    # caio: Linux AIO for the fsyncs of queue/maildir (backends/kernel_fsync.py).
    install_requires=["gevent>=24.2", "configobj>=5.0.8", "dnspython[idna]>=2.6", "prometheus-client>=0.20",
                      "caio>=0.12.10"],
    # [store] backend = redis needs the Redis client; the embedded store needs nothing more.
    # locust: loadtest/locustfile.py, and tests/loadtest runs it (skipped when it is missing).
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3", "psutil>=5.9", "selenium>=4.20", "redis>=5",
                             "locust>=2.20", "trustme>=1.1", "dkimpy>=1.1", "pyspf>=2.0.14", "ldap3>=2.9",
                             "cryptography>=42",  # queue/outbound's DANE-TA checks (the "outbound" extra)
                             "hypothesis>=6.100",  # tests/hardening: the fuzzers of the sans-I/O core
                             # testing/faulty_disk.py: the FUSE file system of tests/hardening/test_sick_disk.py
                             # (ctypes over Debian's libfuse3; tools/install-test-deps installs fuse3)
                             "mfusepy>=3.1",
                             "mypy>=1.10"],  # .ci/run type-checks the package (mypy.ini)
                    # sender_permitted_from needs pyspf, dkim needs dkimpy: only those plugins.
                    "auth": ["dkimpy>=1.1", "pyspf>=2.0.14"],
                    # auth/ldap and rcpt_ldap: ldap3, pure Python (cooperative under gevent).
                    "ldap": ["ldap3>=2.9"],
                    "loadtest": ["locust>=2.20"],
                    # queue/outbound: DANE-TA (TLSA usage 2) checks a certificate chain with it.
                    "outbound": ["cryptography>=42"],
                    "redis": ["redis>=5"]},
    entry_points={"console_scripts": ["qpgevent = qpgevent.__main__:main"],
                  # The fixtures of qpgevent.testing for plugin packages' own tests.
                  "pytest11": ["qpgevent = qpgevent.testing.pytest_plugin"]},
    ext_modules=compiled_modules(),
    license="MIT",
    classifiers=["Programming Language :: Python :: 3", "Topic :: Communications :: Email :: Mail Transport Agents"],
)
