"""What every command-line entry point shares: bad input is one line on stderr and exit code 2.

    parser = OneLineErrorParser(description=...)      # a parser of our own
    one_line_errors(build_parser())                    # a parser built elsewhere, same behaviour

An unknown flag reads `<prog>: error: unrecognized argument --foo (did you mean --bar?)`.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import types


def unknown_argument_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """One line naming the first argument the parser does not know and its closest known flag."""
    first = extras[0]
    if not first.startswith("-"):
        return f"unexpected argument {first!r}"
    flag = first.split("=", 1)[0]
    known = [s for s in parser._option_string_actions if s.startswith("--")]
    close = difflib.get_close_matches(flag, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unrecognized argument {flag}{hint}"


def _parse_args(self, args=None, namespace=None):
    args = sys.argv[1:] if args is None else list(args)
    # First pass without required flags: a mistyped required flag reads as the typo, not as missing.
    required = [action for action in self._actions if action.required]
    for action in required:
        action.required = False
    try:
        _, extras = self.parse_known_args(args, argparse.Namespace())
    finally:
        for action in required:
            action.required = True
    if extras:
        self.error(unknown_argument_message(self, extras))
    return self.parse_known_args(args, namespace)[0]


def _error(self, message):
    if "(did you mean" not in message:
        message += " (see --help)"
    self.exit(2, f"{self.prog}: error: {message}\n")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error prints one line (not the usage block) and exits 2."""

    parse_args = _parse_args
    error = _error


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a parser built by someone else (e.g. training.arguments.build_parser) the same errors."""
    parser.parse_args = types.MethodType(_parse_args, parser)
    parser.error = types.MethodType(_error, parser)
    return parser
