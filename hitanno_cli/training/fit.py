"""The ``train`` stage: check the output, run the trainer (under torchrun too), write the
model directory, or, when interrupted, its resumable state."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from hitanno_cli import artifacts, checkpoint, console, outputs
from hitanno_cli.errors import UserError
from hitanno_cli.host import keep_freed_memory
from hitanno_cli.panel import Panel
from hitanno_cli.runtime import distributed, rank_device, resolve_device, stop_on_signals
from hitanno_cli.sentences import SentenceStore
from hitanno_cli.training.options import TrainOptions, recipe_options
from hitanno_cli.training.trainer import Trainer


class Interrupted(Exception):
    """Training stopped on a signal; resumable state was written."""

    def __init__(self, signum: int, directory: Path) -> None:
        super().__init__(f"interrupted by signal {signum}; resume with --resume ({directory})")
        self.signum = signum


def train(
    sentences: str | Path,
    *,
    panel: str | Path | None = None,
    output: str | Path | None = None,
    options: TrainOptions | None = None,
    device: str = "auto",
    gpu: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> Path:
    """Train a model on a labelled sentence store and write the model directory ``output``
    (default: beside the store, ``ref.zarr`` → ``ref.model``).

    ``panel`` is the store's own unless given (a given panel must be the store's).
    ``options`` default to the ``default`` recipe. ``on_batch(epoch, step)`` is called
    after every update (progress, or a test stopping the run). Raises :class:`Interrupted`
    after saving a resumable state when SIGINT or SIGTERM arrives.
    """
    out = outputs.default_output(sentences, ".model") if output is None else Path(output)
    options = recipe_options("default") if options is None else options
    options.check()
    chosen = resolve_device(device, gpu)
    keep_freed_memory()
    check_output(out, resume=resume, overwrite=overwrite, inputs=[sentences] + ([panel] if panel else []))
    store = SentenceStore(sentences)
    loaded_panel = store.panel() if panel is None else Panel.load(panel)
    store.check_panel(loaded_panel.content_hash)
    # under torchrun only rank 0 writes, so only it holds the output's lock
    lock = outputs.output_lock(out) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
    with lock, distributed(chosen) as world:
        chosen = rank_device(chosen, world)
        if not world.main:
            console.set_quiet(True)
        trainer = Trainer(store, loaded_panel, options, chosen, world)
        if resume:
            trainer.restore(*checkpoint.load_resume(out))
            console.info(f"train: resuming after epoch {trainer.progress.epoch}")
        console.info(
            f"train: {trainer.n_train} cells for training, {trainer.n_val} for validation, "
            f"{len(store.cell_types)} types, batch {trainer.batch_size}, device {chosen}"
            + (f", {world.size} processes" if world.size > 1 else "")
        )
        trainer.on_batch = on_batch
        with stop_on_signals() as received:
            finished = trainer.run(received)
        if world.main:
            write_run(out, trainer, sentences, finished)
        world.barrier()
        if not finished:
            raise Interrupted(received[0] if received else signal.SIGINT, out)
    return out


def is_model_or_interrupted_run(path: Path) -> bool:
    """Whether ``path`` is what ``train`` writes: a model directory, or an interrupted run's."""
    return artifacts.kind_of(path) == artifacts.MODEL or (path / checkpoint.RESUME / "state.json").is_file()


def check_output(out: Path, *, resume: bool, overwrite: bool, inputs: list[str | Path]) -> None:
    """Refuse to clobber a model, or to start over silently on an interrupted run."""
    if resume:
        outputs.check_output(out, kind=MODEL_DIRECTORY, overwrite=True, inputs=inputs)
        if not (out / checkpoint.RESUME).is_dir():
            raise UserError(f"{out} holds no interrupted run to resume", "run hitanno train without --resume")
        return
    if out.is_dir() and (out / checkpoint.RESUME).is_dir() and not overwrite:
        raise UserError(f"{out} holds an interrupted run", "pass --resume to continue it, or --overwrite to start over")
    outputs.check_output(out, kind=MODEL_DIRECTORY, overwrite=overwrite, inputs=inputs)


#: What ``train --overwrite`` may replace.
MODEL_DIRECTORY = (is_model_or_interrupted_run, "model directory")


def write_run(out: Path, trainer: Trainer, sentences: str | Path, finished: bool) -> None:
    """Write the model directory (finished) or its resumable state (interrupted)."""
    opts = trainer.options
    config = {
        "options": asdict(opts),
        "sentences": str(Path(sentences).resolve()),
        "sentences_hash": trainer.store.content_hash,
        "panel_hash": trainer.panel.content_hash,
        "world_size": trainer.world.size,
        "device": str(trainer.device),
    }
    with artifacts.atomic_dir(out, overwrite=True) as tmp:
        artifacts.write_json(tmp / checkpoint.TRAIN_CONFIG, config)
        lines = "".join(json.dumps(m) + "\n" for m in trainer.progress.history)
        if finished:
            artifacts.atomic_write_text(tmp / checkpoint.METRICS, lines)
            trainer.model.load_state_dict(trainer.best_state)
            p = trainer.progress
            params = {
                **asdict(opts),
                "n_train": trainer.n_train,
                "n_val": trainer.n_val,
                "epochs_run": p.epoch,
                "best_epoch": p.best_epoch,
                "stopped_early": p.stopped_early,
                "world_size": trainer.world.size,
            }
            inputs = {"sentences": trainer.store.content_hash, "panel": trainer.panel.content_hash}
            checkpoint.save_model(
                tmp,
                model=trainer.model,
                config=trainer.config,
                class_names=trainer.store.cell_types,
                panel=trainer.panel,
                params=params,
                inputs=inputs,
            )
            console.info(
                f"train: best epoch {p.best_epoch} of {p.epoch}"
                + (f" (val loss {p.best_loss:.4f})" if trainer.n_val else "")
                + f" → {out}"
            )
        else:
            tensors, state = trainer.interrupted_at
            kept = state["progress"]["history"]
            artifacts.atomic_write_text(tmp / checkpoint.METRICS, "".join(json.dumps(m) + "\n" for m in kept))
            trainer.panel.save(tmp / checkpoint.PANEL, overwrite=True)
            checkpoint.save_resume(tmp, tensors, state)
            console.warn(
                f"train: interrupted; state after epoch {state['progress']['epoch']} saved in "
                f"{out / checkpoint.RESUME}: continue with --resume"
            )
