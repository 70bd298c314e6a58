"""Conventions every subcommand shares: ``--quiet``, ``--overwrite``, and exit status 2
with a one-line message for bad input."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from rich.markup import escape

from hitanno_cli import console
from hitanno_cli.errors import UserError

F = TypeVar("F", bound=Callable[..., object])

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Silence progress bars and info messages.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")]


def command(func: F) -> F:
    """Wrap a subcommand: honour ``--quiet``; turn :class:`UserError` into exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        console.set_quiet(bool(kwargs.get("quiet", False)))
        try:
            return func(*args, **kwargs)
        except UserError as err:
            console.stderr.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
            raise typer.Exit(UserError.exit_code) from None
        except OSError as err:  # the disk: full, read-only, or a path the user may not write
            console.stderr.print(f"[red]error:[/red] {escape(describe_os_error(err))}", soft_wrap=True)
            raise typer.Exit(UserError.exit_code) from None
        except KeyboardInterrupt:
            console.stderr.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def describe_os_error(err: OSError) -> str:
    """One line for an error of the operating system, naming the file and the fix."""
    where = f" ({err.filename})" if err.filename else ""
    fixes = {
        errno.ENOSPC: "free some disk space and run the command again",
        errno.EROFS: "write the output to a writable file system",
        errno.EACCES: "check the permissions of the output's folder",
        errno.EDQUOT: "free some of your disk quota and run the command again",
    }
    fix = fixes.get(err.errno or 0, "check the path and the disk, and run the command again")
    return f"{err.strerror or err}{where}; {fix} (nothing was replaced)"


def split_list(text: str | None) -> list[str]:
    """``"a,b, c"`` → ``["a", "b", "c"]``; None or empty → ``[]``."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]
