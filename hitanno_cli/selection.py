"""``select-peaks``: each cell type's marker peaks, as HitAnno publishes it.

TF-IDF of the reference (:mod:`hitanno_cli.tfidf`), a one-vs-rest Welch t-test per
type, and ``P`` peaks per type assigned rarest type first, no peak in two sets.

The reference is streamed twice in row chunks: pass 1 sums counts per cell and per
peak (TF-IDF needs both totals), pass 2 accumulates per-type sums and sums of squares
of the TF-IDF values. Memory is ``O(n_types × n_peaks)``, whatever the number of cells.

The ``.h5ad`` reader (and with it anndata) is imported where a file is read, so that the
command line can show this module's defaults without loading it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hitanno_cli import artifacts, console
from hitanno_cli.errors import UserError
from hitanno_cli.genome import peak_intervals
from hitanno_cli.host import keep_freed_memory
from hitanno_cli.panel import Panel, PeakSet
from hitanno_cli.tfidf import tfidf_entries

if TYPE_CHECKING:  # scipy loads with the data: `hitanno --help` stays quick
    import scipy.sparse as sp

    from hitanno_cli.h5ad import H5ad

#: The published code keeps this many best-ranked peaks per type as candidates.
N_CANDIDATES = 6300
#: A reference whose matrix takes less than this is read once and kept for pass 2.
CACHE_BYTES = 1 << 28


def published_peaks_per_type(n_types: int) -> int:
    """``P = int(sqrt(9 / n_types) * 2000)``, the published size (chosen for a 24 GB GPU)."""
    return int(math.sqrt(9 / n_types) * 2000)


#: Peaks per block of :func:`welch_t`: its temporaries stay a few MB whatever the panel.
T_TEST_BLOCK = 8192


def welch_t(sums: np.ndarray, sumsq: np.ndarray, n_per_type: np.ndarray) -> np.ndarray:
    """One-vs-rest Welch t statistics, ``[n_types, n_peaks]``, from per-type moments.

    The statistic ``scanpy.tl.rank_genes_groups(method="t-test")`` computes: sample
    variances (ddof 1), ``(m_g - m_r) / sqrt(v_g / n_g + v_r / n_r)``, NaN set to 0.
    Computed a block of peaks at a time, so memory beyond the result stays small.
    """
    scores = np.empty(sums.shape, dtype=np.float64)
    for lo in range(0, sums.shape[1], T_TEST_BLOCK):
        block = slice(lo, lo + T_TEST_BLOCK)
        scores[:, block] = _welch_t_block(sums[:, block], sumsq[:, block], n_per_type)
    return scores


def _welch_t_block(sums: np.ndarray, sumsq: np.ndarray, n_per_type: np.ndarray) -> np.ndarray:
    n_g = n_per_type.astype(np.float64)[:, None]
    n_total = n_g.sum()
    n_r = n_total - n_g
    sums_r = sums.sum(axis=0, keepdims=True) - sums
    sumsq_r = sumsq.sum(axis=0, keepdims=True) - sumsq
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_g, mean_r = sums / n_g, sums_r / n_r
        var_g = np.maximum(sumsq - n_g * mean_g**2, 0.0) / (n_g - 1)
        var_r = np.maximum(sumsq_r - n_r * mean_r**2, 0.0) / (n_r - 1)
        scores = (mean_g - mean_r) / np.sqrt(var_g / n_g + var_r / n_r)
    scores[~np.isfinite(scores)] = 0.0
    return scores


def rare_first_sets(
    scores: np.ndarray,
    n_per_type: np.ndarray,
    peaks_per_type: int,
    n_candidates: int = N_CANDIDATES,
    names: Sequence[str] | None = None,
) -> tuple[list[int], list[np.ndarray]]:
    """Assign each type ``peaks_per_type`` distinct peaks, rarest type first.

    Returns the visiting order of types and, in that order, each type's peak indices
    (best first). A type takes its best-ranked candidates (top ``n_candidates`` by
    score) that no earlier type took; if those run out it continues down its ranking.
    """
    n_types, n_peaks = scores.shape
    if peaks_per_type * n_types > n_peaks:
        raise UserError(
            f"{n_types} types × {peaks_per_type} peaks per type needs {peaks_per_type * n_types} "
            f"distinct peaks but the reference has {n_peaks}",
            f"pass --peaks-per-type {n_peaks // n_types} or less",
        )
    order = sorted(range(n_types), key=lambda t: (int(n_per_type[t]), t))
    taken = np.zeros(n_peaks, dtype=bool)
    sets = []
    for t in order:
        ranking = np.argsort(-scores[t], kind="stable")  # best first, ties by index
        free = ranking[~taken[ranking]]
        chosen = free[:peaks_per_type]
        if n_candidates and np.count_nonzero(~taken[ranking[:n_candidates]]) < peaks_per_type:
            console.info(
                f"type {names[t] if names else t} ran out of its {n_candidates} candidate "
                "peaks; filled from lower-ranked peaks"
            )
        taken[chosen] = True
        sets.append(chosen)
    return order, sets


@dataclass
class ReferenceMoments:
    """What pass 1 and pass 2 learn from the reference."""

    n_per_type: np.ndarray
    sums: np.ndarray
    sumsq: np.ndarray


def type_codes(labels: np.ndarray, types: Sequence[str]) -> np.ndarray:
    """Integer code of each cell's type in ``types``; -1 for cells left out."""
    index = {name: i for i, name in enumerate(types)}
    return np.array([index.get(lab, -1) if lab is not None else -1 for lab in labels], np.int64)


def reference_moments(h5: H5ad, codes: np.ndarray, n_types: int, chunk_rows: int | None = None) -> ReferenceMoments:
    """Stream the reference twice and return per-type TF-IDF sums and sums of squares.

    A small reference (under :data:`CACHE_BYTES`) is read once and kept for pass 2.
    """
    from hitanno_cli.h5ad import check_counts

    n_peaks = h5.n_vars
    keep = codes >= 0
    n_cells = int(keep.sum())
    cell_total = np.zeros(h5.n_obs, dtype=np.float64)
    peak_total = np.zeros(n_peaks, dtype=np.float64)
    cached: list[tuple[int, sp.csr_matrix]] | None = []  # pass 1's chunks, while they fit
    cached_bytes = 0
    with console.progress("select-peaks: totals", h5.n_obs) as bar:
        for lo, chunk in h5.iter_chunks(chunk_rows=chunk_rows):
            check_counts(chunk.data, h5.path, lo)
            rows = keep[lo : lo + chunk.shape[0]]
            cell_total[lo : lo + chunk.shape[0]] = np.asarray(chunk.sum(axis=1)).ravel()
            peak_total += np.asarray(_rows(chunk, rows).sum(axis=0)).ravel()
            if cached is not None:
                cached_bytes += chunk.data.nbytes + chunk.indices.nbytes + chunk.indptr.nbytes
                if cached_bytes <= CACHE_BYTES:
                    cached.append((lo, chunk))
                else:
                    cached = None
            bar.advance(chunk.shape[0])
    if not peak_total.any():  # every TF-IDF value, hence every score, would be 0
        if not cell_total.any():
            raise UserError(
                f"{h5.path} has no counts in any cell",
                "pass the raw count matrix (use --layer if the counts are in a layer)",
            )
        raise UserError(
            f"{h5.path} has no counts in any labelled cell that is kept",
            "check --label-key and --exclude-types, and pass the raw count matrix",
        )
    sums = np.zeros(n_types * n_peaks, dtype=np.float64)
    sumsq = np.zeros(n_types * n_peaks, dtype=np.float64)
    with console.progress("select-peaks: t-test", h5.n_obs) as bar:
        for lo, chunk in cached or h5.iter_chunks(chunk_rows=chunk_rows):
            hi = lo + chunk.shape[0]
            _add_moments(
                chunk, codes[lo:hi], cell_total[lo:hi], peak_total=peak_total, n_cells=n_cells, sums=sums, sumsq=sumsq
            )
            bar.advance(chunk.shape[0])
    n_per_type = np.bincount(codes[keep], minlength=n_types)
    return ReferenceMoments(n_per_type, sums.reshape(n_types, n_peaks), sumsq.reshape(n_types, n_peaks))


#: Stored entries per block of pass 2: small enough that its temporaries stay in cache.
BLOCK_NNZ = 1 << 16


def _add_moments(
    chunk: sp.csr_matrix,
    codes: np.ndarray,
    cell_total: np.ndarray,
    *,
    peak_total: np.ndarray,
    n_cells: int,
    sums: np.ndarray,
    sumsq: np.ndarray,
) -> None:
    """Add a chunk's TF-IDF values and their squares into flat ``[type, peak]`` sums.

    A block of rows at a time, each entry added in order with ``np.add.at``: the same
    sums, bit for bit, as one ``bincount`` over the chunk, with temporaries that stay in
    cache. Rows with code -1 (left out) add nothing.
    """
    n_rows, n_peaks = chunk.shape
    indptr = chunk.indptr
    step = max(1, BLOCK_NNZ * n_rows // max(chunk.nnz, 1))
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        a, b = int(indptr[lo]), int(indptr[hi])
        per_row = np.diff(indptr[lo : hi + 1])
        flat = np.repeat(codes[lo:hi] * n_peaks, per_row)
        counts, peaks, entry_total = chunk.data[a:b], chunk.indices[a:b], np.repeat(cell_total[lo:hi], per_row)
        if (codes[lo:hi] < 0).any():
            kept = flat >= 0
            flat, counts, peaks, entry_total = flat[kept], counts[kept], peaks[kept], entry_total[kept]
        values = tfidf_entries(counts, entry_total, peaks, peak_total, n_cells)
        flat += peaks
        np.add.at(sums, flat, values)
        np.square(values, out=values)
        np.add.at(sumsq, flat, values)


def _rows(chunk: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """``chunk[rows]`` (a boolean mask or ascending indices), without a copy when every row is kept."""
    every = rows.all() if rows.dtype == bool else rows.size == chunk.shape[0]
    return chunk if every else chunk[rows]


def choose_types(
    labels: np.ndarray, min_cells: int, exclude: Sequence[str], source: str | Path
) -> tuple[list[str], dict[str, int]]:
    """The cell types to build sets for, refusing types with too few cells."""
    present = [lab for lab in labels if lab is not None]
    names, counts = np.unique(np.array(present, dtype=str), return_counts=True)
    sizes = {str(n): int(c) for n, c in zip(names, counts)}
    unknown = sorted(set(exclude) - set(sizes))
    if unknown:
        raise UserError(
            f"--exclude-types names types not in the reference: {', '.join(unknown)}",
            "check the spelling against the label column",
        )
    types = [t for t in sizes if t not in set(exclude)]
    small = sorted(t for t in types if sizes[t] < min_cells)
    if small:
        listed = ", ".join(f"{t} ({sizes[t]})" for t in small)
        raise UserError(
            f"cell types with fewer than --min-cells {min_cells} cells in {source}: {listed}",
            "drop them with --exclude-types or lower --min-cells",
        )
    if len(types) < 2:
        raise UserError(
            f"{source} has {len(types)} usable cell type(s); a panel needs at least 2",
            "check --label-key and --exclude-types",
        )
    return types, sizes


def _known(positions: np.ndarray) -> list[int | None]:
    """Coordinates as ints, ``None`` where unknown (stored as -1)."""
    return [p if p >= 0 else None for p in positions.astype(np.int64).tolist()]


def check_options(min_cells: int, n_candidates: int, peaks_per_type: int | None) -> None:
    """Refuse option values that could only give an empty or meaningless panel."""
    if min_cells < 1:
        raise UserError(f"--min-cells must be at least 1 (got {min_cells})", "e.g. --min-cells 10 (the default)")
    if n_candidates < 1:
        raise UserError(
            f"--n-candidates must be at least 1 (got {n_candidates})",
            f"e.g. --n-candidates {N_CANDIDATES} (the published value)",
        )
    if peaks_per_type is not None and peaks_per_type < 1:
        raise UserError(
            f"--peaks-per-type must be at least 1 (got {peaks_per_type})",
            "e.g. --peaks-per-type 500, or leave it out for the published size",
        )


def select_peaks(
    reference: str | Path,
    *,
    label_key: str | None = None,
    peaks_per_type: int | None = None,
    min_cells: int = 10,
    exclude_types: Sequence[str] = (),
    n_candidates: int = N_CANDIDATES,
    layer: str | None = None,
    chunk_rows: int | None = None,
) -> Panel:
    """The peak panel of a labelled reference ``.h5ad`` (save it with :meth:`Panel.save`).

    ``label_key`` names the obs column of cell types; without it, the one column with a
    usual name (``cell_type``, ``celltype``, ``label``, …) is used.
    """
    from hitanno_cli.h5ad import H5ad

    check_options(min_cells, n_candidates, peaks_per_type)
    keep_freed_memory()  # the chunk temporaries are reused, not page-faulted in afresh
    with artifacts.sha256_file_in_background(reference) as reference_hash, H5ad(reference, layer=layer) as h5:
        h5.check_not_empty()
        h5.unique_obs_names()
        label_key = h5.label_key(label_key)  # None: the one obs column with a usual cell-type name
        labels = h5.labels(label_key)
        types, sizes = choose_types(labels, min_cells, exclude_types, reference)
        var = h5.var  # read whole once: its index gives the names, its columns the coordinates
        names = h5.unique_var_names()
        dropped = sum(1 for lab in labels if lab is None)
        if dropped:
            console.warn(f"{dropped} cells have no '{label_key}' label and are left out")
        codes = type_codes(labels, types)
        formula = published_peaks_per_type(len(types))
        if peaks_per_type is None:
            peaks_per_type = min(formula, h5.n_vars // len(types))
            if peaks_per_type < formula:
                console.info(
                    f"published size P = {formula} peaks per type exceeds the {h5.n_vars} "
                    f"reference peaks; using P = {peaks_per_type}"
                )
        if peaks_per_type < 1:  # only the default can get here: fewer peaks than types
            raise UserError(
                f"{reference} has {h5.n_vars} peak(s) for {len(types)} cell types; a panel needs at least one per type",
                "pass a reference with more peaks, or leave types out with --exclude-types",
            )
        moments = reference_moments(h5, codes, len(types), chunk_rows)
        scores = welch_t(moments.sums, moments.sumsq, moments.n_per_type)
        order, chosen = rare_first_sets(scores, moments.n_per_type, peaks_per_type, n_candidates, types)
        coords = peak_intervals(names, var)
        universe = artifacts.sha256_lines(names)
        inputs = {"reference": reference_hash.result()}
        n_vars = h5.n_vars
    sets = [
        PeakSet(
            types[t],
            sizes[types[t]],
            names[idx].astype(str).tolist(),
            coords.chrom[idx].tolist(),
            _known(coords.start[idx]),
            _known(coords.end[idx]),
            np.round(scores[t, idx].astype(np.float64), 6).tolist(),
        )
        for t, idx in zip(order, chosen)
    ]
    params = {
        "label_key": label_key,
        "peaks_per_type": peaks_per_type,
        "min_cells": min_cells,
        "exclude_types": sorted(exclude_types),
        "n_candidates": n_candidates,
        "layer": layer,
    }
    header = artifacts.make_header(artifacts.PANEL, params, inputs)
    return Panel(sets, universe, n_vars, header)
