"""Matching a data set's peaks to the panel: by name first, then by genomic overlap."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hitanno_cli.genome import Intervals, canonical_chrom, overlap_pairs, peak_intervals
from hitanno_cli.panel import Panel


@dataclass
class PeakMatch:
    """Which panel positions each data column lights up (a CSR map: column → positions)."""

    indptr: np.ndarray  # [n_columns + 1]
    targets: np.ndarray  # panel positions, grouped by column
    n_panel: int
    by_name: int
    by_overlap: int
    renamed_chromosomes: int = 0  # of by_overlap: found only because chromosome names were translated
    chromosome_renames: tuple[tuple[str, str], ...] = ()  # distinct (data name, panel name) pairs

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

    def describe(self, source: str) -> str:
        """One line for the log: how many panel peaks were found in ``source``, and how."""
        renamed = ""
        if self.renamed_chromosomes:
            renamed = f", {self.renamed_chromosomes} of them via {describe_renames(self.chromosome_renames)}"
        return (
            f"{self.found}/{self.n_panel} panel peaks found in {source} "
            f"({self.by_name} by name, {self.by_overlap} by overlap{renamed}; coverage {self.coverage:.3f})"
        )

    @classmethod
    def from_pairs(
        cls,
        columns: np.ndarray,
        targets: np.ndarray,
        *,
        n_columns: int,
        n_panel: int,
        by_name: int,
        by_overlap: int,
        renamed_chromosomes: int = 0,
        chromosome_renames: tuple[tuple[str, str], ...] = (),
    ) -> PeakMatch:
        """The map of ``(column, panel position)`` pairs, in any order."""
        order = np.lexsort((targets, columns))
        columns, targets = columns[order], targets[order]
        indptr = np.zeros(n_columns + 1, dtype=np.int64)
        np.cumsum(np.bincount(columns, minlength=n_columns), out=indptr[1:])
        return cls(
            indptr, targets.astype(np.int64), n_panel, by_name, by_overlap, renamed_chromosomes, chromosome_renames
        )


def describe_renames(renames: tuple[tuple[str, str], ...]) -> str:
    """How data chromosome names were translated to the panel's, in a few words.

    The common cases are named as such (Ensembl ``1`` to UCSC ``chr1`` or back; the
    mitochondrion, ``MT`` vs ``chrM``, goes along); anything else shows an example pair.
    """
    kinds = {_rename_kind(data, panel) for data, panel in renames} - {"mito"}
    if kinds == {"add chr"}:
        return "chromosome names without 'chr' matched to 'chr…'"
    if kinds == {"drop chr"}:
        return "'chr…' chromosome names matched to names without 'chr'"
    if not renames:
        return "translated chromosome names"
    data, panel = renames[0]
    more = f" and {len(renames) - 1} more" if len(renames) > 1 else ""
    return f"translated chromosome names ('{data}' to '{panel}'{more})"


def _rename_kind(data: str, panel: str) -> str:
    """Which translation took data chromosome ``data`` to panel chromosome ``panel``."""
    if canonical_chrom(data) == "M":
        return "mito"
    if panel.lower() == "chr" + data.lower():
        return "add chr"
    if data.lower() == "chr" + panel.lower():
        return "drop chr"
    return "other"


def match_panel(panel: Panel, names: np.ndarray, var: Callable[[], Any]) -> PeakMatch:
    """Match panel peaks to data columns: by name first, then by genomic overlap.

    ``var`` returns the data's feature table; it is read only when some panel peak is
    not found by name (reading it costs more than the name match).
    """
    by_name = pd.Index(names).get_indexer(pd.Index(panel.flat_names())).astype(np.int64)  # names are unique
    named = by_name >= 0
    columns, targets = [by_name[named]], [np.flatnonzero(named)]
    n_overlap, n_renamed, renames = 0, 0, ()
    if not named.all():
        panel_iv = panel.flat_intervals()
        unmatched = np.flatnonzero(~named)
        data_iv = peak_intervals(names, var())
        sub = Intervals(panel_iv.chrom[unmatched], panel_iv.start[unmatched], panel_iv.end[unmatched])
        q, t = overlap_pairs(data_iv, sub)
        columns.append(q)
        targets.append(unmatched[t])
        n_overlap = int(np.unique(t).size)
        n_renamed, renames = _renamed(data_iv.chrom[q], sub.chrom[t], t)
    return PeakMatch.from_pairs(
        np.concatenate(columns),
        np.concatenate(targets),
        n_columns=len(names),
        n_panel=panel.size,
        by_name=int(named.sum()),
        by_overlap=n_overlap,
        renamed_chromosomes=n_renamed,
        chromosome_renames=renames,
    )


def _renamed(data_chrom: np.ndarray, panel_chrom: np.ndarray, t: np.ndarray) -> tuple[int, tuple[tuple[str, str], ...]]:
    """Overlap pairs whose chromosomes are named differently: panel peaks found only so, and the name pairs.

    A panel peak counts when none of its overlapping data peaks shares its chromosome's
    name as written (it would not have been found without translation).
    """
    if t.size == 0:
        return 0, ()
    data_chrom, panel_chrom = data_chrom.astype(str), panel_chrom.astype(str)
    same = data_chrom == panel_chrom
    found_as_written = np.unique(t[same])
    n_renamed = int(np.setdiff1d(np.unique(t[~same]), found_as_written).size)
    pairs = sorted(set(zip(data_chrom[~same].tolist(), panel_chrom[~same].tolist())), key=_natural)
    return n_renamed, tuple(pairs)


def _natural(pair: tuple[str, str]) -> tuple:
    """Sort key putting ``chr2`` before ``chr10`` (so an example names a familiar chromosome)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", pair[1]))
