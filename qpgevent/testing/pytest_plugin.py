"""pytest fixtures for plugin packages: ``plugin_harness``, ``loopback_dns``, ``use_dns``, ``qpgevent_server``.

Registered as the ``pytest11`` entry point ``qpgevent``, so a package that depends on
qpgevent has them in its tests with no conftest. Run the tests as
``python -m gevent.monkey --module pytest`` (sockets cooperative before anything imports
them). Each fixture is a factory; what it starts is stopped when the test ends::

    def test_refuses_listed_client(plugin_harness, loopback_dns):
        dns = loopback_dns(blocklist_zone("zen.test", {"192.0.2.9": ("127.0.0.2", "listed")}))
        harness = plugin_harness("dnsbl", zones=["zen.test"], dns=dns)
        assert harness.run_session(["EHLO x.test"], ip="192.0.2.9").codes == [554]

The qpgevent modules are imported by the fixtures, not when pytest loads this plugin.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def loopback_dns():
    """``loopback_dns(zones, **options)``: a started ``qpgevent.testing.dns.LoopbackDns``."""
    from .dns import LoopbackDns

    started: list[Any] = []

    def start(zones: dict[str, Any], **options: Any) -> Any:
        server = LoopbackDns(zones, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def use_dns():
    """``use_dns(port, timeout=2.0, cache=True)``: the process's resolver asks 127.0.0.1:port;
    the previous resolver is put back when the test ends."""
    from ..backends import dns

    previous = dns.set_default(None)

    def use(port: int, timeout: float = 2.0, cache: bool = True) -> None:
        dns.set_default(dns.Resolver(["127.0.0.1"], port=port, timeout=timeout, cache=cache))

    yield use
    dns.set_default(previous)


@pytest.fixture
def plugin_harness(tmp_path):
    """``plugin_harness(name_or_file, after="", dns=None, settings=None, **options)``: a PluginHarness.

    A harness given ``dns`` makes the process's resolver ask it; the previous resolver is
    put back when the test ends.
    """
    from ..backends import dns as dns_module
    from . import PluginHarness

    count = iter(range(1, 1000))
    previous = dns_module.set_default(None)
    dns_module.set_default(previous)

    def make(plugin: Any = None, **kwargs: Any) -> Any:
        directory = tmp_path / f"harness{next(count)}"
        directory.mkdir()
        return PluginHarness(directory, plugin, **kwargs)

    yield make
    dns_module.set_default(previous)


@pytest.fixture
def qpgevent_server(tmp_path):
    """``qpgevent_server(plugins_ini_text, **settings)``: the real server in this process."""
    from . import DEFAULT_PLUGINS, InProcessServer, write_ini

    started: list[Any] = []

    def start(plugins: str = DEFAULT_PLUGINS, **settings: Any) -> Any:
        ini = write_ini(tmp_path, plugins, **settings)
        server = InProcessServer(ini)
        server.maildir = tmp_path / "Maildir"
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(0.5)
