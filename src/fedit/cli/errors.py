"""How a command fails: one red line on stderr, never a traceback.

``@one_line_errors`` turns a :class:`~fedit.errors.FeditError` or a ``ValueError`` raised
anywhere in a command into ``error: <message>`` and exit code 2; ``resume_hint`` turns
Ctrl-C during a run into the command that continues it, and exit code 130.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

import typer

from fedit.errors import FeditError

P = ParamSpec("P")
R = TypeVar("R")

#: exit code of a command stopped by a FeditError or ValueError (click's usage errors: 2 too)
ERROR_EXIT = 2
#: exit code of a run stopped with Ctrl-C (128 + SIGINT)
INTERRUPTED_EXIT = 130


def one_line_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command: a FeditError or ValueError ends it as one ``error:`` line."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (FeditError, ValueError) as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(ERROR_EXIT) from None

    return run


@contextmanager
def resume_hint(run_dir: Path) -> Iterator[None]:
    """Ctrl-C inside: say how to continue the run in ``run_dir``, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        typer.secho(f"\ninterrupted: continue from the last committed round with "
                    f"`fedit train --resume {run_dir}`", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(INTERRUPTED_EXIT) from None
