"""Per-listener plugin chains: which plugins the sessions of each listener run.

``[plugins]`` is every listener's chain, unless ``[listeners]`` says otherwise for a listen
address (``config.ListenerChain``): its own plugins come first (so its rcpt or queue
plugin has the first say), then the common ones it does not leave out (``without``), or
none of them (``only``). A common plugin is one instance shared by every chain that runs
it; a listener's own plugins are instances of their own.
"""

from __future__ import annotations

from ..config import Listen, Settings
from ..plugin import Plugin
from .loader import load_plugin, plugin_dirs


def listener_chains(settings: Settings, common: list[Plugin]) -> list[tuple[Listen, list[Plugin], list[Plugin]]]:
    """Per configured listener that differs: (the listener, its chain, its own plugins)."""
    dirs = plugin_dirs(settings)
    chains = []
    for chain in settings.listeners:
        own = [load_plugin(spec, dirs, settings.base_dir) for spec in chain.plugins]
        kept = [] if chain.only else [plugin for plugin in common if plugin.name not in chain.without]
        chains.append((Listen(chain.host, chain.port), own + kept, own))
    return chains
