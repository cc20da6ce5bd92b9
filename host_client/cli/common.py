"""Helpers shared by the coworkctl subcommands: client construction, output, errors.

Subcommand modules import grpc (through the client) only inside handlers, so
`--help` and usage errors never pay for it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from ..units import human_bytes

if TYPE_CHECKING:
    from ..client import CoworkClient

__all__ = ["human_bytes"]  # re-exported for the subcommands

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """A failure to report as one line on stderr with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, exit_code: int = EXIT_FAILURE) -> NoReturn:
    raise CliError(message, exit_code)


def make_client(args: argparse.Namespace) -> CoworkClient:
    from ..client import CoworkClient

    return CoworkClient(target=args.target, token_file=args.token_file)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()
