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
    """``use_dns(port, timeout=2.0, cache=True)``: the ``qpgevent.dns`` calls the test makes
    itself ask 127.0.0.1:port, until it ends. A server or a harness asks what its own
    ``[dns]`` names (``dns_port=...``, ``PluginHarness(dns=...)``), not this."""
    from ..backends import dns

    blocks = []

    def use(port: int, timeout: float = 2.0, cache: bool = True) -> None:
        block = dns.use(dns.Resolver(["127.0.0.1"], port=port, timeout=timeout, cache=cache))
        block.__enter__()
        blocks.append(block)

    yield use
    for block in reversed(blocks):
        block.__exit__(None, None, None)


@pytest.fixture
def plugin_harness(tmp_path):
    """``plugin_harness(name_or_file, after="", dns=None, settings=None, **options)``: a PluginHarness.

    A harness given ``dns`` (a ``LoopbackDns``) resolves with it: its own resolver, as a
    server's; nothing of the process changes. Their stores are closed when the test ends.
    """
    from . import PluginHarness

    count = iter(range(1, 1000))
    made: list[Any] = []

    def make(plugin: Any = None, **kwargs: Any) -> Any:
        directory = tmp_path / f"harness{next(count)}"
        directory.mkdir()
        made.append(PluginHarness(directory, plugin, **kwargs))
        return made[-1]

    yield make
    for harness in made:
        harness.services.close()


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
