"""Back ends and services that plugins use: DNS, ident, the state stores, scanners, relay
clients, logging and metrics. Plugins reach them through the plugin API names
(``qpgevent.dns``, ``qpgevent.store``...), never by these paths."""
