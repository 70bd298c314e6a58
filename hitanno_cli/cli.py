"""The ``hitanno`` command line: a Typer app with one subcommand per stage."""

from __future__ import annotations

from typing import Annotated

import typer

from hitanno_cli import __version__
from hitanno_cli.commands import annotate, cluster, data, evaluate, preprocess, run

app = typer.Typer(
    name="hitanno",
    help="Annotate cell types in scATAC-seq with a hierarchical transformer (HitAnno), "
    "and cluster unlabelled cells with an attention autoencoder.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hitanno {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Annotate cell types in scATAC-seq (HitAnno) and cluster unlabelled cells."""


app.command("select-peaks")(preprocess.select_peaks_cmd)
app.command("encode")(preprocess.encode_cmd)
app.command("simulate")(data.simulate_cmd)
app.command("inspect")(data.inspect_cmd)
app.command("split")(data.split_cmd)
app.command("train")(annotate.train_cmd)
app.command("predict")(annotate.predict_cmd)
app.command("explain")(annotate.explain_cmd)
app.command("evaluate")(evaluate.evaluate_cmd)
app.command("run")(run.run_cmd)
app.command("cluster")(cluster.cluster_cmd)
