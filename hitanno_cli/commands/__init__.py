"""The subcommands of the ``hitanno`` command line, one module per stage family."""
