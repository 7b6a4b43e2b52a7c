"""import_error_lines: a test plugin whose import fails with a message of several lines.

Some real packages raise ImportError with long multi-line explanations; the CLI must
still print one line.
"""

raise ImportError("this plugin cannot load:\n  a second line of explanation\n  and a third")
