"""The exceptions that mean something went wrong (decisions are return codes, not these)."""


class QpgeventError(Exception):
    """Base of our own errors."""


class ConfigError(QpgeventError):
    """The configuration is wrong; the text names file, line and key, fit for one line."""


class StartError(QpgeventError):
    """The server cannot start (cannot listen, cannot create a folder): exit status 1."""


class PluginLoadError(ConfigError):
    """A plugin cannot be found, imported, or does not fit the hook table."""
