"""Mini-batches of cell sentences for training and prediction.

A batch is a CSR ``(indptr, positions)`` of open panel positions (``t * P + j``), the
form :class:`~hitanno_cli.model.HitAnno` takes. For training, cells are shuffled by a
*chunk-shuffle buffer*: each epoch visits the store's chunks in a random order, loads
a group of chunks up to ``buffer_cells`` cells, shuffles the cells inside it and cuts
batches. When a rank's cells fit in one buffer they are read once and kept, which
makes the shuffle global. The order is a pure function of ``(seed, epoch, rank)``, so
a run resumed at an epoch boundary sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hitanno_cli.sentences import OpenRows, SentenceStore
from hitanno_cli.training.options import BUFFER_CELLS


@dataclass
class Batch:
    """One mini-batch: sentences, their store rows and (for training) class indices."""

    open: OpenRows
    rows: np.ndarray
    targets: np.ndarray | None


def split_for_rank(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous slice of (sorted) ``rows``: ranks read disjoint store ranges."""
    rows = np.sort(rows)
    return rows[rank * len(rows) // world : (rank + 1) * len(rows) // world]


class ShuffledCells:
    """Training batches over ``rows`` of a store, shuffled through a bounded buffer."""

    def __init__(
        self,
        store: SentenceStore,
        rows: np.ndarray,
        targets: np.ndarray,
        *,
        batch_size: int,
        buffer_cells: int = BUFFER_CELLS,
        class_rates: np.ndarray | None = None,
    ) -> None:
        """``class_rates``: relative sampling rate per class; an epoch then draws its cells
        with replacement at those rates (within each buffer load) instead of permuting them."""
        self.store, self.batch_size = store, batch_size
        order = np.argsort(rows, kind="stable")
        self.rows, self.targets = rows[order], targets[order]
        self.rates = None if class_rates is None else np.asarray(class_rates, np.float64)[self.targets]
        chunk_of = self.rows // store.chunk_cells
        self.chunks, self.chunk_start = np.unique(chunk_of, return_index=True)
        self.chunk_stop = np.append(self.chunk_start[1:], len(self.rows))
        self.buffer_cells = max(buffer_cells, store.chunk_cells)
        self._cache: OpenRows | None = None
        if len(self.rows) <= self.buffer_cells:
            self._cache = self._load(np.arange(len(self.chunks)))

    @property
    def n_cells(self) -> int:
        return len(self.rows)

    def n_batches(self) -> int:
        return -(-self.n_cells // self.batch_size)

    def _load(self, chunk_ids: np.ndarray) -> OpenRows:
        """Read the selected cells of the given chunks (ordered by chunk id)."""
        parts = []
        for k in chunk_ids:
            lo, hi = self.chunk_start[k], self.chunk_stop[k]
            wanted = self.rows[lo:hi]
            first = int(wanted[0])
            parts.append(self.store.read_open(first, int(wanted[-1]) + 1).take(wanted - first))
        return OpenRows.concat(parts)

    def _groups(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Chunks in random order, grouped so each group fits the buffer."""
        group: list[int] = []
        held = 0
        for k in rng.permutation(len(self.chunks)):
            size = int(self.chunk_stop[k] - self.chunk_start[k])
            if group and held + size > self.buffer_cells:
                yield np.sort(np.array(group))
                group, held = [], 0
            group.append(int(k))
            held += size
        if group:
            yield np.sort(np.array(group))

    def _draw(self, local: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """An order of the loaded cells: a permutation, or a rate-weighted draw of as many."""
        if self.rates is None:
            return rng.permutation(len(local))
        rates = self.rates[local]
        return rng.choice(len(local), size=len(local), replace=True, p=rates / rates.sum())

    def epoch(self, seed: int, epoch: int, rank: int = 0, limit: int | None = None) -> Iterator[Batch]:
        """The batches of one epoch, in an order fixed by ``(seed, epoch, rank)``.

        ``limit`` caps the number of batches (DDP ranks must take equal steps).
        """
        rng = np.random.default_rng([seed, epoch, rank])
        limit = self.n_batches() if limit is None else limit
        made = 0
        pending = _PartialBatch()  # a batch's cells so far, carried across buffer loads
        groups = [np.arange(len(self.chunks))] if self._cache is not None else self._groups(rng)
        for group in groups:
            data = self._cache if self._cache is not None else self._load(group)
            local = np.concatenate([np.arange(self.chunk_start[k], self.chunk_stop[k]) for k in group])
            order = self._draw(local, rng)
            lo = 0
            while lo < len(order):  # each batch is gathered from the buffer, never a shuffled copy of it
                hi = min(len(order), lo + self.batch_size - pending.n)
                pending.add(data.take(order[lo:hi]), local[order[lo:hi]])
                lo = hi
                if pending.n == self.batch_size:
                    if made == limit:
                        return
                    yield pending.batch(self.rows, self.targets)
                    pending, made = _PartialBatch(), made + 1
        if pending.n and made < limit:
            yield pending.batch(self.rows, self.targets)


class _PartialBatch:
    """The cells of a batch being filled: pieces of sentences and their indices in ``rows``."""

    def __init__(self) -> None:
        self.pieces: list[OpenRows] = []
        self.members: list[np.ndarray] = []
        self.n = 0

    def add(self, piece: OpenRows, members: np.ndarray) -> None:
        self.pieces.append(piece)
        self.members.append(members)
        self.n += len(members)

    def batch(self, rows: np.ndarray, targets: np.ndarray) -> Batch:
        members = np.concatenate(self.members)
        sentences = self.pieces[0] if len(self.pieces) == 1 else OpenRows.concat(self.pieces)
        return Batch(sentences, rows[members], targets[members])


def sequential_batches(store: SentenceStore, rows: np.ndarray | None, batch_size: int) -> Iterator[Batch]:
    """Batches of ``rows`` (default: all cells) in store order, read chunk by chunk."""
    rows = np.arange(store.n_cells) if rows is None else np.sort(rows)
    chunk_of = rows // store.chunk_cells
    for chunk in np.unique(chunk_of):
        wanted = rows[chunk_of == chunk]
        first = int(wanted[0])
        data = store.read_open(first, int(wanted[-1]) + 1).take(wanted - first)
        for lo in range(0, len(wanted), batch_size):
            sel = np.arange(lo, min(lo + batch_size, len(wanted)))
            yield Batch(data.take(sel), wanted[sel], None)
