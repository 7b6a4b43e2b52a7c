"""The engine: the hook table and runner, the plugin loader (and the conversation that asks the
hooks). No sockets: the server side drives it."""
