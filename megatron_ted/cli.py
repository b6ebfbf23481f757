"""What every command-line entry point shares: bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error prints one line (not the usage block) and exits 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")
