"""Fixtures of the milter tests: the real daemons (module-scoped: each takes a moment to start,
and the libmilter ones are killed, not asked, at the end) and a helper to send one message."""

from __future__ import annotations

import pytest

from qpgevent.testing.scanners import LoopbackClamd

from milter_daemons import ClamavMilter, OpenDkim, OpenDmarc, Rspamd


@pytest.fixture(scope="module")
def opendkim():
    with OpenDkim() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def clamd():
    with LoopbackClamd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def clamav_milter(clamd):
    with ClamavMilter(clamd) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def rspamd():
    with Rspamd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def opendmarc():
    with OpenDmarc() as daemon:
        yield daemon
