"""Pieces every ``mjfilter`` command module shares: help layout, ``-c``, exit codes."""

from __future__ import annotations

import argparse

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Man-page-like help: descriptions kept as written, wide option column."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=88)


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE",
                   help="configuration file (default: $MJFILTER_CONFIG or /etc/mjfilter/mjfilter.yaml)")
