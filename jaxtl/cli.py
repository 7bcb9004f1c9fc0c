"""What the command lines share: jaxtl's process settings, and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from jaxtl import runtime
from jaxtl.errors import Interrupted, JaxtlError, ProcessLost, TrainingError

EXIT_USER_ERROR = 2          # bad input or options
EXIT_TRAINING_STOPPED = 3    # training stopped, e.g. on a non-finite loss
EXIT_INTERRUPTED = 130       # Ctrl-C or SIGTERM, as a shell reports SIGINT


def run_cli(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, make jaxtl's process settings and run ``main``; a :class:`JaxtlError` prints one
    line and exits 2 (3 when training stopped, 130 when interrupted).

    ``--debug`` (added to every parser) shows the full traceback instead.
    """
    if "--debug" not in parser._option_string_actions:
        parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    runtime.configure()
    try:
        return int(main(args) or 0)
    except JaxtlError as e:
        if getattr(args, "debug", False):
            raise
        stopped = isinstance(e, TrainingError)
        print(f"{parser.prog}: {'stopped' if stopped else 'error'}: {e}", file=sys.stderr)
        if isinstance(e, ProcessLost):
            # A normal exit would wait at JAX's shutdown barrier for the lost process, then abort.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_TRAINING_STOPPED)
        if isinstance(e, Interrupted):
            return EXIT_INTERRUPTED
        return EXIT_TRAINING_STOPPED if stopped else EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        print(f"{parser.prog}: interrupted" + (f" ({e})" if str(e) else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
