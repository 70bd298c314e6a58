"""What a command may write: one writer per output, and ``--overwrite`` that replaces only
what the command itself would write.

Every stage opens its output through :func:`writing`. Before any work it refuses an
output that exists (without ``--overwrite``), that is of another kind than the command
writes (with it), that is one of the command's own inputs, or that is a symbolic link;
while the stage runs it holds a lock beside the output, so a second hitanno writing
the same path refuses at once instead of mixing its files with the first one's.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from hitanno_cli import artifacts
from hitanno_cli.errors import UserError

#: Describes an existing output the command may replace: a format name of
#: :mod:`hitanno_cli.artifacts`, or a test of the path and the name it goes by.
Kind = str | tuple[Callable[[Path], bool], str]


def lock_path(output: Path) -> Path:
    """The lock file of an output: ``.NAME.lock`` beside it."""
    return output.parent / f".{output.name}.lock"


def check_output(output: Path, *, kind: Kind, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse an output the command must not write (see the module docstring)."""
    resolved = output.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if source == resolved or resolved in source.parents:
            raise UserError(f"output {output} is an input of this command ({given})", "write to another path")
    if output.is_symlink():
        raise UserError(f"output {output} is a symbolic link", f"pass the path it points to ({os.readlink(output)})")
    if not os.path.lexists(output) or (output.is_dir() and not any(output.iterdir())):
        return  # nothing there, or an empty folder: nothing to lose
    if not overwrite:
        raise UserError(f"output {output} already exists", "pass --overwrite to replace it")
    test, name = (lambda path: artifacts.kind_of(path) == kind, kind) if isinstance(kind, str) else kind
    if not test(output):
        raise UserError(
            f"{output} is not a {name}; --overwrite replaces only a {name}",
            "write to another path, or remove it yourself",
        )


@contextmanager
def output_lock(output: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold the lock of ``output`` for the block; refuse at once if another process holds it.

    Processes that cooperate on one output (the shards of one encode) take it ``shared``;
    a shared holder still excludes a single writer. The lock is the operating system's
    (``flock``): a process that dies releases it.
    """
    path = lock_path(output)
    made = [parent for parent in reversed(path.parents) if not parent.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"another hitanno is writing {output}", "wait for it to finish, or stop it") from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by the holder we waited on: lock the new one
    try:
        yield
    except BaseException:
        _release(path, fd, shared)
        for parent in reversed(made):  # folders made only for this output: nothing is left of a failure
            with suppress(OSError):
                parent.rmdir()
        raise
    _release(path, fd, shared)


def _release(path: Path, fd: int, shared: bool) -> None:
    """Remove the lock file (unless other shared holders remain) and let go of the lock."""
    if not shared or _no_other_holder(fd):
        path.unlink(missing_ok=True)
    os.close(fd)


def _no_other_holder(fd: int) -> bool:
    """Whether a shared holder is the last one (it may then take the lock exclusively)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextmanager
def writing(
    output: str | Path,
    *,
    kind: Kind,
    overwrite: bool,
    inputs: Sequence[str | Path] = (),
    shared: bool = False,
) -> Iterator[Path]:
    """Check ``output`` (:func:`check_output`) and hold its lock while the block writes it.

    Yields the output as an absolute path (``.`` names a folder, not its contents).
    """
    out = Path(os.path.abspath(output))
    check_output(out, kind=kind, overwrite=overwrite, inputs=inputs)
    with output_lock(out, shared=shared):
        check_output(out, kind=kind, overwrite=overwrite, inputs=inputs)  # as it is now we hold the lock
        yield out


def folder_of(names: Sequence[str], what: str) -> tuple[Callable[[Path], bool], str]:
    """A :data:`Kind` for a folder that holds nothing but some of ``names`` (e.g. a split)."""

    def test(path: Path) -> bool:
        return path.is_dir() and not path.is_symlink() and {p.name for p in path.iterdir()} <= set(names)

    return test, what


#: What ``split`` and ``simulate`` write, and so may replace: a folder of the two files.
PAIR_FOLDER = folder_of(["reference.h5ad", "query.h5ad"], "reference/query folder")


#: The suffixes an input loses before an output's suffix is added (see :func:`default_output`).
INPUT_SUFFIXES = (".h5ad", ".zarr", ".model", ".panel.json", ".json")


def default_output(source: str | Path, suffix: str) -> Path:
    """Where a command writes when ``-o`` is not given: beside its input, named after it
    (``ref.h5ad`` → ``ref.panel.json``, ``ref.zarr`` → ``ref.model``, ``query.h5ad`` →
    ``query.predictions``)."""
    path = Path(source)
    name = path.name.rstrip("/")
    for known in INPUT_SUFFIXES:
        if name.endswith(known) and len(name) > len(known):
            name = name[: -len(known)]
            break
    return path.parent / f"{name}{suffix}"
