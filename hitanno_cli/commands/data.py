"""``simulate`` (a synthetic reference/query pair), ``inspect`` (an artifact's header) and
``split`` (one labelled data set into a reference and a query)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hitanno_cli import artifacts, console
from hitanno_cli.commands.common import Overwrite, Quiet, command
from hitanno_cli.simulate import PROGRAMME_SHARE, SimulationConfig

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
    min_type_cells: Annotated[
        int | None, typer.Option(help="Cells of the rarest types (default: 25, fewer if the data is small).")
    ] = None,
    programme_share: Annotated[
        float, typer.Option(help="Share of the peaks in each type's own programme (smaller: harder).")
    ] = PROGRAMME_SHARE,
    programme_boost: Annotated[
        float, typer.Option(help="How much more often a programme's peaks open (smaller: harder).")
    ] = _DEFAULTS.programme_boost,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _DEFAULTS.seed,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write a synthetic scATAC-seq reference and a batch-shifted query (labels in cell_type), streamed."""
    from hitanno_cli.simulate import simulate_pair, simulation_config

    cfg = simulation_config(
        n_ref=n_ref,
        n_query=n_query,
        n_peaks=n_peaks,
        n_types=n_types,
        open_fraction=open_fraction,
        batch_peak_share=batch_peak_share,
        seed=seed,
        min_type_cells=min_type_cells,
        programme_share=programme_share,
        programme_boost=programme_boost,
    )
    simulate_pair(output, config=cfg, overwrite=overwrite)
    console.info(
        f"simulate: {n_ref} reference + {n_query} query cells × {n_peaks} peaks, "
        f"{n_types} types → {output}/reference.h5ad, {output}/query.h5ad"
    )


@command
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="A panel (.json), sentence store (.zarr) or model directory.")],
    quiet: Quiet = False,
) -> None:
    """Print an artifact's header (format, version, parameters, input hashes) as JSON on stdout."""
    header = artifacts.read_header(path)
    if header["header"]["format"] == artifacts.MODEL and path.is_dir():
        from hitanno_cli.checkpoint import read_adaptation

        adaptation = read_adaptation(path)  # a model self-trained on a query (train --adapt-to)
        if adaptation is not None:
            header["adaptation"] = adaptation
    typer.echo(json.dumps(header, indent=1))


@command
def split_cmd(
    data: Annotated[Path, typer.Argument(help="Labelled .h5ad to split into reference and query.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for reference.h5ad and query.h5ad.")],
    by: Annotated[
        str | None, typer.Option(help="obs column to split on (e.g. donor): one value becomes the query.")
    ] = None,
    query_value: Annotated[
        str | None, typer.Option(help="With --by: the value that becomes the query (default: the smallest group).")
    ] = None,
    query_fraction: Annotated[float, typer.Option(help="Without --by: share of cells in the query.")] = 0.3,
    label_key: Annotated[
        str | None, typer.Option("--label-key", "-l", help="Stratify the random split by this column.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random split.")] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Split a labelled .h5ad into a reference and a query, by a column (donor) or at random."""
    from hitanno_cli.splitting import split

    split(
        data,
        output=output,
        by=by,
        query_value=query_value,
        query_fraction=query_fraction,
        label_key=label_key,
        seed=seed,
        overwrite=overwrite,
    )
