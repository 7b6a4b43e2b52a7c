"""Fixtures for the service plugins (rspamd, policy delegation, qmail-queue): the real
Debian daemons of ``service_daemons.py``, each started once per module and stopped after it."""

from __future__ import annotations

import shutil

import pytest

from qpgevent.testing.dns import LoopbackDns

from service_daemons import SPF_ZONES, LoopbackRspamd, Postfwd, Postgrey, SpfPolicy


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:  # a missing daemon fails, never skips
        pytest.fail(f"{tool} is not installed: run tools/install-test-deps (Debian package {package})")


@pytest.fixture(scope="module")
def rspamd():
    _need("rspamd", "rspamd")
    with LoopbackRspamd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def spf_dns():
    _need("nsd", "nsd")
    with LoopbackDns(SPF_ZONES) as dns:
        yield dns


@pytest.fixture(scope="module")
def spf_policy(spf_dns):
    _need("socat", "socat")
    _need("policyd-spf", "postfix-policyd-spf-python")
    with SpfPolicy(spf_dns.port) as daemon:
        yield daemon


@pytest.fixture
def postgrey():
    _need("postgrey", "postgrey")
    with Postgrey() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def postfwd():
    _need("socat", "socat")
    _need("postfwd1", "postfwd")
    with Postfwd() as daemon:
        yield daemon
