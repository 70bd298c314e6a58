"""Synthetic scATAC-seq: a labelled reference and a batch-shifted query.

Cell types sit in lineages; each lineage opens a shared programme of peaks and each type
a programme of its own, so related types overlap. Type sizes follow a power law (with
rare types), per-cell depth varies log-normally, and the query is a second "donor": its
depth and a subset of its peaks' accessibility are shifted.

Everything is streamed: the layout (:func:`draw`) is ``O(types × peaks + cells)`` and the
counts are drawn and written one block of cells at a time, so an atlas of millions of
cells is simulated in bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas and scipy load when data is made: `hitanno --help` stays quick
    import pandas as pd
    import scipy.sparse as sp

#: Cells simulated, and held in memory, at a time.
BLOCK_CELLS = 8192
#: Shares of the peaks in each type's and each lineage's programme.
PROGRAMME_SHARE, LINEAGE_PROGRAMME_SHARE = 150 / 3000, 200 / 3000


@dataclass
class SimulationConfig:
    """Sizes and effect strengths of a simulated reference/query pair."""

    n_ref: int = 2000
    n_query: int = 1000
    n_peaks: int = 3000
    n_types: int = 8
    n_lineages: int = 3
    open_fraction: float = 0.03  # mean share of peaks open in a cell
    programme_size: int = 150  # peaks specific to each type
    lineage_programme_size: int = 200
    programme_boost: float = 8.0  # how much more often programme peaks open
    size_exponent: float = 1.2  # power law of type sizes
    min_type_cells: int = 25
    depth_sigma: float = 0.4
    batch_peak_share: float = 0.1  # share of peaks whose accessibility shifts in the query
    batch_depth_shift: float = 0.8  # query depth multiplier
    seed: int = 0


def simulation_config(
    *,
    n_ref: int,
    n_query: int,
    n_peaks: int,
    n_types: int,
    open_fraction: float,
    batch_peak_share: float,
    seed: int,
    min_type_cells: int | None = None,
    programme_share: float = PROGRAMME_SHARE,
    programme_boost: float = SimulationConfig.programme_boost,
) -> SimulationConfig:
    """A simulation of the given sizes: a lineage per three types, programmes that keep
    their share of the peaks (``programme_share`` per type, 5 % by default as at 3 000
    peaks, and 4/3 of it per lineage), and rare types of ``min_type_cells`` (default: 25,
    or fewer where the data cannot hold them). A smaller share or ``programme_boost``
    leaves fewer of a cell's reads telling its type: a harder data set. Refuses sizes that
    cannot make a labelled pair."""
    from hitanno_cli.errors import UserError

    if n_types < 2 or n_peaks < n_types or min(n_ref, n_query) < 2 * n_types:
        raise UserError("simulation sizes too small", "use ≥ 2 types, ≥ 2 cells per type and more peaks than types")
    if min_type_cells is not None and not 1 <= min_type_cells * n_types <= n_ref + n_query:
        raise UserError(
            f"--min-type-cells {min_type_cells} × {n_types} types does not fit {n_ref + n_query} cells",
            "pass a smaller --min-type-cells",
        )
    if not 0.0 < open_fraction < 1.0:
        raise UserError(
            f"--open-fraction {open_fraction} is not a share of peaks in (0, 1)", "e.g. --open-fraction 0.03"
        )
    if not 0.0 <= batch_peak_share <= 1.0:
        raise UserError(
            f"--batch-peak-share {batch_peak_share} is not a share in [0, 1]", "e.g. --batch-peak-share 0.1"
        )
    if not 0.0 < programme_share <= 0.5 or programme_boost <= 1.0:
        raise UserError(
            f"--programme-share {programme_share} / --programme-boost {programme_boost} make no type programme",
            "pass a share in (0, 0.5] and a boost above 1, e.g. --programme-share 0.05 --programme-boost 8",
        )
    return SimulationConfig(
        n_ref=n_ref,
        n_query=n_query,
        n_peaks=n_peaks,
        n_types=n_types,
        n_lineages=max(1, n_types // 3),
        open_fraction=open_fraction,
        batch_peak_share=batch_peak_share,
        seed=seed,
        programme_size=max(1, round(n_peaks * programme_share)),
        lineage_programme_size=max(1, round(n_peaks * programme_share * LINEAGE_PROGRAMME_SHARE / PROGRAMME_SHARE)),
        programme_boost=programme_boost,
        min_type_cells=min_type_cells or min(SimulationConfig.min_type_cells, (n_ref + n_query) // (2 * n_types)),
    )


def type_sizes(n_cells: int, n_types: int, exponent: float, minimum: int, rng: np.random.Generator) -> np.ndarray:
    """Cells per type from a power law ``rank^-exponent``, each at least ``minimum``."""
    weights = np.arange(1, n_types + 1, dtype=float) ** -exponent
    rng.shuffle(weights)
    spare = max(n_cells - minimum * n_types, 0)
    sizes = minimum + np.floor(spare * weights / weights.sum()).astype(int)
    sizes[np.argmax(sizes)] += n_cells - sizes.sum()
    return sizes


@dataclass
class Donor:
    """One simulated data set: its cells' types and depths, and where each peak opens."""

    prefix: str
    name: str
    labels: np.ndarray  # int [cells]
    depth: np.ndarray  # float [cells]
    cdf: np.ndarray  # float64 [types, peaks]: each type's cumulative peak distribution


@dataclass
class Simulation:
    """Everything drawn once, before any cell: types, peaks and both donors."""

    type_names: list[str]
    var: pd.DataFrame
    donors: tuple[Donor, Donor]


def draw(cfg: SimulationConfig) -> Simulation:
    """The seeded layout of a simulation; memory is ``O(types × peaks + cells)``."""
    rng = np.random.default_rng(cfg.seed)
    rates, lineage_of = _peak_rates(cfg, rng)
    width = max(2, len(str(cfg.n_types - 1)))
    names = [f"type_{t:0{width}d}_L{lineage_of[t]}" for t in range(cfg.n_types)]
    sizes = type_sizes(cfg.n_ref + cfg.n_query, cfg.n_types, cfg.size_exponent, cfg.min_type_cells, rng)
    labels = rng.permutation(np.repeat(np.arange(cfg.n_types), sizes))
    shifted = rng.choice(cfg.n_peaks, int(cfg.batch_peak_share * cfg.n_peaks), replace=False)
    query_rates = rates.copy()
    query_rates[:, shifted] *= rng.choice([0.4, 2.5], size=len(shifted))
    ref_depth = rng.lognormal(0.0, cfg.depth_sigma, cfg.n_ref)
    query_depth = rng.lognormal(np.log(cfg.batch_depth_shift), cfg.depth_sigma, cfg.n_query)
    var = _peak_table(cfg.n_peaks, rng)
    donors = (
        Donor("ref", "donor_A", labels[: cfg.n_ref], ref_depth, _cumulative(rates)),
        Donor("query", "donor_B", labels[cfg.n_ref :], query_depth, _cumulative(query_rates)),
    )
    return Simulation(names, var, donors)


def _peak_rates(cfg: SimulationConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Relative opening rate of every peak for every type, and each type's lineage."""
    background = rng.gamma(2.0, 0.5, size=cfg.n_peaks)
    lineage_of = np.arange(cfg.n_types) % cfg.n_lineages
    rates = np.tile(background, (cfg.n_types, 1))
    for lineage in range(cfg.n_lineages):
        shared = rng.choice(cfg.n_peaks, min(cfg.lineage_programme_size, cfg.n_peaks), replace=False)
        rates[np.ix_(lineage_of == lineage, shared)] *= cfg.programme_boost / 2
    for t in range(cfg.n_types):
        own = rng.choice(cfg.n_peaks, min(cfg.programme_size, cfg.n_peaks), replace=False)
        rates[t, own] *= cfg.programme_boost
    return rates, lineage_of


def _cumulative(rates: np.ndarray) -> np.ndarray:
    """Each row of ``rates`` as a cumulative distribution over the peaks, offset by its row
    number (row ``t`` runs over ``(t, t + 1]``), so that one sorted search serves every type."""
    cdf = np.cumsum(rates, axis=1)
    cdf /= cdf[:, -1:]
    return cdf + np.arange(len(rates))[:, None]


def cell_blocks(
    donor: Donor, *, n_peaks: int, open_fraction: float, seed: int, block_cells: int = BLOCK_CELLS
) -> Iterator[sp.csr_matrix]:
    """The donor's counts, ``block_cells`` cells at a time (CSR float32, in cell order).

    A cell of type ``t`` and depth ``d`` has Poisson counts at every peak, with mean
    ``d × open_fraction × n_peaks × p_t(peak)``: a Poisson number of reads, each at a peak
    drawn from its type's distribution ``p_t`` (counts mostly 1, sometimes 2 or more).
    Drawing reads, not a Bernoulli per peak, costs ``O(reads)`` per cell, not ``O(peaks)``.
    """
    import scipy.sparse as sp

    rng = np.random.default_rng([seed, 0 if donor.prefix == "ref" else 1])
    flat = donor.cdf.ravel()
    for start in range(0, len(donor.labels), block_cells):
        labels = donor.labels[start : start + block_cells]
        reads = rng.poisson(donor.depth[start : start + block_cells] * open_fraction * n_peaks)
        cell = np.repeat(np.arange(len(labels)), reads)
        draw_at = labels[cell] + rng.random(len(cell))  # in (t, t + 1] for a read of type t
        peak = np.minimum(np.searchsorted(flat, draw_at), len(flat) - 1) % n_peaks
        counts = sp.csr_matrix(
            (np.ones(len(cell), dtype=np.float32), (cell, peak)), shape=(len(labels), n_peaks)
        )  # duplicates add up
        counts.sum_duplicates()
        yield counts


def obs_table(sim: Simulation, donor: Donor) -> pd.DataFrame:
    """The donor's cell ids, types and donor name."""
    import pandas as pd

    return pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(donor.labels, categories=sim.type_names),
            "donor": pd.Categorical([donor.name] * len(donor.labels)),
        },
        index=pd.Index([f"{donor.prefix}_{i}" for i in range(len(donor.labels))]),
    )


def _peak_table(n_peaks: int, rng: np.random.Generator) -> pd.DataFrame:
    """Peak coordinates on a few chromosomes, named ``chr:start-end``."""
    import pandas as pd

    chroms = np.sort(rng.integers(1, 6, size=n_peaks))
    starts = np.zeros(n_peaks, dtype=np.int64)
    for c in np.unique(chroms):
        idx = np.flatnonzero(chroms == c)
        starts[idx] = np.cumsum(rng.integers(600, 5000, size=len(idx)))
    ends = starts + 500
    chrom = np.array([f"chr{c}" for c in chroms])
    names = [f"{c}:{s}-{e}" for c, s, e in zip(chrom, starts, ends)]
    return pd.DataFrame({"chrom": chrom, "start": starts, "end": ends}, index=names)


def simulate_pair(output: str | Path, *, config: SimulationConfig, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a simulated ``reference.h5ad`` and ``query.h5ad`` into the folder ``output``, atomically."""
    from hitanno_cli import artifacts, outputs

    with outputs.writing(output, kind=outputs.PAIR_FOLDER, overwrite=overwrite) as out:
        with artifacts.atomic_dir(out, overwrite=True) as tmp:
            write_pair(config, tmp)
    return out / "reference.h5ad", out / "query.h5ad"


def write_pair(cfg: SimulationConfig, out_dir: str | Path) -> tuple[Path, Path]:
    """Simulate and write ``reference.h5ad`` and ``query.h5ad`` into ``out_dir``, streamed:
    memory holds one block of cells, whatever their number."""
    from hitanno_cli import console

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sim = draw(cfg)
    paths = out_dir / "reference.h5ad", out_dir / "query.h5ad"
    for donor, path in zip(sim.donors, paths):
        tmp = path.with_name(f".{path.name}.tmp")
        blocks = cell_blocks(donor, n_peaks=cfg.n_peaks, open_fraction=cfg.open_fraction, seed=cfg.seed)
        with console.progress(f"simulate: {path.name}", len(donor.labels)) as bar:
            write_h5ad_blocks(tmp, blocks, obs=obs_table(sim, donor), var=sim.var, on_block=bar.advance)
        tmp.replace(path)
    return paths


def write_h5ad_blocks(
    path: Path,
    blocks: Iterator[sp.csr_matrix],
    *,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    on_block: Callable[[int], object] = lambda n: None,
) -> None:
    """Write an ``.h5ad`` whose CSR ``X`` arrives in row blocks (anndata's own element
    writer and on-disk append), never holding more than one block."""
    import h5py
    from anndata.io import sparse_dataset, write_elem

    chunks = {"chunks": (1 << 18,)}
    with h5py.File(path, "w") as handle:
        first = next(blocks)
        write_elem(handle, "X", first, dataset_kwargs=chunks)
        on_block(first.shape[0])
        matrix = sparse_dataset(handle["X"])
        for block in blocks:
            matrix.append(block)
            on_block(block.shape[0])
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", var)
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(handle, name, {})
