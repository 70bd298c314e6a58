"""Peak coordinates: parsing ``chr:start-end`` names and matching peaks by overlap.

Intervals are half-open ``[start, end)`` as in BED; two peaks overlap when they share
at least one base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

_NAME = re.compile(r"^(?P<chrom>[^:_\s]+(?:_[^:_\s]+)*?)[:_](?P<start>\d+)[-_](?P<end>\d+)$")


@dataclass(frozen=True)
class Intervals:
    """Genomic intervals, one per peak (``chrom`` is ``None`` where unknown)."""

    chrom: np.ndarray  # object array of str or None
    start: np.ndarray  # int64, -1 where unknown
    end: np.ndarray  # int64, -1 where unknown

    @property
    def known(self) -> np.ndarray:
        """Boolean mask of peaks whose coordinates are known."""
        return self.start >= 0

    def __len__(self) -> int:
        return len(self.start)


def parse_peak_name(name: str) -> tuple[str, int, int] | None:
    """``chr1:100-200`` or ``chr1_100_200`` → ``("chr1", 100, 200)``; None if neither."""
    match = _NAME.match(name.strip())
    if match is None:
        return None
    start, end = int(match["start"]), int(match["end"])
    if end <= start:
        return None
    return match["chrom"], start, end


def peak_intervals(names: np.ndarray, var: pd.DataFrame | None = None) -> Intervals:
    """Coordinates of peaks from ``var`` columns chrom/start/end, else parsed from names."""
    n = len(names)
    if var is not None and {"chrom", "start", "end"} <= set(var.columns):
        chrom = var["chrom"].astype(object).to_numpy()
        start = pd.to_numeric(var["start"], errors="coerce").to_numpy()
        end = pd.to_numeric(var["end"], errors="coerce").to_numpy()
        ok = ~(pd.isna(chrom) | np.isnan(start) | np.isnan(end))
        out_chrom = np.array([str(c) if k else None for c, k in zip(chrom, ok)], dtype=object)
        return Intervals(
            out_chrom,
            np.where(ok, np.nan_to_num(start), -1).astype(np.int64),
            np.where(ok, np.nan_to_num(end), -1).astype(np.int64),
        )
    chrom = np.empty(n, dtype=object)
    start = np.full(n, -1, dtype=np.int64)
    end = np.full(n, -1, dtype=np.int64)
    for i, name in enumerate(names):
        parsed = parse_peak_name(str(name))
        if parsed is not None:
            chrom[i], start[i], end[i] = parsed
    return Intervals(chrom, start, end)


def overlap_pairs(query: Intervals, target: Intervals) -> tuple[np.ndarray, np.ndarray]:
    """All ``(query_index, target_index)`` pairs of overlapping intervals.

    Per chromosome, queries are sorted by start; a running maximum of their ends gives
    the first query that can reach a target, so each target inspects only the queries
    that can overlap it.
    """
    q_out, t_out = [], []
    q_known, t_known = np.flatnonzero(query.known), np.flatnonzero(target.known)
    q_chrom = query.chrom[q_known].astype(str)
    t_chrom = target.chrom[t_known].astype(str)
    for chrom in np.intersect1d(np.unique(q_chrom), np.unique(t_chrom)):
        qi = q_known[q_chrom == chrom]
        ti = t_known[t_chrom == chrom]
        order = np.argsort(query.start[qi], kind="stable")
        qi = qi[order]
        q_start, q_end = query.start[qi], query.end[qi]
        reach = np.maximum.accumulate(q_end)
        t_start, t_end = target.start[ti], target.end[ti]
        first = np.searchsorted(reach, t_start, side="right")  # first with reach > t_start
        last = np.searchsorted(q_start, t_end, side="left")  # queries starting before t_end
        counts = np.maximum(last - first, 0)
        if counts.sum() == 0:
            continue
        target_rep = np.repeat(np.arange(len(ti)), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        cand = np.repeat(first, counts) + offsets
        hit = q_end[cand] > t_start[target_rep]
        q_out.append(qi[cand[hit]])
        t_out.append(ti[target_rep[hit]])
    if not q_out:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(q_out), np.concatenate(t_out)
