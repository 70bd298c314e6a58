"""What training is told and what it did: :class:`TrainConfig` and :class:`History`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Both training phases: the published defaults of AttentionAE-sc, but for
    pre-training in mini-batches (``pretrain_batch_size``) for fewer epochs."""

    pretrain_epochs: int = 50
    cluster_epochs: int = 100
    lr: float = 1e-3
    pretrain_batch_size: int = 256  # cells per pre-training step
    batch_size: int = 4096  # cells per self-training step, and the attention keys
    graph_weight: float = 0.1  # pre-training: ZINB + 0.1 × graph
    cluster_recon_weight: float = 0.1  # clustering: KL + 0.1 × ZINB + 0.01 × graph
    cluster_graph_weight: float = 0.01
    grad_clip: float = 3.0
    lr_step: int = 40  # pre-training lr halves every 40 epochs
    lr_gamma: float = 0.5
    tol: float = 1e-3  # stop clustering when < 0.1 % of labels change ...
    min_cluster_epochs: int = 20  # ... after epoch 20
    resolution: float | str = "auto"  # a Leiden resolution, or "auto" (:mod:`.partition`)
    non_edges_per_cell: int = 64
    exhaustive_pairs: int = 1 << 22
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class History:
    """What training did, for ``metrics.json``."""

    pretrain_loss: list[float] = field(default_factory=list)
    pretrain_recon: list[float] = field(default_factory=list)
    pretrain_graph: list[float] = field(default_factory=list)
    cluster_loss: list[float] = field(default_factory=list)
    cluster_delta: list[float] = field(default_factory=list)
    n_init_clusters: int = 0
    init: dict[str, Any] = field(default_factory=dict)
    stopped_epoch: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        def last(values: list[float]) -> float | None:
            return round(values[-1], 5) if values else None

        return {
            "pretrain_epochs_run": len(self.pretrain_loss),
            "pretrain_final_loss": last(self.pretrain_loss),
            "pretrain_final_recon": last(self.pretrain_recon),
            "pretrain_final_graph": last(self.pretrain_graph),
            "cluster_epochs_run": len(self.cluster_loss),
            "cluster_final_loss": last(self.cluster_loss),
            "cluster_stopped_by_tolerance_at_epoch": self.stopped_epoch,
            "n_leiden_init_clusters": self.n_init_clusters,
            "initial_partition": self.init,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }
