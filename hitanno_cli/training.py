"""Training HitAnno on a labelled sentence store (SPEC §1.5) by a named recipe.

``TrainOptions()`` is the published schedule (``--recipe published``): a stratified 25 %
validation split, Adam at lr 1e-4, linear warm-up over 3 epochs then linear decay to 0
at epoch 20, the weights with the best validation loss, early stopping after 3 epochs
without improvement (not before epoch 5), seed 42. ``--recipe default`` is what the
study of ``docs/recipe.md`` found to beat the baselines: a short fixed schedule (8 epochs)
on every reference cell (no validation split unless ``--val-fraction`` asks), AdamW,
faster per-peak tables, depth augmentation, label smoothing 0.3, per-cell class weights,
16-wide embeddings and the linear path. Mixed
precision (bf16) is used on GPUs that support it.

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

import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hitanno_cli import artifacts, checkpoint, console
from hitanno_cli.allocator import keep_freed_memory
from hitanno_cli.batches import BUFFER_CELLS, Batch, OpenRows, ShuffledCells, sequential_batches, split_for_rank
from hitanno_cli.errors import UserError
from hitanno_cli.model import HitAnno, ModelConfig
from hitanno_cli.panel import Panel
from hitanno_cli.sentences import SentenceStore


@dataclass
class TrainOptions:
    """Everything that determines a training run's result (compared on ``--resume``)."""

    epochs: int = 20
    warmup_epochs: float = 3.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"
    batch_size: int = 64
    min_steps_per_epoch: int = 0
    val_fraction: float = 0.25
    patience: int = 3
    min_epochs: int = 5
    seed: int = 42
    class_weight: str = "none"
    sampling: str = "uniform"
    label_smoothing: float = 0.0
    peak_dropout: float = 0.0
    embed_init: str = "random"
    embed_lr_scale: float = 1.0
    precision: str = "auto"
    buffer_cells: int = BUFFER_CELLS
    model: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse options that cannot work, before any work is done."""
        rules = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.min_steps_per_epoch >= 0, "--min-steps-per-epoch must be non-negative"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (self.lr > 0, "--lr must be positive"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be non-negative"),
            (self.class_weight in ("none", "balanced"), "--class-weight must be none or balanced"),
            (self.sampling in SAMPLING, f"--sampling must be one of {', '.join(SAMPLING)}"),
            (self.optimizer in ("adam", "adamw"), "--optimizer must be adam or adamw"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (0 <= self.peak_dropout < 1, "--peak-dropout must be in [0, 1)"),
            (self.embed_init in ("random", "lsi"), "--embed-init must be random or lsi"),
            (self.embed_lr_scale > 0, "--embed-lr-scale must be positive"),
            (self.precision in ("auto", "fp32", "bf16"), "--precision must be auto, fp32 or bf16"),
        ]
        for ok, message in rules:
            if not ok:
                raise UserError(message, "see hitanno train --help")


#: How training cells are drawn: each once per epoch (``uniform``), or with replacement at
#: a rate per class ∝ 1/size (``balanced``) or 1/√size (``sqrt``), for rare types.
SAMPLING = ("uniform", "balanced", "sqrt")

#: Named sets of option values. ``published`` is SPEC §1.5 (the TrainOptions defaults);
#: ``default`` is the recipe that won the study in ``docs/recipe.md``.
RECIPES: dict[str, dict[str, Any]] = {
    "published": {},
    "default": {"lr": 1e-3, "batch_size": 256, "min_steps_per_epoch": 16, "optimizer": "adamw",
                "weight_decay": 0.05, "epochs": 8, "warmup_epochs": 2.0, "val_fraction": 0.0,
                "peak_dropout": 0.5, "label_smoothing": 0.3, "class_weight": "balanced",
                "embed_lr_scale": 30.0, "model": {"embed_dim": 16, "linear_path": True}},
}


def recipe_options(name: str = "default", **overrides: Any) -> TrainOptions:
    """The TrainOptions of a named recipe, with explicit values taking precedence."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}'", f"choose one of {', '.join(RECIPES)}")
    values = {**RECIPES[name], **overrides}  # a recipe's model sizes are merged below
    model = {**RECIPES[name].get("model", {}), **overrides.get("model", {})}
    return TrainOptions(**{**values, "model": model})


class Interrupted(Exception):
    """Training stopped on a signal; resumable state was written."""

    def __init__(self, signum: int, directory: Path) -> None:
        super().__init__(f"interrupted by signal {signum}; resume with --resume ({directory})")
        self.signum = signum


# -- devices and processes -----------------------------------------------------------------
def resolve_device(device: str = "auto", gpu: int | None = None) -> torch.device:
    """``auto`` → the first GPU if any else CPU; ``cuda:N`` / ``--gpu N`` must exist."""
    if gpu is not None:
        device = f"cuda:{gpu}"
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}'", "use auto, cpu or cuda:N") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} was asked for but this machine has no CUDA GPU",
                            "use --device cpu (or auto)")
        index = chosen.index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"GPU {index} does not exist (this machine has {torch.cuda.device_count()})",
                            f"use --gpu 0..{torch.cuda.device_count() - 1}")
    elif chosen.type != "cpu":
        raise UserError(f"device '{device}' is not supported", "use auto, cpu or cuda:N")
    return chosen


@dataclass
class World:
    """This process's place among the training processes (1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum numbers over ranks (identity for one process)."""
        if self.size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()


@contextmanager
def distributed(device: torch.device) -> Iterator[World]:
    """Join the process group that torchrun set up (``WORLD_SIZE`` > 1), else do nothing."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield World()
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    try:
        yield World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device, world: World) -> torch.device:
    """Under torchrun each rank drives the GPU of its local rank."""
    if device.type == "cuda" and world.size > 1:
        return torch.device(f"cuda:{world.local_rank}")
    return device


@contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM in the yielded list instead of dying mid-step."""
    received: list[int] = []
    handled = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in handled}
    except ValueError:  # not the main thread: leave signals alone
        yield received
        return
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- data --------------------------------------------------------------------------------------
def training_labels(store: SentenceStore) -> tuple[np.ndarray, np.ndarray]:
    """Rows of labelled cells and their class indices (panel order); refuse unknown labels."""
    labels = store.labels()
    if labels is None:
        raise UserError(f"{store.path} was encoded without labels", "re-encode the reference with --label-key")
    index = {name: i for i, name in enumerate(store.cell_types)}
    known = labels != ""
    unknown = sorted({str(v) for v in labels[known] if v not in index})
    if unknown:
        raise UserError(f"{store.path} has labels that are not cell types of its panel: {', '.join(unknown[:5])}",
                        "encode the reference the panel was selected from, with the same --label-key")
    rows = np.flatnonzero(known)
    if len(rows) < 2:
        raise UserError(f"{store.path} has fewer than 2 labelled cells", "train on a labelled reference")
    return rows, np.array([index[v] for v in labels[rows]], dtype=np.int64)


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): ``fraction`` of each class held out, at least one
    cell of each class with two or more cells."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == c))
        n_val = int(round(len(members) * fraction))
        if fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def effective_batch_size(batch_size: int, min_steps: int, n_cells: int) -> int:
    """``batch_size``, shrunk so that ``n_cells`` make at least ``min_steps`` updates per epoch
    (a few hundred reference cells at batch 256 would make 2; 0 turns this off)."""
    if min_steps <= 0:
        return batch_size
    return max(1, min(batch_size, n_cells // min_steps))


def sampling_rates(targets: np.ndarray, n_types: int, mode: str) -> np.ndarray | None:
    """Relative draw rate per class for ``--sampling`` (None: each cell once per epoch)."""
    if mode == "uniform":
        return None
    counts = np.maximum(np.bincount(targets, minlength=n_types), 1).astype(np.float64)
    return 1.0 / (counts if mode == "balanced" else np.sqrt(counts))


def class_weights(targets: np.ndarray, n_types: int, mode: str) -> torch.Tensor | None:
    """``balanced``: ``n / (k · count_c)`` over classes present (absent classes weigh 0)."""
    if mode == "none":
        return None
    counts = np.bincount(targets, minlength=n_types).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_types)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
                           smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (with label smoothing) where each *cell* weighs its class's weight.

    Not ``F.cross_entropy(weight=…)``: with label smoothing that also weighs the smoothing
    mass of every *other* class by its weight, which pushes all cells toward the rare types
    (measured: −0.13 accuracy cross-donor). ``mean`` divides by the weights' sum."""
    per_cell = F.cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing)
    if weights is None:
        return per_cell.mean() if reduction == "mean" else per_cell.sum()
    w = weights[targets]
    total = (per_cell * w).sum()
    return total / w.sum().clamp(min=1e-12) if reduction == "mean" else total


def parameter_groups(model: HitAnno, lr: float, embed_scale: float) -> list[dict[str, Any]]:
    """Optimiser groups: the per-peak tables (token embeddings, linear path) learn at
    ``lr · embed_scale``, since each of their rows sees only the cells where it matters."""
    tables = list(model.embed.parameters()) + (list(model.linear.parameters()) if model.linear is not None else [])
    ids = {id(t) for t in tables}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest, "lr": lr}, {"params": tables, "lr": lr * embed_scale}]


def drop_open_peaks(cells: OpenRows, max_rate: float, rng: np.random.Generator) -> OpenRows:
    """Depth augmentation: each cell loses a random share ``U(0, max_rate)`` of its open peaks."""
    lengths = np.diff(cells.indptr)
    rate = np.repeat(rng.uniform(0.0, max_rate, size=cells.n), lengths)
    keep = rng.random(len(cells.positions)) >= rate
    indptr = np.zeros_like(cells.indptr)
    np.cumsum(np.bincount(np.repeat(np.arange(cells.n), lengths)[keep], minlength=cells.n), out=indptr[1:])
    return OpenRows(indptr, cells.positions[keep])


def reference_tfidf(store: SentenceStore, rows: np.ndarray) -> tuple[Any, np.ndarray]:
    """The SPEC §1.2 TF-IDF of the cells ``rows`` over the panel positions (sparse CSR), and
    the idf of every position (``n_cells / n_open``; 0 where no cell is open)."""
    from scipy import sparse

    cells = OpenRows.concat([batch.open for batch in sequential_batches(store, rows, 4096)])
    n_positions = len(store.cell_types) * store.peaks_per_type
    tfidf = sparse.csr_matrix((np.ones(len(cells.positions)), cells.positions, cells.indptr),
                              shape=(cells.n, n_positions))
    depth = np.maximum(np.diff(cells.indptr), 1)
    opened = np.bincount(cells.positions, minlength=n_positions)
    idf = np.where(opened > 0, cells.n / np.maximum(opened, 1), 0.0)
    tfidf.data = np.log1p(1e4 * tfidf.data / np.repeat(depth, np.diff(cells.indptr)) * idf[tfidf.indices])
    return tfidf, idf


def lsi_peak_embeddings(tfidf: Any, dim: int, seed: int) -> torch.Tensor:
    """Peak identity embeddings from an LSI of the training cells' TF-IDF: each panel
    position's loadings on the top ``dim`` components, scaled by their singular values and
    overall to the random initialisation's size (std 0.02)."""
    from sklearn.utils.extmath import randomized_svd

    k = min(dim, min(tfidf.shape) - 1)
    _, singular, components = randomized_svd(tfidf, k, random_state=seed)
    loadings = np.zeros((tfidf.shape[1], dim))
    loadings[:, :k] = (components.T * singular)
    loadings *= 0.02 / max(float(np.sqrt((loadings ** 2).mean())), 1e-12)
    return torch.tensor(loadings, dtype=torch.float32)


def to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's CSR as tensors on ``device``."""
    return (torch.from_numpy(batch.open.indptr).to(device), torch.from_numpy(batch.open.positions).to(device))


# -- the schedule --------------------------------------------------------------------------------
def lr_factor(step: int, steps_per_epoch: int, warmup_epochs: float, epochs: int) -> float:
    """Linear warm-up to 1 over ``warmup_epochs``, then linear decay to 0 at ``epochs``."""
    warm = warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if total <= warm:
        return 1.0
    return max(0.0, (total - step) / (total - warm))


def autocast(device: torch.device, precision: str):  # noqa: ANN201 (a context manager)
    """bf16 autocast on GPUs that support it (``auto``) or when asked; else full precision."""
    if precision == "fp32":
        return nullcontext()
    if precision == "auto":
        if device.type != "cuda" or not torch.cuda.is_bf16_supported():
            return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# -- the run -----------------------------------------------------------------------------------
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

    def __init__(self, store: SentenceStore, panel: Panel, options: TrainOptions, device: torch.device,
                 world: World) -> None:
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
        self.train = ShuffledCells(store, mine, np.array([target_of[r] for r in mine], np.int64),
                                   self.batch_size, options.buffer_cells,
                                   class_rates=sampling_rates(targets[train_idx], n_types, options.sampling))
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
        self.optimizer = optimizer(parameter_groups(self.model, options.lr, options.embed_lr_scale),
                                   lr=options.lr, weight_decay=options.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, self.steps_per_epoch, options.warmup_epochs, options.epochs))
        self.progress = RunState()
        self.on_batch: Callable[[int, int], None] | None = None  # a hook for tests
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
            self.model.embed.identity.weight.copy_(lsi_peak_embeddings(tfidf, self.config.embed_dim,
                                                                       self.options.seed))
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
            raise UserError("the interrupted run used other training options or another sentence store",
                            "resume with the same --sentences and options (or start over with --overwrite)")
        if state.get("world_size") != self.world.size:
            raise UserError(f"the interrupted run used {state.get('world_size')} processes, not {self.world.size}",
                            "resume with the same number of processes")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        checkpoint.restore_optimizer(self.optimizer, tensors, state["optimizer"])
        scheduler = dict(state["scheduler"], lr_lambdas=[None] * len(self.optimizer.param_groups))
        self.scheduler.load_state_dict(scheduler)
        self.progress = RunState(**state["progress"])
        torch.set_rng_state(checkpoint.decode_bytes(state["rng"]["torch"]))

    # -- epochs -------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
             smoothing: float = 0.0) -> torch.Tensor:
        return weighted_cross_entropy(logits.float(), targets, self.weights, smoothing, reduction)

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
            indptr, positions = to_device(batch, self.device)
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
            indptr, positions = to_device(batch, self.device)
            with autocast(self.device, self.options.precision):
                logits = self.model(indptr, positions).logits.float()
            sums[0] += float(self.loss(logits, targets, reduction="sum"))
            w = self.weights[targets] if self.weights is not None else torch.ones_like(targets, dtype=torch.float)
            sums[1] += float(w.sum())
            hit = (logits.argmax(1) == targets).cpu().numpy()
            t = targets.cpu().numpy()
            sums[2:2 + n_types] += np.bincount(t, weights=hit, minlength=n_types)
            sums[2 + n_types:] += np.bincount(t, minlength=n_types)
        sums = np.array(self.world.all_sum(sums.tolist(), self.device))
        correct, counts = sums[2:2 + n_types], sums[2 + n_types:]
        present = counts > 0
        return {
            "val_loss": sums[0] / max(sums[1], 1e-12),
            "val_accuracy": correct.sum() / counts.sum(),
            "val_balanced_accuracy": float((correct[present] / counts[present]).mean()),
        }

    def end_epoch(self, epoch: int, train_loss: float, seconds: float) -> dict[str, Any]:
        """Record an epoch, track the best weights, decide on early stopping."""
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, **self.validate(),
                   "lr": self.scheduler.get_last_lr()[0], "seconds": round(seconds, 3)}
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
def train(sentences: str | Path, panel_path: str | Path, out: str | Path, options: TrainOptions,
          device: str = "auto", gpu: int | None = None, resume: bool = False, overwrite: bool = False,
          on_batch: Callable[[int, int], None] | None = None) -> Path:
    """Train a model on a labelled sentence store and write ``out/``; return ``out``."""
    out = Path(out)
    options.check()
    chosen = resolve_device(device, gpu)
    keep_freed_memory()
    check_output(out, resume, overwrite)
    store = SentenceStore(sentences)
    panel = Panel.load(panel_path)
    store.check_panel(panel.content_hash)
    with distributed(chosen) as world:
        chosen = rank_device(chosen, world)
        if not world.main:
            console.set_quiet(True)
        trainer = Trainer(store, panel, options, chosen, world)
        if resume:
            trainer.restore(*checkpoint.load_resume(out))
            console.info(f"train: resuming after epoch {trainer.progress.epoch}")
        console.info(f"train: {trainer.n_train} cells for training, {trainer.n_val} for validation, "
                     f"{len(store.cell_types)} types, batch {trainer.batch_size}, device {chosen}"
                     + (f", {world.size} processes" if world.size > 1 else ""))
        trainer.on_batch = on_batch
        with stop_on_signals() as received:
            finished = trainer.run(received)
        if world.main:
            write_run(out, trainer, sentences, finished)
        if world.size > 1:
            dist.barrier()
        if not finished:
            raise Interrupted(received[0] if received else signal.SIGINT, out)
    return out


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a model, or to start over silently on an interrupted run."""
    if resume:
        if not (out / checkpoint.RESUME).is_dir():
            raise UserError(f"{out} holds no interrupted run to resume", "run hitanno train without --resume")
        return
    if out.exists() and not overwrite:
        if (out / checkpoint.RESUME).is_dir():
            raise UserError(f"{out} holds an interrupted run",
                            "pass --resume to continue it, or --overwrite to start over")
        artifacts.refuse_existing(out, overwrite)


def write_run(out: Path, trainer: Trainer, sentences: str | Path, finished: bool) -> None:
    """Write the model directory (finished) or its resumable state (interrupted)."""
    opts = trainer.options
    config = {"options": asdict(opts), "sentences": str(Path(sentences).resolve()),
              "sentences_hash": trainer.store.content_hash, "panel_hash": trainer.panel.content_hash,
              "world_size": trainer.world.size, "device": str(trainer.device)}
    with artifacts.atomic_dir(out, overwrite=True) as tmp:
        artifacts.write_json(tmp / checkpoint.TRAIN_CONFIG, config)
        lines = "".join(json.dumps(m) + "\n" for m in trainer.progress.history)
        if finished:
            artifacts.atomic_write_text(tmp / checkpoint.METRICS, lines)
            trainer.model.load_state_dict(trainer.best_state)
            p = trainer.progress
            params = {**asdict(opts), "n_train": trainer.n_train, "n_val": trainer.n_val,
                      "epochs_run": p.epoch, "best_epoch": p.best_epoch, "stopped_early": p.stopped_early,
                      "world_size": trainer.world.size}
            inputs = {"sentences": trainer.store.content_hash, "panel": trainer.panel.content_hash}
            checkpoint.save_model(tmp, trainer.model, trainer.config, trainer.store.cell_types,
                                  trainer.panel, params, inputs)
            console.info(f"train: best epoch {p.best_epoch} of {p.epoch}"
                         + (f" (val loss {p.best_loss:.4f})" if trainer.n_val else "") + f" → {out}")
        else:
            tensors, state = trainer.interrupted_at
            kept = state["progress"]["history"]
            artifacts.atomic_write_text(tmp / checkpoint.METRICS, "".join(json.dumps(m) + "\n" for m in kept))
            trainer.panel.save(tmp / checkpoint.PANEL, overwrite=True)
            checkpoint.save_resume(tmp, tensors, state)
            console.warn(f"train: interrupted; state after epoch {state['progress']['epoch']} saved in "
                         f"{out / checkpoint.RESUME}: continue with --resume")
