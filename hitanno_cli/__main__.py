"""Entry point of ``hitanno`` and ``python -m hitanno_cli``.

The command line is imported inside :func:`main`, so that Ctrl-C while its modules load
ends the program with a line and exit status 130, not a traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run the ``hitanno`` command line."""
    try:
        from hitanno_cli.cli import app

        app()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
