"""Subcommands of the `fluxc` command line (see fluxc.cli)."""
