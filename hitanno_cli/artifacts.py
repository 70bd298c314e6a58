"""Versioned on-disk artifacts: headers, content hashes and atomic writes.

Every artifact hitanno writes carries a *header*: its format name and version, the
hitanno version and creation time that made it, the parameters used, and the content
hash of each input. Readers call :func:`check_header` so that an unknown format, a
newer major version or a mismatched input is refused with a one-line message.
The formats themselves are documented in ``docs/artifacts.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from hitanno_cli import __version__
from hitanno_cli.errors import UserError

PANEL = "hitanno.panel"
SENTENCES = "hitanno.sentences"
MODEL = "hitanno.model"
CLUSTER_MODEL = "hitanno.cluster_model"
PREDICTIONS = "hitanno.predictions"
#: The label predictions.csv gives cells below --min-confidence.
UNASSIGNED = "Unassigned"
ATTENTION = "hitanno.attention"
EVALUATION = "hitanno.evaluation"
RUN = "hitanno.run"
ADAPTATION = "hitanno.adaptation"

#: The (major, minor) version each format is written with. A reader accepts any
#: minor version of its major (minor bumps only add fields) and refuses a newer major.
#: Version 1.1 of a format adds the hashes that cover all of its content; a 1.0
#: artifact, written before them, is read without them.
FORMAT_VERSIONS: dict[str, tuple[int, int]] = {
    PANEL: (1, 0),
    SENTENCES: (1, 1),
    MODEL: (1, 1),
    CLUSTER_MODEL: (1, 1),
    PREDICTIONS: (1, 2),
    ATTENTION: (1, 1),
    EVALUATION: (1, 1),
    RUN: (1, 1),
    ADAPTATION: (1, 1),
}


def is_hashed(header: dict[str, Any]) -> bool:
    """Whether an artifact's version carries hashes of all its content (1.1 and later)."""
    return _version(header) >= (1, 1)


def _version(header: dict[str, Any]) -> tuple[int, int]:
    """``(major, minor)`` of a header's ``format_version``; ValueError if it is not ``M.m``."""
    major, dot, minor = str(header.get("format_version")).partition(".")
    if not dot:
        raise ValueError(header.get("format_version"))
    return int(major), int(minor)


_HASH_BLOCK = 1 << 22


def make_header(fmt: str, params: Mapping[str, Any], inputs: Mapping[str, str]) -> dict[str, Any]:
    """The header every artifact of format ``fmt`` starts with.

    ``inputs`` maps a role ("reference", "panel", ...) to that input's content hash.
    """
    major, minor = FORMAT_VERSIONS[fmt]
    return {
        "format": fmt,
        "format_version": f"{major}.{minor}",
        "hitanno_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": dict(params),
        "inputs": dict(inputs),
    }


def check_header(header: Any, fmt: str, source: str | Path) -> dict[str, Any]:
    """Validate ``header`` as format ``fmt``; raise :class:`UserError` otherwise."""
    if not isinstance(header, dict) or "format" not in header:
        raise UserError(
            f"{source} is not a hitanno artifact (no format header)",
            f"pass a file written by hitanno ({fmt})",
        )
    if header["format"] != fmt:
        raise UserError(
            f"{source} is a '{header['format']}' artifact, not '{fmt}'",
            "check which file you passed",
        )
    try:
        major = _version(header)[0]
    except ValueError:
        raise UserError(f"{source} has an unreadable format version", "re-create it") from None
    supported = FORMAT_VERSIONS[fmt][0]
    if major > supported:
        raise UserError(
            f"{source} is {fmt} version {header['format_version']}, newer than this "
            f"hitanno {__version__} reads (major {supported})",
            "upgrade hitanno (pip install -U hitanno) or re-create the artifact",
        )
    return header


def sha256_file(path: str | Path, cancel: threading.Event | None = None) -> str:
    """Content hash of a file, read in blocks (never the whole file in memory).

    A hash running in a background thread stops at the next block once ``cancel`` is
    set, and returns ``""``.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            if cancel is not None and cancel.is_set():
                return ""
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """The canonical JSON text of ``obj`` (sorted keys, no spaces): what content hashes cover."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    """Content hash of a text (UTF-8)."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@contextmanager
def sha256_file_in_background(path: str | Path) -> Iterator[Future[str]]:
    """Hash a file in a background thread while the caller works on it.

    hashlib and file reads release the GIL, so the hash costs no wall time on a second
    core. On leaving the block (an error included) an unfinished hash stops at its next
    block instead of reading the rest of a large file.
    """
    pool, cancel = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hitanno-hash"), threading.Event()
    try:
        yield pool.submit(sha256_file, path, cancel)
    finally:
        cancel.set()
        pool.shutdown(wait=True)


def sha256_json(obj: Any) -> str:
    """Content hash of a JSON-serialisable object in canonical form."""
    return sha256_text(canonical_json(obj))


def sha256_lines(items: Sequence[Any]) -> str:
    """Content hash of a sequence of strings, one per line (e.g. peak names)."""
    digest = hashlib.sha256()
    if hasattr(items, "tolist"):  # a numpy array: Python strings join faster than numpy scalars
        items = items.tolist()
    for lo in range(0, len(items), 65536):  # in blocks: one update per line costs more than the hashing
        digest.update(("\n".join(map(str, items[lo : lo + 65536])) + "\n").encode())
    return "sha256:" + digest.hexdigest()


#: Strings per chunk of a string array in a zarr store (cell ids, labels).
STRING_CHUNK = 65536


def write_strings(group: Any, name: str, values: np.ndarray) -> None:
    """Write ``values`` as the string array ``name`` of a zarr group.

    An array shorter than :data:`STRING_CHUNK` is one chunk of its own length: zarr
    encodes whole chunks, padding included.
    """
    chunk = max(1, min(len(values), STRING_CHUNK))
    group.create_array(name, shape=values.shape, chunks=(chunk,), dtype=str)[:] = values


# -- telling artifacts apart --------------------------------------------------------------
#: Files a directory artifact keeps its header in, in the order they are looked for.
HEADER_FILES = ("zarr.json", "model.safetensors", "probabilities.zarr", "metrics.json", "summary.json", "run.json")


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of any hitanno artifact, with its summary fields.

    A sentence store's attributes, a model's safetensors metadata (JSON values decoded),
    a JSON artifact without its bulk content (a panel's peaks), the predictions'
    attributes for a ``predictions.csv`` or its folder. ``result["header"]["format"]``
    names the kind; anything else is refused.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist", "check the path")
    if path.is_dir() and (path / "zarr.json").is_file():
        attrs = read_json(path / "zarr.json", "zarr metadata").get("attributes", {})
        found = attrs.get("hitanno") if isinstance(attrs, dict) else None
    elif path.is_dir():
        inner = next((path / name for name in HEADER_FILES[1:] if (path / name).exists()), None)
        if inner is None:
            raise UserError(f"{path} is not a hitanno artifact", "pass a panel, sentence store, model or predictions")
        return read_header(inner)
    elif path.suffix == ".safetensors":
        found = {key: _maybe_json(value) for key, value in _safetensors_metadata(path).items()}
    elif path.suffix == ".csv":
        return read_header(path.parent / "probabilities.zarr")
    else:
        obj = read_json(path, "artifact")
        found = {k: v for k, v in obj.items() if k != "panel"} if isinstance(obj, dict) else None
    if not isinstance(found, dict) or not isinstance(found.get("header"), dict) or "format" not in found["header"]:
        raise UserError(f"{path} is not a hitanno artifact", "pass a panel, sentence store, model or predictions")
    return found


def kind_of(path: str | Path) -> str | None:
    """The format name of the artifact at ``path``; None for anything else (an ``.h5ad``, say)."""
    try:
        return str(read_header(path)["header"]["format"])
    except UserError:
        return None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, refusing a file that is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err})", "re-create it") from None


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_mode(path: Path, directory: bool) -> None:
    """Give a temporary file or folder the permissions a plain create would (mkstemp uses 0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless ``--overwrite`` was given."""
    if os.path.lexists(path) and not overwrite:  # a dangling symbolic link exists too
        raise UserError(f"output {path} already exists", "pass --overwrite to replace it")


def replace_path(tmp: Path, final: Path) -> None:
    """Move ``tmp`` onto ``final``, removing an old ``final`` only at the last moment.

    An empty folder ``final`` (one the user made, or the folder they work in) is kept and
    filled with ``tmp``'s entries instead, so that it stays the same folder.
    """
    if tmp.is_dir() and final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
        for entry in tmp.iterdir():
            os.replace(entry, final / entry.name)
        tmp.rmdir()
    elif final.is_dir() and not final.is_symlink():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    final = Path(path)
    refuse_existing(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        ordinary_mode(Path(tmp), directory=False)
        replace_path(Path(tmp), final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any, overwrite: bool = False, pretty: bool = True) -> None:
    """Write JSON atomically; pretty-printed unless ``pretty=False``.

    Pretty output goes through Python's slow pure-Python encoder; large artifacts
    (a panel of every peak) pass ``pretty=False`` for the C encoder, ~10x faster.
    """
    text = json.dumps(obj, indent=1 if pretty else None, ensure_ascii=False)
    atomic_write_text(path, text + "\n", overwrite)


def sealed(obj: dict[str, Any], key: str = "content_hash") -> dict[str, Any]:
    """``obj`` with ``obj[key]`` = the hash of everything else in it (canonical JSON)."""
    body = {name: value for name, value in obj.items() if name != key}
    return {**body, key: sha256_json(body)}


def seal_holds(obj: dict[str, Any], key: str = "content_hash") -> bool:
    """Whether ``obj[key]`` is the hash of the rest of ``obj`` (see :func:`sealed`)."""
    return obj.get(key) == sealed(obj, key)[key]


def sha256_array(array: np.ndarray) -> str:
    """Content hash of an array's bytes (C order)."""
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(array)).hexdigest()


def write_verified_json(path: str | Path, obj: dict[str, Any]) -> None:
    """Write a JSON artifact with the hash of its content (``content_hash``), atomically."""
    write_json(path, sealed(obj), overwrite=True)


def read_verified_json(path: str | Path, fmt: str, fix: str) -> dict[str, Any]:
    """Read a JSON artifact of format ``fmt`` written by :func:`write_verified_json`, refusing
    one whose content does not match its hash (``fix`` says what to do then)."""
    obj = read_json(path, fmt.removeprefix("hitanno."))
    if not isinstance(obj, dict):
        raise UserError(f"{path} is corrupted or was edited (not a JSON object)", fix)
    header = check_header(obj.get("header"), fmt, path)
    if (is_hashed(header) or "content_hash" in obj) and not seal_holds(obj):
        raise UserError(f"{path} is corrupted or was edited: its content does not match its hash", fix)
    return obj


def read_text(path: str | Path, what: str) -> str:
    """Read a text artifact, turning a missing or undecodable file into a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist", f"pass the path of an existing {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not text (corrupted?)", "re-create it") from None


def parse_json(text: str, path: str | Path, what: str) -> Any:
    """Parse a JSON artifact's text, turning garbled JSON into a UserError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON ({err})", "re-create it") from None


def read_json(path: str | Path, what: str) -> Any:
    """Read a JSON artifact, turning a missing or garbled file into a UserError."""
    return parse_json(read_text(path, what), path, what)


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; rename it into place on success.

    On any error the temporary directory is removed, so no partial artifact is left
    and an existing output is untouched.
    """
    final = Path(path)
    refuse_existing(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    ordinary_mode(tmp, directory=True)
    try:
        yield tmp
        replace_path(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
