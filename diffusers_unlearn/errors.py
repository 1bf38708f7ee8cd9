"""Errors that the user can fix, and how the scripts report them.

A `UserInputError` names the problem and the fix. The scripts print it as one line (no traceback) and exit
with status 2, like argparse does; any other exception is a bug and keeps its traceback.

Example:
    >>> raise UserInputError("--forget_data_dir missing/ does not exist: pass a folder of images.")  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from typing import Callable


class UserInputError(ValueError):
    """Bad input (a flag, a path, a data set, a checkpoint) that the user can fix; the message says how."""


def run_script(entry: Callable[[], None], prog: str) -> None:
    """Call `entry()`; a `UserInputError` becomes `prog: error: <message>` on stderr and exit status 2."""
    try:
        entry()
    except UserInputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = ["UserInputError", "run_script"]
