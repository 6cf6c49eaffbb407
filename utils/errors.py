"""One kind of user-facing error: raised where the problem is found, reported as one line in one place.

Every problem a user can fix (a bad argument, a missing file, a model we do not train, an output
directory in use, a failed write) raises a `UserError` subclass carrying one line for the user and the
exit code a scheduler or shell script should see. The command-line entry points wrap their work in
`one_line_errors(prog)`, which turns any of them into `prog: error: <line>` on stderr and that exit code;
nothing else prints them. `rewards` is a leaf package and cannot import this module, so its own base,
`rewards.RewardError`, is the other member of `USER_ERRORS`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rewards.errors import RewardError

EXIT_BAD_INPUT = 2  # argparse's code for a bad command line; every input problem uses it
EXIT_RUN_FAILED = 1  # the run could not finish its work: a write failed, or the processes disagree


class UserError(Exception):
    """A problem the user can fix; `str(error)` is the one line they read."""

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ArgumentError(UserError, ValueError):
    """A bad argument, or a combination of arguments that cannot work (train_draftplus.py's checks)."""


USER_ERRORS: tuple[type[Exception], ...] = (UserError, RewardError)


def exit_code_of(error: BaseException) -> int:
    return getattr(error, "exit_code", EXIT_BAD_INPUT)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_first_process() -> bool:
    """Global rank 0 (or a run without a launcher): the one process that speaks for all of them."""
    return os.environ.get("RANK", "0") == "0"


def say(prog: str, message: str) -> None:
    """`prog: message` on stderr, from the first process only (every rank would say the same)."""
    if is_first_process():
        print(f"{prog}: {message}", file=sys.stderr, flush=True)


def fail(prog: str, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
    """Print `prog: error: message` (from the first process only: every rank fails alike) and exit."""
    say(prog, f"error: {message}")
    raise SystemExit(exit_code)


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Turn a `USER_ERRORS` exception raised inside into one line on stderr and its exit code. Also a
    decorator: `@one_line_errors("prog")` on the functions a command line (or a wrapper script) calls."""
    try:
        yield
    except USER_ERRORS as e:
        fail(prog, first_line(e), exit_code_of(e))
