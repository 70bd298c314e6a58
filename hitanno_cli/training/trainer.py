"""One training run: data, model, optimiser, schedule, epochs, and their saved state.

**Interruption.** SIGINT/SIGTERM abort the current epoch; the state at the last
completed epoch boundary (weights, optimiser, scheduler, RNG, best weights, early-stop
counters, metrics) is written to ``model/resume/`` and the process exits. Data order
and dropout are seeded from ``(seed, epoch, rank)``, so ``--resume`` reproduces an
uninterrupted run exactly.

**Several processes.** Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU); each rank reads its own contiguous
slice of the training and validation cells, and only rank 0 writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from hitanno_cli import checkpoint, console
from hitanno_cli.batches import Batch, ShuffledCells, sequential_batches, split_for_rank
from hitanno_cli.errors import UserError
from hitanno_cli.model import HitAnno, ModelConfig
from hitanno_cli.panel import Panel
from hitanno_cli.runtime import World, autocast, to_device
from hitanno_cli.sentences import SentenceStore
from hitanno_cli.training.data import (
    class_weights,
    drop_open_peaks,
    effective_batch_size,
    lsi_peak_embeddings,
    reference_tfidf,
    sampling_rates,
    stratified_split,
    training_labels,
)
from hitanno_cli.training.objective import lr_factor, parameter_groups, weighted_cross_entropy
from hitanno_cli.training.options import TrainOptions

#: Devices where Adam(W) runs fused: one kernel over all of a group's tensors, where the
#: default on the CPU is a loop of several element-wise passes per tensor. Same update,
#: different rounding; the per-peak tables (millions of entries at 100 types) make the
#: loop a sizeable share of a training step.
FUSED_OPTIMIZER_DEVICES = frozenset({"cpu", "cuda"})


@dataclass
class RunState:
    """Where a run is: what ``resume/state.json`` holds besides tensors."""

    epoch: int = 0  # completed epochs
    step: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


class Trainer:
    """One training run: data, model, optimiser, schedule, and their saved state."""

    def __init__(
        self, store: SentenceStore, panel: Panel, options: TrainOptions, device: torch.device, world: World
    ) -> None:
        self.store, self.panel, self.options, self.device, self.world = store, panel, options, device, world
        rows, targets = training_labels(store)
        train_idx, val_idx = stratified_split(targets, options.val_fraction, options.seed)
        self.n_train, self.n_val = len(train_idx), len(val_idx)
        n_types = len(store.cell_types)
        self.weights = class_weights(targets[train_idx], n_types, options.class_weight)
        if self.weights is not None:
            self.weights = self.weights.to(device)
        mine = split_for_rank(rows[train_idx], world.rank, world.size)
        target_of = dict(zip(rows.tolist(), targets.tolist()))
        per_rank = [len(split_for_rank(rows[train_idx], r, world.size)) for r in range(world.size)]
        self.batch_size = effective_batch_size(options.batch_size, options.min_steps_per_epoch, min(per_rank))
        self.train = ShuffledCells(
            store,
            mine,
            np.array([target_of[r] for r in mine], np.int64),
            batch_size=self.batch_size,
            buffer_cells=options.buffer_cells,
            class_rates=sampling_rates(targets[train_idx], n_types, options.sampling),
        )
        self.val_rows = split_for_rank(rows[val_idx], world.rank, world.size)
        self.target_of = target_of
        self.steps_per_epoch = min(-(-n // self.batch_size) for n in per_rank)
        if self.steps_per_epoch == 0:
            raise UserError("some training process has no cells", "use fewer processes or more cells")
        torch.manual_seed(options.seed)
        self.config = ModelConfig(n_types=n_types, peaks_per_type=store.peaks_per_type, **options.model)
        self.model = HitAnno(self.config)
        self.init_from_reference(store, rows[train_idx])
        self.model.to(device)
        self.net: torch.nn.Module = self.model
        if world.size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        optimizer = torch.optim.AdamW if options.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer(
            parameter_groups(self.model, options.lr, options.embed_lr_scale),
            lr=options.lr,
            weight_decay=options.weight_decay,
            fused=device.type in FUSED_OPTIMIZER_DEVICES,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.steps_per_epoch, options.warmup_epochs, options.epochs)
        )
        self.progress = RunState()
        self.on_batch: Callable[[int, int], None] | None = None  # called after every update
        self.best_state = checkpoint.plain_state(self.model)

    @torch.no_grad()
    def init_from_reference(self, store: SentenceStore, rows: np.ndarray) -> None:
        """What the training cells set before any update: the LSI start of the peak
        embeddings and the linear path's idf (each when its option asks)."""
        wants_idf = self.model.linear is not None and self.config.linear_idf
        if self.options.embed_init != "lsi" and not wants_idf:
            return
        tfidf, idf = reference_tfidf(store, rows)
        if self.options.embed_init == "lsi":
            self.model.embed.identity.weight.copy_(lsi_peak_embeddings(tfidf, self.config.embed_dim, self.options.seed))
        if wants_idf:
            self.model.linear.idf.copy_(torch.from_numpy(idf))

    # -- saved state --------------------------------------------------------------------------
    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON that let a run continue exactly from this epoch boundary."""
        tensors = {f"model.{k}": v for k, v in checkpoint.plain_state(self.model).items()}
        tensors.update({f"best.{k}": v for k, v in self.best_state.items()})
        optim_tensors, optim_info = checkpoint.optimizer_tensors(self.optimizer)
        tensors.update(optim_tensors)
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        state = {
            "progress": asdict(self.progress),
            "optimizer": optim_info,
            "scheduler": scheduler,
            "rng": {"torch": checkpoint.encode_bytes(torch.get_rng_state())},
            "options": asdict(self.options),
            "world_size": self.world.size,
            "sentences": self.store.content_hash,
        }
        return tensors, state

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Continue from a snapshot; refuse one made with other options or data."""
        if state.get("options") != asdict(self.options) or state.get("sentences") != self.store.content_hash:
            raise UserError(
                "the interrupted run used other training options or another sentence store",
                "resume with the same --sentences and options (or start over with --overwrite)",
            )
        if state.get("world_size") != self.world.size:
            raise UserError(
                f"the interrupted run used {state.get('world_size')} processes, not {self.world.size}",
                "resume with the same number of processes",
            )
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        checkpoint.restore_optimizer(self.optimizer, tensors, state["optimizer"])
        scheduler = dict(state["scheduler"], lr_lambdas=[None] * len(self.optimizer.param_groups))
        self.scheduler.load_state_dict(scheduler)
        self.progress = RunState(**state["progress"])
        torch.set_rng_state(checkpoint.decode_bytes(state["rng"]["torch"]))

    # -- epochs -------------------------------------------------------------------------------
    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", smoothing: float = 0.0
    ) -> torch.Tensor:
        return weighted_cross_entropy(logits.float(), targets, self.weights, smoothing=smoothing, reduction=reduction)

    def train_epoch(self, epoch: int, received: list[int], bar: Any) -> float | None:
        """One epoch of updates; None if a signal arrived (the epoch is abandoned)."""
        opts = self.options
        torch.manual_seed(opts.seed * 1_000_003 + epoch * 1_009 + self.world.rank)
        self.net.train()
        total, count = 0.0, 0
        augment = np.random.default_rng([opts.seed, epoch, self.world.rank, 1])
        for batch in self.train.epoch(opts.seed, epoch, self.world.rank, limit=self.steps_per_epoch):
            if opts.peak_dropout > 0:
                batch = Batch(drop_open_peaks(batch.open, opts.peak_dropout, augment), batch.rows, batch.targets)
            indptr, positions = to_device(batch.open, self.device)
            targets = torch.from_numpy(batch.targets).to(self.device)
            with autocast(self.device, opts.precision):
                out = self.net(indptr, positions)
            loss = self.loss(out.logits, targets, smoothing=opts.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.progress.step += 1
            total += float(loss.detach()) * len(targets)
            count += len(targets)
            bar.advance(1)
            bar.update(description=f"epoch {epoch + 1}/{opts.epochs} loss {total / count:.4f}")
            if self.on_batch is not None:
                self.on_batch(epoch, self.progress.step)
            if self.stop_requested(received):
                return None
        total, count = self.world.all_sum([total, count], self.device)
        return total / max(count, 1)

    def stop_requested(self, received: list[int]) -> bool:
        """Whether any rank received a signal (all ranks agree, so none waits forever)."""
        flags = self.world.all_sum([1.0 if received else 0.0], self.device)
        return flags[0] > 0

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss (weighted as in training), accuracy and balanced accuracy."""
        if self.n_val == 0:
            return {}
        self.net.eval()
        n_types = self.config.n_types
        sums = np.zeros(2 + 2 * n_types)  # loss, weight, correct per class, count per class
        for batch in sequential_batches(self.store, self.val_rows, self.batch_size * 4):
            targets = torch.tensor([self.target_of[int(r)] for r in batch.rows], device=self.device)
            indptr, positions = to_device(batch.open, self.device)
            with autocast(self.device, self.options.precision):
                logits = self.model(indptr, positions).logits.float()
            sums[0] += float(self.loss(logits, targets, reduction="sum"))
            w = self.weights[targets] if self.weights is not None else torch.ones_like(targets, dtype=torch.float)
            sums[1] += float(w.sum())
            hit = (logits.argmax(1) == targets).cpu().numpy()
            t = targets.cpu().numpy()
            sums[2 : 2 + n_types] += np.bincount(t, weights=hit, minlength=n_types)
            sums[2 + n_types :] += np.bincount(t, minlength=n_types)
        sums = np.array(self.world.all_sum(sums.tolist(), self.device))
        correct, counts = sums[2 : 2 + n_types], sums[2 + n_types :]
        present = counts > 0
        return {
            "val_loss": sums[0] / max(sums[1], 1e-12),
            "val_accuracy": correct.sum() / counts.sum(),
            "val_balanced_accuracy": float((correct[present] / counts[present]).mean()),
        }

    def end_epoch(self, epoch: int, train_loss: float, seconds: float) -> dict[str, Any]:
        """Record an epoch, track the best weights, decide on early stopping."""
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            **self.validate(),
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": round(seconds, 3),
        }
        p = self.progress
        val_loss = metrics.get("val_loss", -epoch)  # without validation: the last epoch is best
        if val_loss < p.best_loss:
            p.best_loss, p.best_epoch, p.bad_epochs = val_loss, epoch + 1, 0
            self.best_state = checkpoint.plain_state(self.model)
        else:
            p.bad_epochs += 1
        metrics["best"] = p.best_epoch == epoch + 1
        p.history.append(metrics)
        p.epoch = epoch + 1
        if p.bad_epochs >= self.options.patience and p.epoch >= self.options.min_epochs:
            p.stopped_early = True
        return metrics

    def run(self, received: list[int]) -> bool:
        """Train until done or stopped early; False if a signal interrupted it."""
        opts = self.options
        while self.progress.epoch < opts.epochs and not self.progress.stopped_early:
            epoch = self.progress.epoch
            boundary = self.snapshot()
            started = time.perf_counter()
            with console.progress(f"epoch {epoch + 1}/{opts.epochs}", self.steps_per_epoch, "batches") as bar:
                train_loss = self.train_epoch(epoch, received, bar)
                if train_loss is None:
                    self.interrupted_at = boundary
                    return False
                metrics = self.end_epoch(epoch, train_loss, time.perf_counter() - started)
                bar.update(description=describe(metrics, opts.epochs))
        return True


def describe(metrics: dict[str, Any], epochs: int) -> str:
    """The progress-bar line of a finished epoch."""
    text = f"epoch {metrics['epoch']}/{epochs} loss {metrics['train_loss']:.4f}"
    if "val_loss" in metrics:
        text += f" val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.3f}"
    return text + (" *" if metrics["best"] else "")


# -- entry point ---------------------------------------------------------------------------------
