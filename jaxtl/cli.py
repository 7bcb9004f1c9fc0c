"""What the command lines share: one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from jaxtl import runtime
from jaxtl.errors import JaxtlError

EXIT_USER_ERROR = 2


def run_cli(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run ``main``; a :class:`JaxtlError` prints one line and exits 2.

    ``--debug`` (added to every parser) shows the full traceback instead.
    """
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    runtime.configure()
    try:
        return int(main(args) or 0)
    except JaxtlError as e:
        if args.debug:
            raise
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
