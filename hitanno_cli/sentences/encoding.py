"""``encode``: every cell of an ``.h5ad`` through the panel into a sentence store.

The ``.h5ad`` is read in row chunks, so memory is bounded by one chunk. With
``shard="I/N"``, N processes (a SLURM array, say) fill disjoint, chunk-aligned ranges of
one staging store ``.NAME.partial`` beside the output; the last to finish assembles it,
so the result is byte-identical to a single-process encode.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError

from hitanno_cli import artifacts, console, outputs
from hitanno_cli.errors import UserError
from hitanno_cli.h5ad import H5ad, check_counts
from hitanno_cli.host import keep_freed_memory, usable_cores
from hitanno_cli.panel import Panel
from hitanno_cli.sentences.matching import PeakMatch, match_panel
from hitanno_cli.sentences.packing import pack_states
from hitanno_cli.sentences.store import StoreIdentity, bits_specs, chunk_digest, write_cells_and_attrs

#: Packed states buffered before one write on a single core (fewer zarr round trips).
WRITE_BYTES = 1 << 24


def write_bytes() -> int:
    """Packed bytes buffered per write to the store (0: hand every chunk over at once).

    Writes run in a background thread (zstd releases the GIL): with a second core each
    chunk's compression overlaps the next chunk's reading and packing; on one core
    nothing overlaps and larger writes cost fewer round trips.
    """
    return 0 if usable_cores() > 1 else WRITE_BYTES


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` → ``(I, N)`` with ``0 <= I < N`` (SLURM: ``$SLURM_ARRAY_TASK_ID/N``)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard '{text}' is not of the form I/N", "e.g. --shard 0/8") from None
    if n < 1:
        raise UserError(f"--shard {text}: N must be at least 1", "e.g. --shard 0/8")
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: I must be in 0..N-1", f"use 0/{n} to {n - 1}/{n}")
    return i, n


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
    *,
    panel: str | Path,
    output: str | Path | None = None,
    label_key: str | None = None,
    min_coverage: float = 0.5,
    shard: str | None = None,
    layer: str | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Write the cell sentences of ``data`` through the panel file ``panel`` to ``output``
    (default: beside the data, ``ref.h5ad`` → ``ref.zarr``). Without ``label_key`` the
    labels of the panel's own label column are kept when the data has that column.

    Returns the store once it is complete; with a shard, None unless this process was
    the one that assembled it.
    """
    data = Path(data)
    out = outputs.default_output(data, ".zarr") if output is None else Path(output)
    n_shards = parse_shard(shard)[1]
    with outputs.writing(out, kind=artifacts.SENTENCES, overwrite=overwrite, inputs=[data, panel], shared=n_shards > 1):
        return _encode(
            data,
            out,
            panel=panel,
            label_key=label_key,
            min_coverage=min_coverage,
            shard=shard,
            layer=layer,
            overwrite=overwrite,
        )


def _encode(
    data: Path,
    out: Path,
    *,
    panel: str | Path,
    label_key: str | None,
    min_coverage: float,
    shard: str | None,
    layer: str | None,
    overwrite: bool,
) -> Path | None:
    if not 0.0 <= min_coverage <= 1.0:  # also refuses nan
        raise UserError(f"--min-coverage {min_coverage} is not a share of the panel", "use a value in [0, 1]")
    keep_freed_memory()  # the chunk temporaries are reused, not page-faulted in afresh
    loaded = Panel.load(panel)
    with H5ad(data, layer=layer) as h5:
        h5.check_not_empty()
        h5.unique_obs_names()  # ids identify cells in every later stage
        names = h5.unique_var_names()
        if label_key is None:  # the labels of the panel's own label column, when the data has it
            panel_key = loaded.header.get("params", {}).get("label_key")
            if panel_key is not None and panel_key in h5.obs_columns():
                label_key = panel_key
                console.info(f"encode: keeping the labels of obs column '{label_key}' (the panel's)")
        if label_key is not None:
            h5.labels(label_key)  # refuse a missing key before any work
        match = match_panel(loaded, names, lambda: h5.var)
        console.info(f"encode: {match.describe(data.name)}")
        if match.coverage < min_coverage:
            raise UserError(
                f"only {match.found} of {match.n_panel} panel peaks ({match.coverage:.1%}) are "
                f"in {data}, below --min-coverage {min_coverage}",
                "check that data and reference use the same genome build and peak coordinates",
            )
        params = {"label_key": label_key, "min_coverage": min_coverage, "layer": layer}
        job = EncodeJob(data, out, loaded, match, label_key, parse_shard(shard), overwrite, params)
        return _run_job(job, h5)


def _run_job(job: EncodeJob, h5: H5ad) -> Path | None:
    _, n = job.shard
    if n == 1 and job.staging.exists():
        shutil.rmtree(job.staging)
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
    """What every shard of one encode must agree on."""
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
    for name, spec in bits_specs(h5.n_obs, (job.panel.size + 7) // 8).items():
        try:
            group.create_array(name, **spec)
        except ContainsArrayError:
            pass
    return group


def _write_shard(job: EncodeJob, h5: H5ad, group: zarr.Group) -> None:
    """Encode this shard's chunk-aligned range of cells."""
    # write_empty_chunks: skips zarr's all-fill check of every chunk (a chunk of cells is
    # never all closed in practice, and writing one is harmless)
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
    match = job.match
    identity = StoreIdentity(
        header=artifacts.make_header(
            artifacts.SENTENCES, job.params, {"data": data_hash, "panel": job.panel.content_hash}
        ),
        cell_types=job.panel.cell_types,
        peaks_per_type=job.panel.peaks_per_type,
        panel_hash=job.panel.content_hash,
        coverage={"found": match.found, "of": match.n_panel, "by_name": match.by_name, "by_overlap": match.by_overlap},
        label_key=job.label_key,
        panel_text=job.panel.text(),
    )
    write_cells_and_attrs(group, identity, digests, h5.unique_obs_names(), labels)
    for name in ("plan.json", "shards", "digests", "finalizing", "failed"):
        path = staging / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if job.out.exists() and not job.overwrite:
        raise UserError(f"output {job.out} already exists", "pass --overwrite to replace it")
    artifacts.replace_path(staging, job.out)
    console.info(f"encode: wrote {h5.n_obs} cells to {job.out}")
