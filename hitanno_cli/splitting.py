"""Splitting one labelled data set into a reference and a query (by donor, or at random)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from hitanno_cli import artifacts, console, outputs
from hitanno_cli.errors import UserError
from hitanno_cli.h5ad import READ_ERRORS, H5ad, damaged


def query_mask(
    obs: pd.DataFrame,
    *,
    by: str | None,
    query_value: str | None,
    fraction: float,
    label_key: str | None,
    seed: int,
    source: str | Path,
) -> np.ndarray:
    """Boolean mask of the query cells."""
    for key in (by, label_key):
        if key is not None and key not in obs.columns:
            raise UserError(
                f"'{key}' is not a column of obs in {source}", f"use one of: {', '.join(map(str, obs.columns))}"
            )
    if by is not None:
        values = obs[by].astype(str).to_numpy()
        groups = pd.Series(values).value_counts()
        if len(groups) < 2:
            raise UserError(f"obs['{by}'] has a single value", "split at random with --query-fraction instead")
        chosen = query_value if query_value is not None else str(groups.index[-1])
        if chosen not in groups.index:
            raise UserError(f"'{chosen}' is not a value of obs['{by}']", f"use one of: {', '.join(groups.index)}")
        return values == chosen
    if not 0 < fraction < 1:
        raise UserError(f"--query-fraction {fraction} is not in (0, 1)", "e.g. --query-fraction 0.3")
    from sklearn.model_selection import train_test_split

    index = np.arange(len(obs))
    strata = obs[label_key].astype(str).to_numpy() if label_key else None
    try:
        _, query = train_test_split(index, test_size=fraction, random_state=seed, stratify=strata)
    except ValueError:  # a type too small to stratify
        _, query = train_test_split(index, test_size=fraction, random_state=seed)
    mask = np.zeros(len(obs), dtype=bool)
    mask[query] = True
    return mask


def write_split(data: str | Path, mask: np.ndarray, out_dir: Path) -> tuple[Path, Path]:
    """Write ``reference.h5ad`` (cells not in ``mask``) and ``query.h5ad`` (cells in it).

    A failure to read ``data`` (truncated or damaged) is a :class:`UserError`; a failure
    to write is not caught here.
    """
    try:
        backed = ad.read_h5ad(data, backed="r")
    except READ_ERRORS as err:
        raise damaged(data, err) from None
    try:
        paths = out_dir / "reference.h5ad", out_dir / "query.h5ad"
        for rows, path in ((~mask, paths[0]), (mask, paths[1])):
            try:
                part = backed[np.flatnonzero(rows)].to_memory()
            except READ_ERRORS as err:
                raise damaged(data, err) from None
            part.write_h5ad(path)
    finally:
        try:
            backed.file.close()
        except READ_ERRORS:  # closing a damaged file can fail too
            pass
    return paths


def split(
    data: str | Path,
    *,
    output: str | Path,
    by: str | None = None,
    query_value: str | None = None,
    query_fraction: float = 0.3,
    label_key: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Split a labelled ``.h5ad`` into ``output/reference.h5ad`` and ``output/query.h5ad``:
    one value of the column ``by`` becomes the query (default: its smallest group), or,
    without ``by``, a random ``query_fraction`` of the cells (stratified by ``label_key``)."""
    with H5ad(data) as h5:
        if h5.n_obs < 2:
            raise UserError(f"{data} has {h5.n_obs} cell(s); a split needs at least 2", "pass a file with more cells")
        h5.unique_obs_names()
        obs = h5.obs
    mask = query_mask(
        obs, by=by, query_value=query_value, fraction=query_fraction, label_key=label_key, seed=seed, source=data
    )
    with outputs.writing(output, kind=outputs.PAIR_FOLDER, overwrite=overwrite, inputs=[data]) as out:
        with artifacts.atomic_dir(out, overwrite=True) as tmp:
            write_split(data, mask, tmp)
    console.info(f"split: {int((~mask).sum())} reference and {int(mask.sum())} query cells → {out}")
    return out / "reference.h5ad", out / "query.h5ad"
