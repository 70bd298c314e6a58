"""``simulate`` (a synthetic reference/query pair) and ``inspect`` (an artifact's header)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from hitanno_cli import artifacts, console
from hitanno_cli.commands.common import Overwrite, Quiet, command
from hitanno_cli.errors import UserError
from hitanno_cli.simulate import SimulationConfig

_DEFAULTS = SimulationConfig()


@command
def simulate_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for reference.h5ad and query.h5ad.")],
    n_ref: Annotated[int, typer.Option(help="Reference cells.")] = _DEFAULTS.n_ref,
    n_query: Annotated[int, typer.Option(help="Query cells.")] = _DEFAULTS.n_query,
    n_peaks: Annotated[int, typer.Option(help="Peaks.")] = _DEFAULTS.n_peaks,
    n_types: Annotated[int, typer.Option(help="Cell types.")] = _DEFAULTS.n_types,
    open_fraction: Annotated[float, typer.Option(help="Mean share of peaks open in a cell.")] = _DEFAULTS.open_fraction,
    batch_peak_share: Annotated[
        float, typer.Option(help="Share of peaks whose accessibility shifts in the query (donor effect).")
    ] = _DEFAULTS.batch_peak_share,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _DEFAULTS.seed,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write a synthetic scATAC-seq reference and a batch-shifted query (labels in cell_type)."""
    if n_types < 2 or n_peaks < n_types or min(n_ref, n_query) < 2 * n_types:
        raise UserError("simulation sizes too small", "use ≥ 2 types, ≥ 2 cells per type and more peaks than types")
    cfg = SimulationConfig(n_ref=n_ref, n_query=n_query, n_peaks=n_peaks, n_types=n_types,
                           n_lineages=max(1, n_types // 3), open_fraction=open_fraction,
                           batch_peak_share=batch_peak_share, seed=seed,
                           min_type_cells=min(_DEFAULTS.min_type_cells, (n_ref + n_query) // (2 * n_types)))
    from hitanno_cli.simulate import write_pair

    with artifacts.atomic_dir(output, overwrite) as tmp:
        write_pair(cfg, tmp)
    console.info(f"simulate: {n_ref} reference + {n_query} query cells × {n_peaks} peaks, "
                 f"{n_types} types → {output}/reference.h5ad, {output}/query.h5ad")


def read_header(path: Path) -> dict[str, Any]:
    """The hitanno header (and summary fields) of a panel, sentence store or model."""
    if (path / "zarr.json").is_file():
        from hitanno_cli.sentences import SentenceStore

        meta = dict(SentenceStore(path).meta)
        return meta
    weights = path / "model.safetensors" if path.is_dir() else path
    if weights.suffix == ".safetensors" and weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="numpy") as handle:
            meta = dict(handle.metadata() or {})
        header = {key: _maybe_json(value) for key, value in meta.items()}
        adaptation = weights.parent / "adaptation.json"  # a model self-trained on a query (train --adapt-to)
        if adaptation.is_file():
            header["adaptation"] = artifacts.read_json(adaptation, "adaptation record")
        return header
    obj = artifacts.read_json(path, "artifact")
    if not isinstance(obj, dict) or "header" not in obj:
        raise UserError(f"{path} is not a hitanno artifact", "pass a panel, sentence store or model")
    return {key: value for key, value in obj.items() if key != "panel"}


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@command
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="A panel (.json), sentence store (.zarr) or model directory.")],
    quiet: Quiet = False,
) -> None:
    """Print an artifact's header (format, version, parameters, input hashes) as JSON on stdout."""
    if not path.exists():
        raise UserError(f"{path} does not exist", "check the path")
    typer.echo(json.dumps(read_header(path), indent=1))


@command
def split_cmd(
    data: Annotated[Path, typer.Argument(help="Labelled .h5ad to split into reference and query.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for reference.h5ad and query.h5ad.")],
    by: Annotated[Optional[str], typer.Option(help="obs column to split on (e.g. donor): one value becomes the query.")] = None,
    query_value: Annotated[
        Optional[str], typer.Option(help="With --by: the value that becomes the query (default: the smallest group).")
    ] = None,
    query_fraction: Annotated[float, typer.Option(help="Without --by: share of cells in the query.")] = 0.3,
    label_key: Annotated[Optional[str], typer.Option("--label-key", "-l", help="Stratify the random split by this column.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random split.")] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Split a labelled .h5ad into a reference and a query, by a column (donor) or at random."""
    from hitanno_cli.h5ad import H5ad
    from hitanno_cli.splitting import query_mask, write_split

    with H5ad(data) as h5:
        obs = h5.obs
    mask = query_mask(obs, by, query_value, query_fraction, label_key, seed, data)
    with artifacts.atomic_dir(output, overwrite) as tmp:
        write_split(data, mask, tmp)
    console.info(f"split: {int((~mask).sum())} reference and {int(mask.sum())} query cells → {output}")
