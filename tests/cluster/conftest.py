"""One cluster for the module's tests (building it takes a few seconds: the Sentinels)."""

from __future__ import annotations

import pytest

from lab_cluster import build, tear_down


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    made = build(tmp_path_factory.mktemp("cluster"))
    try:
        with made.lab.inside("client"):
            yield made
    finally:
        tear_down(made)


@pytest.fixture
def all_up(cluster):
    """Each test starts with every host running and UP in HAProxy, and the Sentinels agreed."""
    for host in cluster.hosts.values():
        if host.process is None or host.process.process.poll() is not None:
            host.start()
    cluster.wait_states({name: "UP" for name in cluster.hosts})
    return cluster
