"""Entry point for ``python -m hitanno_cli``."""

from hitanno_cli.cli import main

if __name__ == "__main__":
    main()
