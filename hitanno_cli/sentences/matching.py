"""Matching a data set's peaks to the panel: by name first, then by genomic overlap."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hitanno_cli.genome import Intervals, overlap_pairs, peak_intervals
from hitanno_cli.panel import Panel


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

    def describe(self, source: str) -> str:
        """One line for the log: how many panel peaks were found in ``source``, and how."""
        return (
            f"{self.found}/{self.n_panel} panel peaks found in {source} "
            f"({self.by_name} by name, {self.by_overlap} by overlap; coverage {self.coverage:.3f})"
        )

    @classmethod
    def from_pairs(
        cls, columns: np.ndarray, targets: np.ndarray, *, n_columns: int, n_panel: int, by_name: int, by_overlap: int
    ) -> PeakMatch:
        """The map of ``(column, panel position)`` pairs, in any order."""
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
        sub = Intervals(panel_iv.chrom[unmatched], panel_iv.start[unmatched], panel_iv.end[unmatched])
        q, t = overlap_pairs(data_iv, sub)
        columns.append(q)
        targets.append(unmatched[t])
        n_overlap = int(np.unique(t).size)
    return PeakMatch.from_pairs(
        np.concatenate(columns),
        np.concatenate(targets),
        n_columns=len(names),
        n_panel=panel.size,
        by_name=int(named.sum()),
        by_overlap=n_overlap,
    )
