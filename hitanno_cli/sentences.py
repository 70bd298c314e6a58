"""Cell sentences (SPEC §1.3): every cell's open/closed state at each panel peak.

A cell's sentence is a ``[n_types, P]`` matrix of 0/1 states. The store keeps it
bit-packed (8 states per byte, little bit order, set ``t`` peak ``j`` at bit
``t * P + j``) in a zarr v3 array chunked by cells and zstd-compressed, next to cell
ids, labels, and a SHA-256 of every chunk that readers verify as they stream.

``encode`` reads the ``.h5ad`` in row chunks, so memory is bounded by one chunk. With
``--shard I/N``, N processes fill disjoint, chunk-aligned ranges of one staging store;
the last to finish assembles it, so the result equals a single-process encode.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from zarr.codecs import ZstdCodec
from zarr.errors import ContainsArrayError, ContainsGroupError

from hitanno_cli import artifacts, console
from hitanno_cli.allocator import keep_freed_memory
from hitanno_cli.errors import UserError
from hitanno_cli.genome import overlap_pairs, peak_intervals
from hitanno_cli.h5ad import H5ad, check_counts, usable_cores
from hitanno_cli.panel import Panel

#: Target raw bytes per zarr chunk of packed states.
CHUNK_BYTES = 1 << 22
#: Packed states buffered before one write on a single core (fewer zarr round trips).
WRITE_BYTES = 1 << 24


def write_bytes() -> int:
    """Packed bytes buffered per write to the store (0: write every chunk at once).

    Writes run in a background thread (zstd releases the GIL). With a second core each
    chunk is handed over as soon as it is packed, so its compression overlaps the next
    chunk's reading and packing (Granja encode ~10 % faster, 10 of 12 paired runs); on
    one core nothing overlaps and larger writes cost fewer round trips.
    """
    return 0 if usable_cores() > 1 else WRITE_BYTES


# -- matching the data's peaks to the panel ---------------------------------------------
@dataclass
class PeakMatch:
    """Which panel positions each data column lights up (a CSR map: column → positions)."""

    indptr: np.ndarray  # [n_columns + 1]
    targets: np.ndarray  # panel positions, grouped by column
    n_panel: int
    by_name: int
    by_overlap: int

    @functools.cached_property
    def lookup(self) -> np.ndarray | None:
        """Column → its one panel position (-1 for none); None if a column has several."""
        fan = np.diff(self.indptr)
        if fan.size and fan.max() > 1:
            return None
        out = np.full(fan.size, -1, dtype=np.int64)
        out[fan == 1] = self.targets
        return out

    @functools.cached_property
    def maps_every_column(self) -> bool:
        """Whether every data column lights exactly one panel peak (no column to slice away)."""
        return bool(np.all(np.diff(self.indptr) == 1))

    @functools.cached_property
    def matrix(self) -> sp.csr_matrix:
        """The map as a sparse ``[n_columns, n_panel]`` 0/1 matrix."""
        ones = np.ones(self.targets.size, dtype=np.float32)
        return sp.csr_matrix((ones, self.targets, self.indptr), shape=(self.indptr.size - 1, self.n_panel))

    @property
    def found(self) -> int:
        """Panel peaks matched by at least one data column."""
        return int(np.unique(self.targets).size)

    @property
    def coverage(self) -> float:
        return self.found / self.n_panel if self.n_panel else 0.0

    @classmethod
    def from_pairs(cls, columns: np.ndarray, targets: np.ndarray, n_columns: int, n_panel: int,
                   by_name: int, by_overlap: int) -> PeakMatch:
        order = np.lexsort((targets, columns))
        columns, targets = columns[order], targets[order]
        indptr = np.zeros(n_columns + 1, dtype=np.int64)
        np.cumsum(np.bincount(columns, minlength=n_columns), out=indptr[1:])
        return cls(indptr, targets.astype(np.int64), n_panel, by_name, by_overlap)


def match_panel(panel: Panel, names: np.ndarray, var: Callable[[], Any]) -> PeakMatch:
    """Match panel peaks to data columns: by name first, then by genomic overlap.

    ``var`` returns the data's feature table; it is read only when some panel peak is
    not found by name (reading it costs more than the name match).
    """
    by_name = pd.Index(names).get_indexer(pd.Index(panel.flat_names())).astype(np.int64)  # names are unique
    named = by_name >= 0
    columns, targets = [by_name[named]], [np.flatnonzero(named)]
    n_overlap = 0
    if not named.all():
        panel_iv = panel.flat_intervals()
        unmatched = np.flatnonzero(~named)
        data_iv = peak_intervals(names, var())
        sub = type(panel_iv)(panel_iv.chrom[unmatched], panel_iv.start[unmatched], panel_iv.end[unmatched])
        q, t = overlap_pairs(data_iv, sub)
        columns.append(q)
        targets.append(unmatched[t])
        n_overlap = int(np.unique(t).size)
    return PeakMatch.from_pairs(
        np.concatenate(columns), np.concatenate(targets), len(names), panel.size,
        int(named.sum()), n_overlap,
    )


def pack_states(counts: sp.csr_matrix, match: PeakMatch, n_bytes: int) -> np.ndarray:
    """Bit-packed sentences ``[rows, n_bytes]`` of a chunk of raw counts.

    When every column lights at most one panel peak (the usual case) each entry's
    column is looked up block by block while packing (after slicing away, in scipy's C
    code, the columns no panel peak uses); otherwise the counts are multiplied by the
    column → panel map. Explicitly stored zeros count as closed.
    """
    counts = counts.tocsr()
    if counts.nnz and counts.data.min() <= 0:  # explicitly stored zeros: drop them (in a copy)
        counts = sp.csr_matrix((counts.data > 0, counts.indices, counts.indptr), shape=counts.shape, copy=True)
        counts.eliminate_zeros()
    if match.lookup is not None and match.maps_every_column:  # e.g. a panel of every peak
        return _pack_rows(counts.indptr, counts.indices, n_bytes, match.lookup)
    if match.lookup is not None:
        columns = np.flatnonzero(match.lookup >= 0)
        sub = counts[:, columns]
        return _pack_rows(sub.indptr, sub.indices, n_bytes, match.lookup[columns])
    sub = counts @ match.matrix
    return _pack_rows(sub.indptr, sub.indices, n_bytes)


#: Size of the 0/1 scratch row block: small enough to stay in cache and be reused
#: (a fresh chunk-sized buffer cost more in page faults than the packing itself).
_SCRATCH_BITS = 1 << 21


def _pack_rows(indptr: np.ndarray, columns: np.ndarray, n_bytes: int, lookup: np.ndarray | None = None) -> np.ndarray:
    """Set bit ``lookup[columns[k]]`` (or ``columns[k]``) of row ``r`` for each entry ``k`` of row ``r``.

    Rows are packed a scratch block at a time, and the lookup is done per block too, so
    that every temporary stays in cache and is reused instead of page-faulted in afresh.
    """
    n_rows, n_bits = indptr.size - 1, n_bytes * 8
    out = np.empty((n_rows, n_bytes), dtype=np.uint8)
    block = max(1, _SCRATCH_BITS // max(n_bits, 1))
    scratch = np.zeros(block * n_bits, dtype=bool)
    for lo in range(0, n_rows, block):
        hi = min(lo + block, n_rows)
        a, b = int(indptr[lo]), int(indptr[hi])
        targets = columns[a:b] if lookup is None else lookup[columns[a:b]]
        flat = np.repeat(np.arange(hi - lo, dtype=np.int64) * n_bits, np.diff(indptr[lo : hi + 1])) + targets
        scratch[flat] = True
        out[lo:hi] = np.packbits(scratch[: (hi - lo) * n_bits].reshape(hi - lo, n_bits), axis=1, bitorder="little")
        scratch[flat] = False  # cheaper than clearing the whole block
    return out


def chunk_digest(rows: np.ndarray) -> np.ndarray:
    """SHA-256 ``[32]`` (uint8) of a chunk of packed rows, hashed in place (no copy)."""
    return np.frombuffer(hashlib.sha256(np.ascontiguousarray(rows)).digest(), np.uint8)


def chunk_cells_for(n_bytes: int) -> int:
    """Cells per zarr chunk: about :data:`CHUNK_BYTES`, a multiple of 256."""
    cells = CHUNK_BYTES // max(n_bytes, 1)
    return int(min(max(cells // 256 * 256, 256), 16384))


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` → ``(I, N)`` with ``0 <= I < N`` (SLURM: ``$SLURM_ARRAY_TASK_ID/N``)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard '{text}' is not of the form I/N", "e.g. --shard 0/8") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: I must be in 0..N-1", f"use 0/{n} to {n - 1}/{n}")
    return i, n


# -- writing ----------------------------------------------------------------------------
@dataclass
class EncodeJob:
    """Everything one encode process needs, checked before anything is written."""

    data: Path
    out: Path
    panel: Panel
    match: PeakMatch
    label_key: str | None
    shard: tuple[int, int]
    overwrite: bool
    params: dict[str, Any]

    @property
    def staging(self) -> Path:
        return self.out.parent / f".{self.out.name}.partial"


def encode(
    data: str | Path,
    panel_path: str | Path,
    out: str | Path,
    label_key: str | None = None,
    min_coverage: float = 0.5,
    shard: str | None = None,
    overwrite: bool = False,
    layer: str | None = None,
) -> Path | None:
    """Write the cell sentences of ``data`` through the panel; return the store if final.

    With a shard, returns ``None`` unless this process was the one that assembled it.
    """
    data, out = Path(data), Path(out)
    artifacts.refuse_existing(out, overwrite)
    keep_freed_memory()  # the chunk temporaries are reused, not page-faulted in afresh
    panel = Panel.load(panel_path)
    with H5ad(data, layer=layer) as h5:
        names = h5.unique_var_names()
        if label_key is not None:
            h5.labels(label_key)  # refuse a missing key before any work
        match = match_panel(panel, names, lambda: h5.var)
        console.info(
            f"encode: {match.found}/{match.n_panel} panel peaks found in {data.name} "
            f"({match.by_name} by name, {match.by_overlap} by overlap; coverage {match.coverage:.3f})"
        )
        if match.coverage < min_coverage:
            raise UserError(
                f"only {match.found} of {match.n_panel} panel peaks ({match.coverage:.1%}) are "
                f"in {data}, below --min-coverage {min_coverage}",
                "check that data and reference use the same genome build and peak coordinates",
            )
        params = {"label_key": label_key, "min_coverage": min_coverage, "layer": layer}
        job = EncodeJob(data, out, panel, match, label_key, parse_shard(shard), overwrite, params)
        return _run_job(job, h5)


def _run_job(job: EncodeJob, h5: H5ad) -> Path | None:
    i, n = job.shard
    staging = job.staging
    if n == 1 and staging.exists():
        shutil.rmtree(staging)
    group = _open_staging(job, h5)
    if n > 1:  # shards leave the input's hash to the one that assembles the store
        return _encode_and_assemble(job, h5, group, None)
    with artifacts.sha256_file_in_background(job.data) as data_hash:  # hashed while it is encoded
        return _encode_and_assemble(job, h5, group, data_hash)


def _encode_and_assemble(job: EncodeJob, h5: H5ad, group: zarr.Group, data_hash: Future[str] | None) -> Path | None:
    """Encode this shard's cells; the last shard to finish assembles the store (and returns it)."""
    i, n = job.shard
    staging = job.staging
    try:
        _write_shard(job, h5, group)
        (staging / "shards").mkdir(exist_ok=True)
        artifacts.atomic_write_text(staging / "shards" / f"{i}.done", "", overwrite=True)
        if len(list((staging / "shards").glob("*.done"))) < n:
            console.info(f"encode: shard {i}/{n} done; the last shard assembles {job.out}")
            return None
        try:
            os.mkdir(staging / "finalizing")
        except FileExistsError:
            return None
        _finalize(job, h5, group, data_hash.result() if data_hash else artifacts.sha256_file(job.data))
        return job.out
    except BaseException as err:
        if n == 1:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            (staging / "failed").write_text(f"shard {i}/{n}: {err}\n")
        raise


def _plan(job: EncodeJob) -> dict[str, Any]:
    stat = job.data.stat()
    return {
        "data": str(job.data.resolve()),
        "data_size": stat.st_size,
        "data_mtime_ns": stat.st_mtime_ns,
        "panel": job.panel.content_hash,
        "params": job.params,
        "n_shards": job.shard[1],
    }


def _open_staging(job: EncodeJob, h5: H5ad) -> zarr.Group:
    """Create (or join, for another shard) the staging store with its arrays."""
    staging = job.staging
    staging.mkdir(parents=True, exist_ok=True)
    plan = _plan(job)
    plan_file = staging / "plan.json"
    draft = staging / f"plan.{os.getpid()}.json"
    draft.write_text(json.dumps(plan))
    try:
        os.link(draft, plan_file)  # atomic: the first shard's plan, complete, or nothing
    except FileExistsError:
        if json.loads(plan_file.read_text()) != plan:
            raise UserError(
                f"{staging} holds a partial encode with other inputs or shard count",
                f"remove {staging} and rerun every shard",
            ) from None
    finally:
        draft.unlink(missing_ok=True)
    if (staging / "failed").exists():
        raise UserError(
            f"another shard of this encode failed ({(staging / 'failed').read_text().strip()})",
            f"fix the input, remove {staging} and rerun every shard",
        )
    try:
        group = zarr.open_group(staging, mode="a", zarr_format=3)
    except ContainsGroupError:  # another shard created it between our check and our write
        group = zarr.open_group(staging, mode="r+", zarr_format=3)
    for name, spec in _bits_specs(h5.n_obs, (job.panel.size + 7) // 8).items():
        try:
            group.create_array(name, **spec)
        except ContainsArrayError:
            pass
    return group


def _bits_specs(n_cells: int, n_bytes: int) -> dict[str, dict[str, Any]]:
    """The packed-state arrays of a store: ``bits`` chunked by cells, and one digest per chunk."""
    chunk = chunk_cells_for(n_bytes)
    n_chunks = -(-n_cells // chunk)
    return {
        "bits": dict(shape=(n_cells, n_bytes), chunks=(chunk, n_bytes), dtype="uint8",
                     compressors=ZstdCodec(level=1), fill_value=0),
        "bits_sha256": dict(shape=(n_chunks, 32), chunks=(max(n_chunks, 1), 32), dtype="uint8",
                            compressors=None, fill_value=0),
    }


def _write_shard(job: EncodeJob, h5: H5ad, group: zarr.Group) -> None:
    """Encode this shard's chunk-aligned range of cells."""
    # write_empty_chunks: zarr's all-fill check of every chunk cost a quarter of encode;
    # a chunk of cells is never all closed in practice, and writing one is harmless.
    bits = group["bits"].with_config({"write_empty_chunks": True})
    chunk = bits.chunks[0]
    n_chunks = -(-h5.n_obs // chunk)
    i, n = job.shard
    first, last = i * n_chunks // n, (i + 1) * n_chunks // n
    lo, hi = first * chunk, min(last * chunk, h5.n_obs)
    digests = np.zeros((last - first, 32), dtype=np.uint8)
    pending: list[np.ndarray] = []  # whole chunks, written together: fewer zarr round trips
    start, flush_bytes = lo, write_bytes()
    with console.progress(f"encode {job.data.name}", hi - lo) as bar, BackgroundWriter(bits) as writer:
        for k, (row, counts) in enumerate(h5.iter_chunks(lo, hi, chunk_rows=chunk)):
            check_counts(counts.data, job.data, row)
            packed = pack_states(counts, job.match, bits.shape[1])
            digests[k] = chunk_digest(packed)
            pending.append(packed)
            if sum(p.nbytes for p in pending) >= flush_bytes or row + packed.shape[0] == hi:
                block = pending[0] if len(pending) == 1 else np.concatenate(pending)
                writer.write(start, block)
                start += block.shape[0]
                pending.clear()
            bar.advance(packed.shape[0])
    (job.staging / "digests").mkdir(exist_ok=True)
    np.save(job.staging / "digests" / f"{i}.npy", digests)


class BackgroundWriter:
    """Writes row blocks to a zarr array in one background thread, one block in flight.

    Compression overlaps the reading and packing of the next block; memory stays
    bounded by two blocks; an error in the writer surfaces at the next write or on exit.
    """

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hitanno-writer")
        self._inflight: Future[None] | None = None

    def _put(self, start: int, block: np.ndarray) -> None:
        self.array[start : start + block.shape[0]] = block

    def write(self, start: int, block: np.ndarray) -> None:
        """Queue ``block`` for rows ``[start, start + len(block))`` after the previous one lands."""
        self.wait()
        self._inflight = self._pool.submit(self._put, start, block)

    def wait(self) -> None:
        """Block until the block in flight (if any) is written; re-raise its error."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            inflight.result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _finalize(job: EncodeJob, h5: H5ad, group: zarr.Group, data_hash: str) -> None:
    """Assemble the staging store: digests, ids, labels, header; rename into place."""
    staging = job.staging
    n_shards = job.shard[1]
    digests = np.concatenate([np.load(staging / "digests" / f"{i}.npy") for i in range(n_shards)])
    labels = None
    if job.label_key is not None:
        labels = np.array(["" if v is None else v for v in h5.labels(job.label_key)], dtype=str)
    header = artifacts.make_header(artifacts.SENTENCES, job.params, {"data": data_hash, "panel": job.panel.content_hash})
    coverage = {"found": job.match.found, "of": job.match.n_panel,
                "by_name": job.match.by_name, "by_overlap": job.match.by_overlap}
    _write_cells_and_attrs(group, header, digests, h5.obs_names(), labels, job.label_key,
                           job.panel.cell_types, job.panel.peaks_per_type, job.panel.content_hash, coverage)
    for name in ("plan.json", "shards", "digests", "finalizing", "failed"):
        path = staging / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if job.out.exists() and not job.overwrite:
        raise UserError(f"output {job.out} already exists", "pass --overwrite to replace it")
    artifacts.replace_path(staging, job.out)
    console.info(f"encode: wrote {h5.n_obs} cells to {job.out}")


def _write_cells_and_attrs(group: zarr.Group, header: dict[str, Any], digests: np.ndarray, ids: np.ndarray,
                           labels: np.ndarray | None, label_key: str | None, cell_types: list[str],
                           peaks_per_type: int, panel_hash: str, coverage: dict[str, Any]) -> None:
    """Write a store's chunk digests, cell ids and labels, and its attributes (content hash included)."""
    group["bits_sha256"][:] = digests
    artifacts.write_strings(group, "cell_ids", ids)
    content = hashlib.sha256(digests.tobytes())
    content.update(artifacts.sha256_lines(ids).encode())
    label_info = None
    if labels is not None:
        artifacts.write_strings(group, "labels", labels)
        content.update(artifacts.sha256_lines(labels).encode())
        label_info = {"key": label_key, "missing": int((labels == "").sum())}
    group.attrs["hitanno"] = {
        "header": header,
        "content_hash": "sha256:" + content.hexdigest(),
        "n_cells": int(ids.shape[0]),
        "cell_types": list(cell_types),
        "peaks_per_type": int(peaks_per_type),
        "panel_hash": panel_hash,
        "coverage": coverage,
        "labels": label_info,
    }


def write_store(out: str | Path, blocks: Iterator[np.ndarray], ids: np.ndarray, labels: np.ndarray,
                like: SentenceStore, params: dict[str, Any], inputs: dict[str, str],
                overwrite: bool = False) -> Path:
    """Write a labelled store of packed rows through ``like``'s panel, atomically.

    ``blocks`` yields packed rows ``[rows, n_bytes]`` in order (any sizes; regrouped into
    the store's chunks), ``ids`` and ``labels`` one entry per row. Used for stores made from
    other stores (self-training), never from an ``.h5ad``.
    """
    out = Path(out)
    artifacts.refuse_existing(out, overwrite)
    n_cells = int(ids.shape[0])
    specs = _bits_specs(n_cells, (len(like.cell_types) * like.peaks_per_type + 7) // 8)
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
        header = artifacts.make_header(artifacts.SENTENCES, params, inputs)
        label_key = (like.meta.get("labels") or {}).get("key")
        _write_cells_and_attrs(group, header, digests, ids, labels, label_key, like.cell_types,
                               like.peaks_per_type, like.panel_hash, dict(like.meta.get("coverage", {})))
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


# -- reading ----------------------------------------------------------------------------
class SentenceStore:
    """A finished sentence store, opened read-only and verified as it is read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise UserError(f"sentence store {self.path} does not exist", "create it with hitanno encode")
        try:
            self._group = zarr.open_group(self.path, mode="r", zarr_format=3)
            meta = dict(self._group.attrs)["hitanno"]
        except Exception:
            raise UserError(f"{self.path} is not a hitanno sentence store", "create it with hitanno encode") from None
        artifacts.check_header(meta.get("header"), artifacts.SENTENCES, self.path)
        self.meta = meta
        self._bits = self._group["bits"]
        self._digests = self._group["bits_sha256"][:]

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
                f"{self.path} was encoded with another panel ({self.panel_hash[:19]}…, "
                f"expected {panel_hash[:19]}…)",
                "re-encode the data with the model's panel",
            )

    def cell_ids(self) -> np.ndarray:
        """Cell ids as an object array of str."""
        return self._group["cell_ids"][:].astype(object)

    def labels(self) -> np.ndarray | None:
        """Labels as an object array of str (``""`` where missing); None if encoded without."""
        if "labels" not in self._group:
            return None
        return self._group["labels"][:].astype(object)

    def read_packed(self, lo: int, hi: int) -> np.ndarray:
        """Packed states of cells ``[lo, hi)``; whole chunks read are checked by hash."""
        chunk = self.chunk_cells
        c0, c1 = lo // chunk, -(-hi // chunk)
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

    def read_open(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Open panel positions of cells ``[lo, hi)`` as CSR ``(indptr, positions)``."""
        dense = self.read_dense(lo, hi).reshape(hi - lo, -1)
        rows, positions = np.nonzero(dense)
        indptr = np.zeros(hi - lo + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=hi - lo), out=indptr[1:])
        return indptr, positions.astype(np.int64)

    def iter_chunks(self) -> Iterator[tuple[int, int]]:
        """``(lo, hi)`` cell ranges aligned with the store's chunks."""
        for lo in range(0, self.n_cells, self.chunk_cells):
            yield lo, min(lo + self.chunk_cells, self.n_cells)
