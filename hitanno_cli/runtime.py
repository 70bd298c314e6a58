"""Where and how torch work runs: the device, mixed precision, the DDP world and signals.

Every stage that runs a model (training, prediction, explanation, clustering) takes its
device and precision from here, so they all read ``--device`` and ``--gpu`` alike.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from hitanno_cli.errors import UserError

if TYPE_CHECKING:
    from hitanno_cli.sentences import OpenRows

#: Values of ``--precision``.
PRECISIONS = ("auto", "fp32", "bf16")


# -- the device --------------------------------------------------------------------------
def resolve_device(device: str = "auto", gpu: int | None = None) -> torch.device:
    """``auto`` → the first GPU if any, else the CPU; ``cuda[:N]`` / ``--gpu N`` must exist."""
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
            raise UserError(
                f"device {device} was asked for but this machine has no CUDA GPU",
                "use --device cpu (or auto)",
            )
        index = chosen.index or 0
        if index >= torch.cuda.device_count():
            raise UserError(
                f"GPU {index} does not exist (this machine has {torch.cuda.device_count()})",
                f"use --gpu 0..{torch.cuda.device_count() - 1}",
            )
    elif chosen.type != "cpu":
        raise UserError(f"device '{device}' is not supported", "use auto, cpu or cuda:N")
    return chosen


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager[object]:
    """bf16 autocast on GPUs that support it (``auto``) or when asked (``bf16``); else none."""
    if precision == "fp32":
        return nullcontext()
    if precision == "auto" and (device.type != "cuda" or not torch.cuda.is_bf16_supported()):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(cells: OpenRows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells' open positions as the model's input: CSR ``(indptr, positions)`` tensors on ``device``."""
    return torch.from_numpy(cells.indptr).to(device), torch.from_numpy(cells.positions).to(device)


# -- several processes -------------------------------------------------------------------
@dataclass
class World:
    """This process's place among the training processes (one without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum numbers over ranks (the identity for one process)."""
        if self.size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.size > 1:
            dist.barrier()


def world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def distributed(device: torch.device) -> Iterator[World]:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), else do nothing.

    nccl on GPUs, gloo on CPUs.
    """
    if world_size() <= 1:
        yield World()
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device, world: World) -> torch.device:
    """Under torchrun each rank drives the GPU of its local rank."""
    if device.type == "cuda" and world.size > 1:
        return torch.device(f"cuda:{world.local_rank}")
    return device


# -- signals -----------------------------------------------------------------------------
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
