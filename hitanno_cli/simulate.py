"""Synthetic scATAC-seq: a labelled reference and a batch-shifted query.

Cell types sit in lineages; each lineage opens a shared programme of peaks and each type
a programme of its own, so related types overlap. Type sizes follow a power law (with
rare types), per-cell depth varies log-normally, and the query is a second "donor": its
depth and a subset of its peaks' accessibility are shifted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:  # anndata and pandas load when data is made: `hitanno --help` stays quick
    import anndata as ad
    import pandas as pd


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
) -> SimulationConfig:
    """A simulation of the given sizes: a lineage per three types, and rare types no
    smaller than the data allows. Refuses sizes that cannot make a labelled pair."""
    from hitanno_cli.errors import UserError

    if n_types < 2 or n_peaks < n_types or min(n_ref, n_query) < 2 * n_types:
        raise UserError("simulation sizes too small", "use ≥ 2 types, ≥ 2 cells per type and more peaks than types")
    if not 0.0 < open_fraction < 1.0:
        raise UserError(
            f"--open-fraction {open_fraction} is not a share of peaks in (0, 1)", "e.g. --open-fraction 0.03"
        )
    if not 0.0 <= batch_peak_share <= 1.0:
        raise UserError(
            f"--batch-peak-share {batch_peak_share} is not a share in [0, 1]", "e.g. --batch-peak-share 0.1"
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
        min_type_cells=min(SimulationConfig.min_type_cells, (n_ref + n_query) // (2 * n_types)),
    )


def type_sizes(n_cells: int, n_types: int, exponent: float, minimum: int, rng: np.random.Generator) -> np.ndarray:
    """Cells per type from a power law ``rank^-exponent``, each at least ``minimum``."""
    weights = np.arange(1, n_types + 1, dtype=float) ** -exponent
    rng.shuffle(weights)
    spare = max(n_cells - minimum * n_types, 0)
    sizes = minimum + np.floor(spare * weights / weights.sum()).astype(int)
    sizes[np.argmax(sizes)] += n_cells - sizes.sum()
    return sizes


def _peak_rates(cfg: SimulationConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Relative opening rate of every peak for every type, and each type's lineage."""
    background = rng.gamma(2.0, 0.5, size=cfg.n_peaks)
    lineage_of = np.arange(cfg.n_types) % cfg.n_lineages
    rates = np.tile(background, (cfg.n_types, 1))
    for lineage in range(cfg.n_lineages):
        shared = rng.choice(cfg.n_peaks, cfg.lineage_programme_size, replace=False)
        rates[np.ix_(lineage_of == lineage, shared)] *= cfg.programme_boost / 2
    for t in range(cfg.n_types):
        own = rng.choice(cfg.n_peaks, cfg.programme_size, replace=False)
        rates[t, own] *= cfg.programme_boost
    return rates, lineage_of


def _cells(
    rates: np.ndarray, labels: np.ndarray, depth: np.ndarray, open_fraction: float, rng: np.random.Generator
) -> sp.csr_matrix:
    """Counts (mostly 1, sometimes 2) of cells with the given types and depths."""
    n_peaks = rates.shape[1]
    mean_rate = rates.mean(axis=1, keepdims=True)
    prob = rates / mean_rate * open_fraction
    rows = []
    for start in range(0, len(labels), 2048):
        lab, dep = labels[start : start + 2048], depth[start : start + 2048]
        p = np.minimum(prob[lab] * dep[:, None], 0.95)
        is_open = rng.random((len(lab), n_peaks)) < p
        counts = is_open.astype(np.float32) + (is_open & (rng.random(is_open.shape) < 0.15))
        rows.append(sp.csr_matrix(counts))
    return sp.vstack(rows).tocsr() if rows else sp.csr_matrix((0, n_peaks), dtype=np.float32)


def simulate(cfg: SimulationConfig) -> tuple[ad.AnnData, ad.AnnData]:
    """A reference and a query AnnData (raw counts, CSR float32) with ``cell_type`` labels."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(cfg.seed)
    rates, lineage_of = _peak_rates(cfg, rng)
    names = [f"type_{t:02d}_L{lineage_of[t]}" for t in range(cfg.n_types)]
    sizes = type_sizes(cfg.n_ref + cfg.n_query, cfg.n_types, cfg.size_exponent, cfg.min_type_cells, rng)
    labels = rng.permutation(np.repeat(np.arange(cfg.n_types), sizes))
    ref_labels, query_labels = labels[: cfg.n_ref], labels[cfg.n_ref :]
    shifted = rng.choice(cfg.n_peaks, int(cfg.batch_peak_share * cfg.n_peaks), replace=False)
    query_rates = rates.copy()
    query_rates[:, shifted] *= rng.choice([0.4, 2.5], size=len(shifted))
    ref_depth = rng.lognormal(0.0, cfg.depth_sigma, cfg.n_ref)
    query_depth = rng.lognormal(np.log(cfg.batch_depth_shift), cfg.depth_sigma, cfg.n_query)
    var = _peak_table(cfg.n_peaks, rng)
    out = []
    for prefix, donor, lab, dep, r in (
        ("ref", "donor_A", ref_labels, ref_depth, rates),
        ("query", "donor_B", query_labels, query_depth, query_rates),
    ):
        x = _cells(r, lab, dep, cfg.open_fraction, rng)
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical([names[t] for t in lab], categories=names), "donor": donor},
            index=[f"{prefix}_{i}" for i in range(len(lab))],
        )
        out.append(ad.AnnData(X=x.astype(np.float32), obs=obs, var=var.copy()))
    return out[0], out[1]


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
    """Simulate and write ``reference.h5ad`` and ``query.h5ad`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref, query = simulate(cfg)
    paths = out_dir / "reference.h5ad", out_dir / "query.h5ad"
    for adata, path in zip((ref, query), paths):
        tmp = path.with_name(f".{path.name}.tmp")
        adata.write_h5ad(tmp)
        tmp.replace(path)
    return paths
