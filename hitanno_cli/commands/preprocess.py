"""``select-peaks`` and ``encode``: from a count matrix to cell sentences."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hitanno_cli import artifacts, console, outputs
from hitanno_cli.commands.common import Overwrite, Quiet, command, split_list
from hitanno_cli.selection import N_CANDIDATES


@command
def select_peaks_cmd(
    reference: Annotated[Path, typer.Argument(help="Labelled reference .h5ad (cells × peaks, raw counts).")],
    label_key: Annotated[
        str | None,
        typer.Option(
            "--label-key", "-l", help="obs column of cell types. Default: the one named cell_type, celltype, label, …"
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Panel file to write. Default: REFERENCE.panel.json.")
    ] = None,
    peaks_per_type: Annotated[
        int | None,
        typer.Option(
            help="Peaks per cell type P. Default: int(sqrt(9 / n_types) * 2000), capped at n_peaks // n_types."
        ),
    ] = None,
    min_cells: Annotated[int, typer.Option(help="Refuse cell types with fewer cells than this.")] = 10,
    exclude_types: Annotated[
        str | None, typer.Option(help="Comma-separated cell types to leave out of the reference.")
    ] = None,
    n_candidates: Annotated[
        int, typer.Option(help="Best-ranked peaks per type considered first (published: 6300).")
    ] = N_CANDIDATES,
    layer: Annotated[str | None, typer.Option(help="Read counts from this layer instead of X.")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Choose each cell type's marker peaks (TF-IDF, Welch t-test, rare types first)."""
    from hitanno_cli.selection import select_peaks

    output = outputs.default_output(reference, ".panel.json") if output is None else output
    with outputs.writing(output, kind=artifacts.PANEL, overwrite=overwrite, inputs=[reference]):
        panel = select_peaks(
            reference,
            label_key=label_key,
            peaks_per_type=peaks_per_type,
            min_cells=min_cells,
            exclude_types=split_list(exclude_types),
            n_candidates=n_candidates,
            layer=layer,
        )
        panel.save(output, overwrite=True)
    console.info(f"select-peaks: {panel.n_types} types × {panel.peaks_per_type} peaks → {output}")


@command
def encode_cmd(
    data: Annotated[Path, typer.Argument(help=".h5ad to encode (reference or query, raw counts).")],
    panel: Annotated[Path, typer.Option("--panel", "-p", help="Panel from select-peaks.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Sentence store to write. Default: DATA.zarr.")
    ] = None,
    label_key: Annotated[
        str | None,
        typer.Option("--label-key", "-l", help="obs column with labels to keep. Default: the panel's, if present."),
    ] = None,
    min_coverage: Annotated[
        float, typer.Option(help="Refuse data holding less than this share of the panel's peaks.")
    ] = 0.5,
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/N: encode part I (0-based) of N; the last shard to finish assembles "
            "the store. For SLURM arrays: --shard $SLURM_ARRAY_TASK_ID/N."
        ),
    ] = None,
    layer: Annotated[str | None, typer.Option(help="Read counts from this layer instead of X.")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write every cell's sentence (open/closed state at each panel peak) to a zarr store."""
    from hitanno_cli.sentences import encode

    encode(
        data,
        panel=panel,
        output=output,
        label_key=label_key,
        min_coverage=min_coverage,
        shard=shard,
        layer=layer,
        overwrite=overwrite,
    )
