"""The sentence store: a zarr v3 group of every cell's packed sentence, verified as read.

Layout (format ``hitanno.sentences``)::

    bits         uint8 [cells, ceil(n_types·P / 8)], chunked by cells, zstd level 1
    bits_sha256  uint8 [n_chunks, 32]: the SHA-256 of every chunk of ``bits``
    cell_ids     str [cells]
    labels       str [cells] ("" where missing), only when encoded with a label column
    panel        str [1]: the panel the store was encoded through, as its file reads
    attrs["hitanno"]: header, content_hash, n_cells, cell_types, peaks_per_type,
                      panel_hash, coverage, labels, array_hashes, meta_hash

The content hash covers the chunk digests, the ids and the labels. Every piece is
verified where it is read: the attributes against ``meta_hash`` (their own hash) and the
digest, id and label arrays against ``array_hashes`` when the store is opened or the
array read, and every chunk of ``bits`` against its digest as it is streamed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from hitanno_cli import artifacts
from hitanno_cli.errors import UserError
from hitanno_cli.panel import Panel
from hitanno_cli.sentences.packing import OpenRows, unpack_open

#: Target raw bytes per zarr chunk of packed states.
CHUNK_BYTES = 1 << 22


def chunk_cells_for(n_bytes: int) -> int:
    """Cells per zarr chunk: about :data:`CHUNK_BYTES`, a multiple of 256."""
    cells = CHUNK_BYTES // max(n_bytes, 1)
    return int(min(max(cells // 256 * 256, 256), 16384))


def chunk_digest(rows: np.ndarray) -> np.ndarray:
    """SHA-256 ``[32]`` (uint8) of a chunk of packed rows, hashed in place (no copy)."""
    return np.frombuffer(hashlib.sha256(np.ascontiguousarray(rows)).digest(), np.uint8)


def bits_specs(n_cells: int, n_bytes: int) -> dict[str, dict[str, Any]]:
    """The packed-state arrays of a store: ``bits`` chunked by cells, and one digest per chunk."""
    chunk = chunk_cells_for(n_bytes)
    n_chunks = -(-n_cells // chunk)
    return {
        "bits": dict(
            shape=(n_cells, n_bytes),
            chunks=(chunk, n_bytes),
            dtype="uint8",
            compressors=ZstdCodec(level=1),
            fill_value=0,
        ),
        "bits_sha256": dict(
            shape=(n_chunks, 32), chunks=(max(n_chunks, 1), 32), dtype="uint8", compressors=None, fill_value=0
        ),
    }


@dataclass
class StoreIdentity:
    """What a store says about itself besides its packed states."""

    header: dict[str, Any]
    cell_types: list[str]
    peaks_per_type: int
    panel_hash: str
    coverage: dict[str, Any]
    label_key: str | None
    panel_text: str | None = None  # the panel file's text, kept in the store


#: Bytes per chunk of a text kept in a store (its panel).
TEXT_CHUNK = 1 << 20


def write_text(group: zarr.Group, name: str, text: str) -> None:
    """Keep ``text`` as the UTF-8 bytes array ``name``: a one-element string array of a
    multi-megabyte text costs zarr a copy per character's worth of padding on write."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    chunk = max(1, min(data.size, TEXT_CHUNK))
    group.create_array(name, shape=data.shape, chunks=(chunk,), dtype=np.uint8)[:] = data


def read_text(array: zarr.Array) -> str:
    """A text written by :func:`write_text` (or, in older stores, a one-element string array)."""
    if array.dtype == np.uint8:
        return array[:].tobytes().decode("utf-8")
    return str(array[0])


def write_cells_and_attrs(
    group: zarr.Group, identity: StoreIdentity, digests: np.ndarray, ids: np.ndarray, labels: np.ndarray | None
) -> None:
    """Write a store's chunk digests, cell ids and labels, and its attributes (content hash included)."""
    group["bits_sha256"][:] = digests
    artifacts.write_strings(group, "cell_ids", ids)
    ids_hash = artifacts.sha256_lines(ids)
    content = hashlib.sha256(digests.tobytes())
    content.update(ids_hash.encode())
    label_info, labels_hash = None, None
    if labels is not None:
        artifacts.write_strings(group, "labels", labels)
        labels_hash = artifacts.sha256_lines(labels)
        content.update(labels_hash.encode())
        label_info = {"key": identity.label_key, "missing": int((labels == "").sum())}
    panel_hash = None
    if identity.panel_text is not None:
        write_text(group, "panel", identity.panel_text)
        panel_hash = artifacts.sha256_text(identity.panel_text)
    meta = {
        "header": identity.header,
        "content_hash": "sha256:" + content.hexdigest(),
        "n_cells": int(ids.shape[0]),
        "cell_types": list(identity.cell_types),
        "peaks_per_type": int(identity.peaks_per_type),
        "panel_hash": identity.panel_hash,
        "coverage": identity.coverage,
        "labels": label_info,
        "array_hashes": {
            "bits_sha256": artifacts.sha256_array(digests),
            "cell_ids": ids_hash,
            "labels": labels_hash,
            "panel": panel_hash,
        },
    }
    group.attrs["hitanno"] = artifacts.sealed(meta, "meta_hash")


def write_store(
    out: str | Path,
    *,
    blocks: Iterator[np.ndarray],
    ids: np.ndarray,
    labels: np.ndarray,
    like: SentenceStore,
    params: dict[str, Any],
    inputs: dict[str, str],
    overwrite: bool = False,
) -> Path:
    """Write a labelled store of packed rows through ``like``'s panel, atomically.

    ``blocks`` yields packed rows ``[rows, n_bytes]`` in order (any sizes; regrouped into
    the store's chunks), ``ids`` and ``labels`` one entry per row. Used for stores made from
    other stores (self-training), never from an ``.h5ad``.
    """
    out = Path(out)
    artifacts.refuse_existing(out, overwrite)
    n_cells = int(ids.shape[0])
    specs = bits_specs(n_cells, (len(like.cell_types) * like.peaks_per_type + 7) // 8)
    with artifacts.atomic_dir(out, overwrite=overwrite) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        bits = group.create_array("bits", **specs["bits"])
        group.create_array("bits_sha256", **specs["bits_sha256"])
        digests = np.zeros((specs["bits_sha256"]["shape"][0], 32), dtype=np.uint8)
        written = 0
        for k, part in enumerate(_regroup(blocks, bits.chunks[0])):
            digests[k] = chunk_digest(part)
            bits[written : written + part.shape[0]] = part
            written += part.shape[0]
        if written != n_cells:
            raise ValueError(f"write_store: {written} rows written for {n_cells} cell ids")
        identity = StoreIdentity(
            header=artifacts.make_header(artifacts.SENTENCES, params, inputs),
            cell_types=like.cell_types,
            peaks_per_type=like.peaks_per_type,
            panel_hash=like.panel_hash,
            coverage=dict(like.meta.get("coverage", {})),
            label_key=(like.meta.get("labels") or {}).get("key"),
            panel_text=like.panel_text(),
        )
        write_cells_and_attrs(group, identity, digests, ids, labels)
    return out


def _regroup(blocks: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Rows of ``blocks`` in consecutive groups of ``size`` (the last may be shorter)."""
    pending: list[np.ndarray] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += block.shape[0]
        while held >= size:
            joined = np.concatenate(pending)
            yield np.ascontiguousarray(joined[:size])
            pending, held = [joined[size:]], held - size
    if held:
        yield np.concatenate(pending)


class SentenceStore:
    """A finished sentence store, opened read-only and verified as it is read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise UserError(f"sentence store {self.path} does not exist", "create it with hitanno encode")
        try:
            self._group = zarr.open_group(self.path, mode="r", zarr_format=3)
            meta = dict(self._group.attrs)["hitanno"]
            if not isinstance(meta, dict):
                raise TypeError("attributes")
        except Exception:
            raise UserError(f"{self.path} is not a hitanno sentence store", "create it with hitanno encode") from None
        header = artifacts.check_header(meta.get("header"), artifacts.SENTENCES, self.path)
        self.hashed = artifacts.is_hashed(header) or "meta_hash" in meta
        if self.hashed and not artifacts.seal_holds(meta, "meta_hash"):
            raise self.corrupted("its attributes do not match their hash")
        self.meta = meta
        with self.reading("bits_sha256"):
            self._bits = self._group["bits"]
            self._digests = self._group["bits_sha256"][:]
            n_chunks = -(-self.n_cells // max(self.chunk_cells, 1))
            n_bytes = (self.n_positions + 7) // 8
            if self._bits.shape != (self.n_cells, n_bytes) or self._digests.shape != (n_chunks, 32):
                raise self.corrupted("its arrays do not have the shapes its attributes give")
        self._verify("bits_sha256", artifacts.sha256_array(self._digests))

    def corrupted(self, why: str) -> UserError:
        """The error for a store that fails a check."""
        return UserError(f"{self.path} is corrupted or was edited: {why}", "re-create the store with hitanno encode")

    @contextmanager
    def reading(self, what: str) -> Iterator[None]:
        """Turn any failure to read part of the store (a damaged chunk, a missing array) into
        a one-line error naming it."""
        try:
            yield
        except UserError:
            raise
        except Exception as err:
            raise self.corrupted(f"{what} cannot be read ({type(err).__name__})") from None

    def _verify(self, name: str, found: str) -> None:
        """Check an array read whole against the hash the attributes record for it."""
        if self.hashed and self.meta.get("array_hashes", {}).get(name) != found:
            raise self.corrupted(f"{name} does not match its hash")

    @property
    def n_cells(self) -> int:
        return int(self.meta["n_cells"])

    @property
    def cell_types(self) -> list[str]:
        return list(self.meta["cell_types"])

    @property
    def peaks_per_type(self) -> int:
        return int(self.meta["peaks_per_type"])

    @property
    def n_positions(self) -> int:
        """Panel positions per cell, ``n_types · P``."""
        return len(self.cell_types) * self.peaks_per_type

    @property
    def panel_hash(self) -> str:
        return str(self.meta["panel_hash"])

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])

    @property
    def chunk_cells(self) -> int:
        return int(self._bits.chunks[0])

    def check_panel(self, panel_hash: str) -> None:
        """Refuse a store that was written through another panel."""
        if panel_hash != self.panel_hash:
            raise UserError(
                f"{self.path} was encoded with another panel ({self.panel_hash[:19]}…, expected {panel_hash[:19]}…)",
                "re-encode the data with the model's panel",
            )

    def cell_ids(self) -> np.ndarray:
        """Cell ids as an object array of str (checked against their hash)."""
        with self.reading("cell_ids"):
            ids = self._group["cell_ids"][:].astype(object)
        if ids.shape != (self.n_cells,):
            raise self.corrupted("cell_ids has another length than the store")
        self._verify("cell_ids", artifacts.sha256_lines(ids))
        return ids

    def labels(self) -> np.ndarray | None:
        """Labels as an object array of str (``""`` where missing; checked against their
        hash); None if encoded without."""
        if self.meta.get("labels") is None:
            return None
        with self.reading("labels"):
            labels = self._group["labels"][:].astype(object)
        if labels.shape != (self.n_cells,):
            raise self.corrupted("labels has another length than the store")
        self._verify("labels", artifacts.sha256_lines(labels))
        return labels

    def panel_text(self) -> str | None:
        """The text of the panel file the store was encoded through (checked against its
        hash); None for a store written before stores kept their panel."""
        if not (self.meta.get("array_hashes") or {}).get("panel"):
            return None
        with self.reading("panel"):
            text = read_text(self._group["panel"])
        self._verify("panel", artifacts.sha256_text(text))
        return text

    def panel(self) -> Panel:
        """The panel the store was encoded through, so that training needs no ``--panel``."""
        text = self.panel_text()
        if text is None:
            raise UserError(
                f"{self.path} does not hold its panel (it was encoded by an older hitanno)",
                "pass --panel with the panel it was encoded through, or encode it again",
            )
        panel = Panel.parse(text, f"{self.path} (its panel)")
        if panel.content_hash != self.panel_hash:
            raise self.corrupted("its panel is not the one its attributes name")
        return panel

    def read_packed(self, lo: int, hi: int) -> np.ndarray:
        """Packed states of cells ``[lo, hi)``; whole chunks read are checked by hash."""
        chunk = self.chunk_cells
        c0, c1 = lo // chunk, -(-hi // chunk)
        with self.reading(f"bits (cells {lo}..{hi})"):
            block = self._bits[c0 * chunk : min(c1 * chunk, self.n_cells)]
        for c in range(c0, c1):
            part = block[(c - c0) * chunk : (c - c0 + 1) * chunk]
            if not np.array_equal(chunk_digest(part), self._digests[c]):
                raise UserError(
                    f"{self.path} is corrupted: chunk {c} does not match its hash",
                    "re-create the store with hitanno encode",
                )
        return block[lo - c0 * chunk : hi - c0 * chunk]

    def read_dense(self, lo: int, hi: int) -> np.ndarray:
        """States of cells ``[lo, hi)`` as bool ``[cells, n_types, P]``."""
        n_types, p = len(self.cell_types), self.peaks_per_type
        bits = np.unpackbits(self.read_packed(lo, hi), axis=1, count=n_types * p, bitorder="little")
        return bits.reshape(hi - lo, n_types, p).astype(bool)

    def read_open(self, lo: int, hi: int) -> OpenRows:
        """Open panel positions of cells ``[lo, hi)``, one CSR row per cell."""
        return unpack_open(self.read_packed(lo, hi), self.n_positions)

    def iter_chunks(self) -> Iterator[tuple[int, int]]:
        """``(lo, hi)`` cell ranges aligned with the store's chunks."""
        for lo in range(0, self.n_cells, self.chunk_cells):
            yield lo, min(lo + self.chunk_cells, self.n_cells)
