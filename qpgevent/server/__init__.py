"""I/O and processes: the per-connection driver, TLS, parking, the listener, the pre-fork master,
the admin server and the command line."""
