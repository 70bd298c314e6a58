"""Peak coordinates: parsing peak names and matching peaks by overlap.

Intervals are half-open ``[start, end)`` as in BED; two peaks overlap when they share
at least one base. Chromosomes are compared by :func:`canonical_chrom`, so UCSC names
(``chr1``, ``chrM``) meet Ensembl ones (``1``, ``MT``); the names themselves are kept
as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# chrom, then one of ``:`` ``_`` ``-``, start, then ``-`` or ``_``, end. The chromosome is
# greedy, so the last two integer fields are start and end (``chrUn_KI270302v1_5_90``);
# it may not end in a separator, so ``chr1__5_90`` and ``chr1:-5-90`` are refused.
_NAME = re.compile(r"^(?P<chrom>\S*[^\s:_-])(?P<sep>[:_-])(?P<start>\d+)[-_](?P<end>\d+)$")
_MAX_COORD = np.iinfo(np.int64).max


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
    """``chr1:100-200``, ``chr1_100_200``, ``chr1-100-200`` or ``1:100_200`` → ``(chrom, 100, 200)``.

    The chromosome is returned as written. None for anything else: no two trailing
    integer fields, ``end <= start``, or a ``:`` inside the chromosome unless ``:`` also
    separates it from the start (``HLA-A*01:01:5-90`` parses; ``chr1:5-90-100`` does not).
    """
    match = _NAME.match(name.strip())
    if match is None or (":" in match["chrom"] and match["sep"] != ":"):
        return None
    start, end = int(match["start"]), int(match["end"])
    if end <= start or end > _MAX_COORD:
        return None
    return match["chrom"], start, end


def canonical_chrom(chrom: str) -> str:
    """The key chromosomes are matched by: ``chr1`` and ``1`` → ``1``; ``chrM``, ``MT``, ``M`` → ``M``.

    UCSC and Ensembl name the same chromosomes with and without ``chr`` (and the
    mitochondrion ``chrM`` vs ``MT``); comparing keys lets either meet the other.
    """
    key = chrom[3:] if len(chrom) > 3 and chrom[:3].lower() == "chr" else chrom
    return "M" if key.upper() in ("M", "MT") else key


def chrom_keys(chrom: np.ndarray) -> np.ndarray:
    """:func:`canonical_chrom` of each name in an array (computed once per distinct name)."""
    if chrom.size == 0:
        return np.empty(0, dtype=str)
    uniques, inverse = np.unique(chrom.astype(str), return_inverse=True)
    return np.array([canonical_chrom(c) for c in uniques])[inverse.reshape(-1)]


def peak_intervals(names: np.ndarray, var: pd.DataFrame | None = None) -> Intervals:
    """Coordinates of peaks from ``var`` columns chrom/start/end, else parsed from names."""
    n = len(names)
    if var is not None and {"chrom", "start", "end"} <= set(var.columns):
        import pandas as pd  # loaded already with ``var``; not at import, for the command line's start-up

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

    Chromosomes are compared by :func:`canonical_chrom`.

    Per chromosome, queries are sorted by start; a running maximum of their ends gives
    the first query that can reach a target, so each target inspects only the queries
    that can overlap it.
    """
    q_out, t_out = [], []
    q_known, t_known = np.flatnonzero(query.known), np.flatnonzero(target.known)
    q_chrom = chrom_keys(query.chrom[q_known])  # chr1 meets 1, chrM meets MT
    t_chrom = chrom_keys(target.chrom[t_known])
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
