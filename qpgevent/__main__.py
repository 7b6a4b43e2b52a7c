"""Entry point: monkey-patch first, before anything imports socket, ssl or threading."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from .server.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
