"""The command line: `fedit --help`."""

from fedit.cli.app import app

__all__ = ["app"]
