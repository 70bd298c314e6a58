"""Logging and progress bars on stderr (results go to files, never to stdout noise)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True, highlight=False, soft_wrap=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence progress bars and informational messages (errors still print)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    """Whether ``--quiet`` was given."""
    return _quiet


def info(message: str) -> None:
    """An informational line on stderr, unless quiet."""
    if not _quiet:
        stderr.print(message)


def warn(message: str) -> None:
    """A warning on stderr; shown even when quiet, since it may change the result."""
    stderr.print(f"[yellow]warning:[/yellow] {message}")


class _Bar:
    """A handle on one progress task: ``advance(n)`` and ``update(**fields)``."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, **fields: object) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)


@contextmanager
def progress(description: str, total: float | None, unit: str = "cells") -> Iterator[_Bar]:
    """A rich progress bar on stderr for long work; a no-op when quiet."""
    if _quiet:
        yield _Bar(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=stderr, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield _Bar(bar, task)
