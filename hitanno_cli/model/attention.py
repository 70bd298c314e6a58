"""The attention functions of the dense paths: SDPA, flash-attn, and explicit weights.

An attention function maps per-head ``q [N, H, Sq, d]``, ``k``, ``v [N, H, S, d]`` to the
context ``softmax(q kᵀ / √d) v`` ``[N, H, Sq, d]``; all of them compute that same function.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hitanno_cli.errors import UserError

#: The values of ``ModelConfig.attention`` (``auto``: sparse with one level-1 layer, else dense).
ATTENTION_CHOICES = ("auto", "sparse", "dense", "flash")

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused attention ``[N, H, S, d]`` (flash / memory-efficient kernels on GPU)."""
    return F.scaled_dot_product_attention(q, k, v)


def flash_unavailable_reason() -> str | None:
    """Why ``--attention flash`` cannot run here, or None if it can."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install flash-attn)"
    if not torch.cuda.is_available():
        return "flash-attn needs a CUDA GPU and none is available"
    return None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention through ``flash_attn.flash_attn_func`` (CUDA, half precision)."""
    if not q.is_cuda:
        raise UserError(
            "--attention flash needs the model on a CUDA device", "run on a GPU or use --attention sparse/dense"
        )
    from flash_attn import flash_attn_func

    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = flash_attn_func(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)))
    return out.transpose(1, 2).to(q.dtype)


def attention_for(level1_path: str) -> AttentionFn:
    """The attention function of a dense level-1 path: flash-attn for ``"flash"``, else SDPA."""
    if level1_path != "flash":
        return sdpa_attention
    reason = flash_unavailable_reason()
    if reason:
        raise UserError(f"--attention flash is unavailable: {reason}", "use --attention auto (sparse) or dense")
    return flash_attention


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Explicit ``softmax(q kᵀ / √d)`` ``[N, H, Sq, Sk]``, at least float32 (for explanations)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(dtype) @ k.to(dtype).transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1)
