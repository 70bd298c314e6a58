"""Model checkpoints and resumable training state, as safetensors and JSON only.

A trained model is a directory::

    model/model.safetensors   weights; metadata: header, model config, class names,
                              panel hash, training parameters (all JSON strings)
    model/panel.json          a copy of the panel, verified against that hash on load
    model/metrics.jsonl       one line per epoch
    model/train_config.json   the training options, for people and for --resume
    model/adaptation.json     only for a model self-trained on a query (train --adapt-to)
    model/resume/             only for an interrupted run: its resumable state

Nothing here unpickles: a model file from someone else cannot run code.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from hitanno_cli import artifacts
from hitanno_cli.errors import UserError
from hitanno_cli.model import HitAnno, ModelConfig
from hitanno_cli.panel import Panel

WEIGHTS = "model.safetensors"
PANEL = "panel.json"
METRICS = "metrics.jsonl"
TRAIN_CONFIG = "train_config.json"
RESUME = "resume"
#: Written by a self-trained model (train --adapt-to): the query it adapted to.
ADAPTATION = "adaptation.json"


@dataclass
class LoadedModel:
    """A model ready to predict, with everything its checkpoint says about itself."""

    model: HitAnno
    config: ModelConfig
    class_names: list[str]
    panel: Panel
    header: dict[str, Any]
    content_hash: str  # of model.safetensors, recorded in what is made with it


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights as independent CPU tensors, without a DistributedDataParallel prefix."""
    inner = getattr(model, "module", model)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in inner.state_dict().items()}


def save_model(
    directory: Path,
    *,
    model: torch.nn.Module,
    config: ModelConfig,
    class_names: list[str],
    panel: Panel,
    params: dict[str, Any],
    inputs: dict[str, str],
) -> None:
    """Write ``model.safetensors`` (weights + metadata) and ``panel.json`` into ``directory``."""
    header = artifacts.make_header(artifacts.MODEL, params, inputs)
    metadata = {
        "header": json.dumps(header),
        "config": json.dumps(config.to_dict()),
        "class_names": json.dumps(class_names),
        "panel_hash": panel.content_hash,
    }
    tensors = plain_state(model)
    metadata["content_hash"] = content_hash(tensors, metadata)
    save_file(tensors, str(directory / WEIGHTS), metadata=metadata)
    artifacts.ordinary_mode(directory / WEIGHTS, directory=False)  # safetensors writes it owner-only
    panel.save(directory / PANEL, overwrite=True)


def content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The hash of a safetensors file's content: every tensor (name, dtype, shape, bytes) and
    every metadata entry but the hash itself. Stored in the metadata as ``content_hash``."""
    digest = hashlib.sha256(
        artifacts.canonical_json({k: v for k, v in metadata.items() if k != "content_hash"}).encode()
    )
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name}:{tensor.dtype}:{list(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return "sha256:" + digest.hexdigest()


def load_verified(path: Path, what: str, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, refusing one that is unreadable or
    whose content does not match its ``content_hash``."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own error, OSError, or a Rust panic on a damaged file
        raise UserError(f"{what} {path} is damaged or not a safetensors file ({_first_line(err)})", fix) from None
    if metadata.get("content_hash") != content_hash(tensors, metadata):
        raise UserError(f"{what} {path} is corrupted or was edited: its content does not match its hash", fix)
    return tensors, metadata


def load_verified_file(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file without a content hash (one-line error if unreadable)."""
    try:
        return load_file(str(path))
    except Exception as err:
        raise UserError(f"{path} is damaged or not a safetensors file ({_first_line(err)})", fix) from None


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata dict of a safetensors file (no tensors read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own error, OSError, or a Rust panic on a damaged file
        raise UserError(
            f"{path} is not a readable safetensors file ({_first_line(err)})", "re-create it with hitanno train"
        ) from None


def load_model(directory: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a trained model directory, checking its format, version and panel."""
    directory = Path(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        hint = (
            " (it holds an interrupted run: finish it with hitanno train --resume)"
            if (directory / RESUME).is_dir()
            else ""
        )
        raise UserError(f"model {directory} has no {WEIGHTS}{hint}", "pass a directory written by hitanno train")
    meta = read_metadata(weights)
    try:
        header = json.loads(meta["header"])
    except (KeyError, json.JSONDecodeError):
        header = None
    header = artifacts.check_header(header, artifacts.MODEL, weights)
    try:
        config = ModelConfig.from_dict(json.loads(meta["config"]))
        class_names = list(json.loads(meta["class_names"]))
        panel_hash = meta["panel_hash"]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise UserError(f"{weights} has damaged metadata ({err})", "re-create it with hitanno train") from None
    panel = Panel.load(directory / PANEL)
    if panel.content_hash != panel_hash:
        raise UserError(
            f"{directory / PANEL} is not the panel {weights} was trained with",
            "restore the panel.json written by hitanno train",
        )
    fix = "re-create it with hitanno train"
    if artifacts.is_hashed(header) or "content_hash" in meta:
        tensors, _ = load_verified(weights, "model", fix)
    else:  # written before models carried a content hash
        tensors = load_verified_file(weights, fix)
    model = HitAnno(config)
    try:
        model.load_state_dict(tensors)
    except (RuntimeError, SafetensorError) as err:
        raise UserError(
            f"{weights} does not match its model config ({str(err).splitlines()[0]})", "re-create it with hitanno train"
        ) from None
    model.to(device).eval()
    return LoadedModel(model, config, class_names, panel, header, artifacts.sha256_file(weights))


# -- the adaptation record ---------------------------------------------------------------
def write_adaptation(directory: Path, *, params: dict[str, Any], inputs: dict[str, str], **record: Any) -> None:
    """Write ``adaptation.json``: which query a self-trained model adapted to, and how."""
    header = artifacts.make_header(artifacts.ADAPTATION, params, inputs)
    artifacts.write_verified_json(directory / ADAPTATION, {"header": header, **record})


def read_adaptation(directory: Path) -> dict[str, Any] | None:
    """The adaptation record of a model directory; None for a model trained on a reference only."""
    path = Path(directory) / ADAPTATION
    if not path.is_file():
        return None
    return artifacts.read_verified_json(
        path, artifacts.ADAPTATION, fix="re-create the model with hitanno train --adapt-to"
    )


# -- resumable state -------------------------------------------------------------------------
def encode_bytes(tensor: torch.Tensor) -> str:
    """A uint8 tensor (an RNG state) as base64 text for JSON."""
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def decode_bytes(text: str) -> torch.Tensor:
    """Inverse of :func:`encode_bytes`."""
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state into flat tensors (``optim.<param>.<key>``) and JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Rebuild an optimiser state from :func:`optimizer_tensors`' two halves."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in info["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_resume(directory: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write ``resume/state.safetensors`` and ``resume/state.json`` atomically."""
    tensors = {name: value.contiguous() for name, value in tensors.items()}
    metadata = {"content_hash": ""}
    metadata["content_hash"] = content_hash(tensors, metadata)
    with artifacts.atomic_dir(directory / RESUME, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"), metadata=metadata)
        artifacts.ordinary_mode(tmp / "state.safetensors", directory=False)
        artifacts.write_json(tmp / "state.json", artifacts.sealed({**state, "tensors_hash": metadata["content_hash"]}))


def load_resume(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the resumable state of an interrupted run in ``directory``."""
    resume = directory / RESUME
    if not (resume / "state.json").is_file() or not (resume / "state.safetensors").is_file():
        raise UserError(
            f"{directory} holds no resumable state ({RESUME}/ is missing)", "run hitanno train without --resume"
        )
    fix = "start over with --overwrite"
    state = artifacts.read_json(resume / "state.json", "resume state")
    if not isinstance(state, dict) or not artifacts.seal_holds(state):
        raise UserError(f"{resume / 'state.json'} is corrupted or was edited: it does not match its hash", fix)
    body = {key: value for key, value in state.items() if key != "content_hash"}
    tensors, metadata = load_verified(resume / "state.safetensors", "resume state", fix)
    if metadata["content_hash"] != body.pop("tensors_hash", None):
        raise UserError(f"{resume / 'state.safetensors'} is not the state {resume / 'state.json'} was saved with", fix)
    return tensors, body
