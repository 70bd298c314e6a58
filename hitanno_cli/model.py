"""The HitAnno hierarchical transformer (SPEC §1.4) and its exact sparse level-1 path.

A cell is ``n_types`` peak sets of ``P`` peaks each, every peak closed or open. Level 1
encodes each ``[set token, P peak tokens]`` sequence (weights shared across sets) and
keeps the set token's output as the set's summary; level 2 encodes ``[CLS, summaries]``
and keeps CLS as the cell embedding; a two-layer head gives the logits.

Inputs are sparse: ``indptr [B+1]`` and ``positions [nnz]`` list each cell's *open*
panel positions ``t * P + j`` (what :meth:`SentenceStore.read_open` returns).

Two level-1 paths compute the same function:

* **dense** — the textbook encoder over every token of every set, attention through
  :func:`torch.nn.functional.scaled_dot_product_attention` (or ``flash-attn``);
  it serves any number of level-1 layers and is the reference the tests compare with.
* **sparse** — with one level-1 layer only the set token's output is used, and its
  query, and every peak's key and value for either state, do not depend on the cell.
  So a cell's set-token attention is the all-closed cell's attention corrected by a sum
  over its open peaks only; the cost per cell follows its open peaks, not ``n_types·P²``.

Design decisions (see ``docs/model.md``): the token embedding is
``LayerNorm(identity[p] + state[s])`` (BERT's embedding LayerNorm) with no position
embedding (a peak's identity already fixes its place in the set) and no embedding
dropout (it would make every cell's keys random and the sparse path inexact); set
tokens get the same LayerNorm. Hidden dropout sits where BERT has it (after the
attention output projection and after the feed-forward); attention-probability dropout
is 0 on both paths.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hitanno_cli.errors import UserError

ATTENTION_CHOICES = ("auto", "sparse", "dense", "flash")

#: BERT's LayerNorm epsilon.
LAYER_NORM_EPS = 1e-12

#: A sparse-path row whose ``Z_closed + Σ_open e0`` exceeds this multiple of its ``Z``
#: would lose more than ~1e-6 relative precision (float32) to cancellation; such rows
#: are recomputed directly.
CANCELLATION_LIMIT = 16.0

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- configuration ------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Every size of the model; the defaults are the published ones (SPEC §1.4)."""

    n_types: int
    peaks_per_type: int
    embed_dim: int = 128
    level1_heads: int = 16
    level1_ff: int = 128
    level1_layers: int = 1
    level2_heads: int = 16
    level2_ff: int = 128
    level2_layers: int = 1
    head_hidden: int = 64
    dropout: float = 0.1
    attention: str = "auto"
    linear_path: bool = False  # beyond SPEC: add a linear read-out of the open peaks to the logits
    linear_idf: bool = False  # weigh the linear path's open peaks by the reference's idf (TF-IDF)
    depth_signal: bool = False  # beyond SPEC: tell level 2's CLS token the cell's log open-peak count

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse sizes the model cannot be built with."""
        for name in ("n_types", "peaks_per_type", "embed_dim", "level1_heads", "level1_ff",
                     "level1_layers", "level2_heads", "level2_ff", "level2_layers", "head_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model option {name} must be a positive integer, got {value!r}",
                                f"set {name} to 1 or more")
        for heads in ("level1_heads", "level2_heads"):
            if self.embed_dim % getattr(self, heads):
                raise UserError(f"embed_dim {self.embed_dim} is not divisible by {heads} "
                                f"{getattr(self, heads)}", "choose a head count that divides embed_dim")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}", "pass e.g. --dropout 0.1")
        if self.attention not in ATTENTION_CHOICES:
            raise UserError(f"unknown attention {self.attention!r}",
                            f"choose one of {', '.join(ATTENTION_CHOICES)}")
        if self.attention == "sparse" and self.level1_layers != 1:
            raise UserError(f"sparse attention needs exactly one level-1 layer, got {self.level1_layers}",
                            "use --attention dense (or auto) for deeper level-1 stacks")

    @property
    def level1_path(self) -> str:
        """The level-1 computation actually used: ``"sparse"``, ``"dense"`` or ``"flash"``."""
        if self.attention == "auto":
            return "sparse" if self.level1_layers == 1 else "dense"
        return self.attention

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored in model artifacts)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Rebuild a config; unknown keys are refused (they mean a different model)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config keys: {', '.join(unknown)}",
                            "the model was written by a newer hitanno; upgrade hitanno")
        missing = sorted(name for name in ("n_types", "peaks_per_type") if name not in d)
        if missing:
            raise UserError(f"model config lacks {', '.join(missing)}", "re-train the model")
        return cls(**d)


@dataclass
class ModelOutput:
    """What one forward pass returns."""

    logits: torch.Tensor  # [B, n_types]
    embedding: torch.Tensor  # [B, embed_dim], level-2 CLS output
    level1_attention: torch.Tensor | None = None  # [B, n_types, P], set token → peaks
    level2_attention: torch.Tensor | None = None  # [B, n_types + 1, n_types + 1], 0 = CLS


# -- attention kernels --------------------------------------------------------------------
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
        raise UserError("--attention flash needs the model on a CUDA device",
                        "run on a GPU or use --attention sparse/dense")
    from flash_attn import flash_attn_func

    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = flash_attn_func(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)))
    return out.transpose(1, 2).to(q.dtype)


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Explicit ``softmax(q kᵀ / √d)`` ``[N, H, Sq, Sk]``, at least float32 (for explanations)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(dtype) @ k.to(dtype).transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1)


# -- building blocks ----------------------------------------------------------------------
class Dropout(nn.Module):
    """Inverted dropout whose CPU mask comes from numpy's PCG64 generator.

    torch's CPU Bernoulli sampler took a tenth of a sparse-path training step; 16-bit
    slices of PCG64's raw 64-bit output cost ~5× less (and half of ``Generator.bytes``).
    The keep probability is quantised to 1/65536 and the scale is its exact inverse, so
    the layer stays unbiased. Each call seeds PCG64 from torch's generator:
    ``torch.manual_seed`` and resumed RNG state still reproduce a run. Other devices use
    :func:`torch.nn.functional.dropout`.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * self.scale_mask(x)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + dropout(x)``; on the CPU in one pass (``addcmul``)."""
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return residual + self(x)
        return torch.addcmul(residual, x, self.scale_mask(x))

    def scale_mask(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh mask shaped like ``x``: 0 where dropped, the inverse keep rate elsewhere."""
        keep = max(1, round((1.0 - self.p) * 65536))
        seed = int(torch.randint(0, 2**62, (1,)).item())
        n = x.numel()
        draws = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]
        kept = (draws < keep).view(np.uint8)  # as bytes: torch converts uint8 to float ~2× faster than bool
        return torch.from_numpy(kept).view(x.shape).to(x.dtype).mul_(65536.0 / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class HeadwiseProjection(torch.autograd.Function):
    """``out[n, h] = weight[h] · x[n, h]`` for ``x [N, H, E]``, ``weight [H, d, E]``: each
    head's own linear map, as ``einsum("nhe,hde->nhd")``.

    The weight's gradient is one ``[d, N] × [N, E]`` product per head on strided views;
    einsum's backward first copies ``x`` into head-major order (its backward cost 2× more).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.einsum("nhe,hde->nhd", x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        with torch.autocast(device_type=grad.device.type, enabled=False):  # in the gradient's precision
            if ctx.needs_input_grad[0]:
                grad_x = torch.bmm(grad.transpose(0, 1), weight.to(grad.dtype)).transpose(0, 1).to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = _per_head_gram(grad, x.to(grad.dtype)).to(weight.dtype)
        return grad_x, grad_weight


def _per_head_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[h] = a[:, h]ᵀ @ b[:, h]`` ``[H, K, M]`` for ``a [N, H, K]``, ``b [N, H, M]``: one
    GEMM per head on strided views (a per-head weight's gradient), with no head-major copy."""
    out = torch.empty(a.shape[1], a.shape[2], b.shape[2], dtype=a.dtype, device=a.device)
    for head in range(a.shape[1]):
        torch.mm(a[:, head].T, b[:, head], out=out[head])
    return out


def _per_head_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[:, h] = a[:, h] @ b[h]`` for ``a [N, H, K]``: one GEMM per head on strided views,
    written head-major (returned as an ``[N, H, M]`` view).

    einsum and bmm first copy ``a`` into head-major order; at level 2's sizes that copy
    cost as much as the products.
    """
    out = torch.empty(b.shape[0], a.shape[0], b.shape[2], dtype=a.dtype, device=a.device)
    for head in range(b.shape[0]):
        torch.mm(a[:, head], b[head], out=out[head])
    return out.transpose(0, 1)


class SharedQueryAttention(torch.autograd.Function):
    """Level 2's CLS attention when CLS is one token shared by every cell, fused.

    For ``summaries [N, S, D]`` and per head ``h``: logits ``s·folded[h] + bias[h]`` over
    the summaries and the given ``cls_logit[h]`` for CLS itself, a softmax over those
    ``S + 1``, and the per-head value projection of the weighted inputs:
    ``out[n, h] = w_v[h] · Σ_s p[n, h, s] summaries[n, s] + p[n, h, cls] · cls_value[h]``.
    The same function as concatenating CLS and calling :meth:`EncoderLayer.first_token`,
    without the concatenated copy; the backward writes each gradient once (autograd's
    chain of einsum, bmm and cat copied the ``[N, S, D]`` tensors several times).
    """

    @staticmethod
    def forward(ctx, summaries: torch.Tensor, cls_logit: torch.Tensor, cls_value: torch.Tensor,
                folded: torch.Tensor, bias: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
        n, s, dim = summaries.shape
        h = cls_value.shape[0]
        logits = torch.addmm(bias, summaries.reshape(n * s, dim), folded.T).view(n, s, h)
        p = torch.cat([cls_logit.expand(n, 1, h), logits], dim=1).transpose(1, 2).softmax(dim=-1)  # [N, H, S+1]
        mixed = torch.bmm(p[:, :, 1:], summaries)  # [N, H, D]
        out = _per_head_mm(mixed, w_v.transpose(1, 2)).addcmul_(p[:, :, 0].unsqueeze(-1), cls_value)
        ctx.save_for_backward(summaries, cls_value, folded, w_v, p, mixed)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        summaries, cls_value, folded, w_v, p, mixed = ctx.saved_tensors
        n, s, dim = summaries.shape
        h = cls_value.shape[0]
        grad = grad.contiguous()
        p_cls, p_sum = p[:, :, 0], p[:, :, 1:]
        grad_w_v = _per_head_gram(grad, mixed)
        grad_cls_value = (grad * p_cls.unsqueeze(-1)).sum(dim=0)  # [H, d]
        grad_mixed = torch.bmm(grad.transpose(0, 1), w_v).transpose(0, 1)  # [N, H, D], head-major
        grad_p = torch.cat([(grad * cls_value).sum(dim=-1, keepdim=True),
                            torch.bmm(grad_mixed, summaries.transpose(1, 2))], dim=-1)  # [N, H, S+1]
        grad_logits = p * (grad_p - (grad_p * p).sum(dim=-1, keepdim=True))  # softmax backward, [N, H, S+1]
        grad_cls_logit = grad_logits[:, :, 0].sum(dim=0)
        per_summary = grad_logits[:, :, 1:].transpose(1, 2).reshape(n * s, h)  # [N*S, H]
        grad_bias = per_summary.sum(dim=0)
        grad_folded = per_summary.T @ summaries.reshape(n * s, dim)
        grad_summaries = torch.baddbmm((per_summary @ folded).view(n, s, dim), p_sum.transpose(1, 2), grad_mixed)
        return grad_summaries, grad_cls_logit, grad_cls_value, grad_folded, grad_bias, grad_w_v


class EncoderLayer(nn.Module):
    """A post-LayerNorm BERT layer: self-attention, residual, LN; GELU FFN, residual, LN."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff_in = nn.Linear(dim, ff)
        self.ff_out = nn.Linear(ff, dim)
        self.ff_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.dropout = Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, S, D]`` → ``[N, H, S, D/H]``."""
        n, s, d = x.shape
        return x.view(n, s, self.heads, d // self.heads).transpose(1, 2)

    def finish(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Everything after attention: output projection, residuals, LayerNorms, FFN."""
        h = self.attn_norm(self.dropout.add_to(x, self.attn_out(context)))
        return self.ff_norm(self.dropout.add_to(h, self.ff_out(F.gelu(self.ff_in(h)))))

    def forward(self, x: torch.Tensor, attend: AttentionFn, first_only: bool = False,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode ``x [N, S, D]``; ``first_only`` computes only token 0's output ``[N, 1, D]``.

        With ``need_weights`` also return token 0's (or, if not ``first_only``, every
        token's) attention probabilities ``[N, H, Sq, S]``.
        """
        queries = x[:, :1] if first_only else x
        q = self.split_heads(self.query(queries))
        k = self.split_heads(self.key(x))
        v = self.split_heads(self.value(x))
        context = attend(q, k, v).transpose(1, 2).reshape(queries.shape)
        weights = attention_weights(q, k) if need_weights else None
        return self.finish(queries, context), weights

    def folded_query(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For query tokens ``[N, …, D]``: ``W_kᵀ q / √d`` per head ``[N, H, D]`` and ``b_k·q / √d``
        ``[N, H]``, so that a token ``x``'s attention logit is ``x · folded + bias`` (no keys formed)."""
        dim = tokens.shape[-1]
        h = self.heads
        d = dim // h
        scale = 1.0 / math.sqrt(d)
        q = self.query(tokens).view(-1, h, d)
        folded = torch.einsum("nhd,hde->nhe", q, self.key.weight.view(h, d, dim)) * scale
        bias = (q * self.key.bias.view(h, d)).sum(-1) * scale
        return folded, bias

    def first_token(self, x: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """Token 0's output ``[N, 1, D]`` of ``x [N, S, D]``, without forming keys or values.

        With a single query per sequence, ``q·k_s = x_s·(W_kᵀ q) + b_k·q`` and
        ``Σ_s a_s v_s = W_v (Σ_s a_s x_s) + b_v``: the multiply-adds per sequence fall from
        about ``2·S·D²`` to ``3·D² + 2·S·D·H``. The same function as ``forward(first_only=True)``.
        ``first`` is ``x[:, :1]`` when the caller has it unsliced (slicing ``x`` costs a
        zero-filled gradient of ``x``'s size).
        """
        n, _, dim = x.shape
        h = self.heads
        d = dim // h
        first = x[:, :1] if first is None else first
        shared = n > 1 and first.stride(0) == 0  # one token broadcast to every sequence (level 2's CLS)
        folded, bias = self.folded_query(first[:1] if shared else first)
        bias = bias.unsqueeze(-1)  # [N or 1, H, 1]
        if shared:  # one query for all: the scores are a single GEMM, not N small ones
            scores = (x @ folded[0].T + bias[0, :, 0]).transpose(1, 2).softmax(dim=-1)  # [N, H, S]
        else:
            scores = torch.baddbmm(bias, folded, x.transpose(1, 2)).softmax(dim=-1)
        mixed = torch.bmm(scores, x)  # [N, H, D]: attention-weighted inputs per head
        context = HeadwiseProjection.apply(mixed, self.value.weight.view(h, d, dim)) + self.value.bias.view(h, d)
        return self.finish(first, context.reshape(n, 1, dim))

    def shared_query_token(self, cls: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Token 0's output ``[N, 1, D]`` for ``[cls, others[n]]`` with one ``cls [D]`` shared by
        all ``N`` sequences: :meth:`first_token` through :class:`SharedQueryAttention`."""
        n, _, dim = others.shape
        h = self.heads
        d = dim // h
        folded, bias = (term[0] for term in self.folded_query(cls.unsqueeze(0)))
        w_v = self.value.weight.view(h, d, dim)
        context = SharedQueryAttention.apply(others, folded @ cls + bias, w_v @ cls, folded, bias, w_v)
        context = context + self.value.bias.view(h, d)
        return self.finish(cls.expand(n, 1, dim), context.reshape(n, 1, dim))


class TokenEmbedding(nn.Module):
    """Peak tokens ``LN(identity[p] + state[s])`` and set tokens ``LN(set[t])``."""

    def __init__(self, n_types: int, peaks_per_type: int, dim: int) -> None:
        super().__init__()
        self.identity = nn.Embedding(n_types * peaks_per_type, dim)
        self.state = nn.Embedding(2, dim)
        self.set_token = nn.Embedding(n_types, dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        for table in (self.identity, self.state, self.set_token):
            nn.init.normal_(table.weight, std=0.02)

    def peak_tokens(self) -> torch.Tensor:
        """Both normalised token vectors of every panel peak, ``[2, T*P, D]`` (closed, open)."""
        return torch.stack([self.peak_tokens_in(state) for state in (0, 1)])

    def peak_tokens_in(self, state: int) -> torch.Tensor:
        """The normalised token of every panel peak in one state, ``[T*P, D]`` (0 closed, 1 open)."""
        return self.norm(self.identity.weight + self.state.weight[state])

    def set_tokens(self) -> torch.Tensor:
        """The normalised set token of every cell type, ``[T, D]``."""
        return self.norm(self.set_token.weight)


class LinearPath(nn.Module):
    """Per-type logits linear in a cell's L2-normalised TF-IDF row (SPEC §1.2 TF-IDF of its
    open peaks, ``log(1 + 1e4 · idf_p / n_open)``): a "wide" path beside the transformer,
    like a logistic regression. With ``idf`` all ones (no idf) every open peak weighs
    ``1 / √n_open``; the trainer sets ``idf`` from the reference when ``linear_idf``."""

    def __init__(self, n_positions: int, n_types: int) -> None:
        super().__init__()
        self.weight = nn.EmbeddingBag(n_positions, n_types, mode="sum")
        nn.init.zeros_(self.weight.weight)
        self.register_buffer("idf", torch.ones(n_positions))

    def forward(self, indptr: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n_open = (indptr[1:] - indptr[:-1]).clamp(min=1).to(self.idf.dtype)
        cells = cell_of_entries(indptr, positions.numel())
        values = torch.log1p(1e4 * self.idf[positions] / n_open[cells])
        norm = torch.zeros_like(n_open).index_add_(0, cells, values * values).sqrt().clamp(min=1e-12)
        weights = (values / norm[cells]).to(self.weight.weight.dtype)
        return self.weight(positions, indptr[:-1], per_sample_weights=weights)


def cell_of_entries(indptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """For CSR ``indptr``, the row (cell) index of each of its ``nnz`` entries."""
    counts = indptr[1:] - indptr[:-1]
    rows = torch.arange(counts.numel(), device=indptr.device)
    return torch.repeat_interleave(rows, counts, output_size=nnz)


@dataclass
class OpenSets:
    """The 0/1 matrix ``S [B*T, T*P]`` with a one at (cell·T + set, position) per open peak,
    in CSR form: row ``r``'s entries are ``positions[offsets[r]:offsets[r + 1]]``.

    ``S · table`` sums a per-position table over each (cell, set)'s open peaks; it is an
    ``embedding_bag`` sum (FBGEMM's kernel on the CPU: ~3.7× faster than a CSR sparse
    product here, and the same sums bit for bit).
    """

    offsets: torch.Tensor  # [B*T + 1]
    rows: torch.Tensor  # [nnz]: each entry's row, ascending
    positions: torch.Tensor  # [nnz]: each entry's panel position, ascending within a row
    n_positions: int

    @property
    def n_rows(self) -> int:
        return self.offsets.numel() - 1

    def sum(self, table: torch.Tensor) -> torch.Tensor:
        """``S · table`` ``[B*T, width]`` for ``table [T*P, width]``."""
        return F.embedding_bag(self.positions, table, self.offsets[:-1], mode="sum")

    def transposed_sum(self, table: torch.Tensor) -> torch.Tensor:
        """``Sᵀ · table`` ``[T*P, width]`` for ``table [B*T, width]``: the same kernel over
        ``Sᵀ``'s rows, built by a stable radix sort of the entries' positions."""
        key_dtype = torch.int16 if self.n_positions <= 2**15 else torch.int32 if self.n_positions <= 2**31 else torch.long
        order = torch.sort(self.positions.to(key_dtype), stable=True).indices  # a radix sort for small integers
        starts = torch.zeros(self.n_positions, dtype=torch.long, device=self.positions.device)
        starts[1:] = torch.bincount(self.positions, minlength=self.n_positions)[:-1].cumsum(0)
        return F.embedding_bag(self.rows[order], table, starts, mode="sum")


def open_sets(indptr: torch.Tensor, positions: torch.Tensor, n_types: int, peaks_per_type: int) -> OpenSets:
    """The open-set matrix of a CSR batch of open panel positions (repeats count once)."""
    n_positions = n_types * peaks_per_type
    cells = cell_of_entries(indptr, positions.numel())
    key = cells * n_positions + positions
    if key.numel() > 1 and not bool((key[1:] > key[:-1]).all()):
        key = torch.unique(key)  # sorted: rows ascending, positions ascending within a row
        cells, positions = torch.div(key, n_positions, rounding_mode="floor"), key % n_positions
    rows = cells * n_types + torch.div(positions, peaks_per_type, rounding_mode="floor")
    n_rows = (indptr.numel() - 1) * n_types
    offsets = torch.zeros(n_rows + 1, dtype=torch.long, device=positions.device)
    offsets[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return OpenSets(offsets, rows, positions, n_positions)


class OpenSetContext(torch.autograd.Function):
    """Each (cell, set) row's attention context ``N / Z`` from the open sets ``S``.

    ``sums = S · deltas + closed`` holds, per row, ``Z | N | Z_closed + Σ_open e0`` (the
    last block, without gradient, measures cancellation); rows that ``ill_rows`` flags get
    ``Z = 1`` here and are recomputed by the caller. One fused function instead of
    autograd's chain of add, split, where, reciprocal and product: the backward writes
    the gradient of ``sums`` once and multiplies it by ``Sᵀ`` (the autograd backward of
    ``embedding_bag`` takes 4.5× longer).
    Returns the context ``[rows, H, d]`` and the flagged rows (no gradient).
    """

    @staticmethod
    def forward(ctx, sets: OpenSets, deltas: torch.Tensor, closed: torch.Tensor, heads: int,
                ill_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n_types, width = closed.shape
        sums = sets.sum(deltas)
        sums.view(-1, n_types, width).add_(closed)
        z = sums[:, :heads].contiguous()
        ill = ill_rows(z, sums[:, width - heads :].contiguous())
        reciprocal = torch.where(ill.unsqueeze(-1), torch.ones_like(z), z).reciprocal_()
        context = sums[:, heads : width - heads].view(sets.n_rows, heads, -1) * reciprocal.unsqueeze(-1)
        ctx.save_for_backward(reciprocal, context, ill)
        ctx.sets, ctx.n_types, ctx.heads = sets, n_types, heads
        ctx.mark_non_differentiable(ill)
        return context, ill

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        reciprocal, context, ill = ctx.saved_tensors
        h = ctx.heads
        grad_sums = torch.empty(context.shape[0], h + context.shape[1] * context.shape[2],
                                dtype=grad.dtype, device=grad.device)
        # Z of a flagged row was replaced by a constant: no gradient flows to it
        grad_z = (grad * context).sum(dim=-1).mul_(reciprocal).neg_().masked_fill_(ill.unsqueeze(-1), 0.0)
        grad_sums[:, :h] = grad_z
        torch.mul(grad, reciprocal.unsqueeze(-1), out=grad_sums[:, h:].view_as(grad))
        grad_closed = grad_sums.view(-1, ctx.n_types, grad_sums.shape[1]).sum(dim=0)
        grad_deltas = None
        if ctx.needs_input_grad[1]:
            grad_deltas = F.pad(ctx.sets.transposed_sum(grad_sums), (0, h))  # the Σ e0 block: none
        return None, grad_deltas, F.pad(grad_closed, (0, h)), None, None


def dense_states(indptr: torch.Tensor, positions: torch.Tensor, n_positions: int) -> torch.Tensor:
    """CSR open positions → boolean ``[B, n_positions]`` states (True = open)."""
    states = torch.zeros(indptr.numel() - 1, n_positions, dtype=torch.bool, device=positions.device)
    states[cell_of_entries(indptr, positions.numel()), positions] = True
    return states


def check_open_positions(indptr: torch.Tensor, positions: torch.Tensor, n_positions: int) -> None:
    """Refuse a malformed CSR batch (wrong dtype, lengths, or positions off the panel)."""
    if indptr.dim() != 1 or positions.dim() != 1 or indptr.numel() < 1:
        raise UserError("open positions must be 1-d CSR tensors (indptr [B+1], positions [nnz])",
                        "pass what SentenceStore.read_open returns")
    if indptr.dtype != torch.long or positions.dtype != torch.long:
        raise UserError("indptr and positions must be int64 tensors", "convert with .long()")
    if int(indptr[0]) != 0 or int(indptr[-1]) != positions.numel():
        raise UserError(f"indptr spans {int(indptr[-1]) - int(indptr[0])} entries but there are "
                        f"{positions.numel()} positions", "pass a consistent CSR pair")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n_positions):
        raise UserError(f"open positions must lie in [0, {n_positions})",
                        "encode the data through this model's panel")


# -- the model ----------------------------------------------------------------------------
class HitAnno(nn.Module):
    """Hierarchical transformer: peak sets → set summaries → cell embedding → logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        if config.level1_path == "flash":
            reason = flash_unavailable_reason()
            if reason:
                raise UserError(f"--attention flash is unavailable: {reason}",
                                "use --attention auto (sparse) or dense")
        self.config = config
        d, p = config.embed_dim, config.dropout
        self.embed = TokenEmbedding(config.n_types, config.peaks_per_type, d)
        self.level1 = nn.ModuleList(EncoderLayer(d, config.level1_heads, config.level1_ff, p)
                                    for _ in range(config.level1_layers))
        self.cls = nn.Parameter(torch.randn(d) * 0.02)
        self.level2 = nn.ModuleList(EncoderLayer(d, config.level2_heads, config.level2_ff, p)
                                    for _ in range(config.level2_layers))
        self.head = nn.Sequential(nn.Linear(d, config.head_hidden), nn.ReLU(),
                                  nn.Linear(config.head_hidden, config.n_types))
        self.linear = LinearPath(self.n_positions, config.n_types) if config.linear_path else None
        self.depth = nn.Linear(1, d) if config.depth_signal else None
        if self.depth is not None:  # starts silent: the published model until it learns otherwise
            nn.init.zeros_(self.depth.weight)
            nn.init.zeros_(self.depth.bias)
        self.level1_attend: AttentionFn = flash_attention if config.level1_path == "flash" else sdpa_attention

    @property
    def n_positions(self) -> int:
        """Panel positions per cell, ``n_types * P``."""
        return self.config.n_types * self.config.peaks_per_type

    def forward(self, indptr: torch.Tensor, positions: torch.Tensor,
                return_attention: bool = False) -> ModelOutput:
        """Logits and embeddings of the cells whose open positions are given in CSR form.

        ``indptr``: LongTensor ``[B+1]``; ``positions``: LongTensor ``[nnz]`` of open
        panel positions ``t * P + j`` per cell, exactly what ``SentenceStore.read_open``
        returns. ``return_attention`` adds both levels' head-averaged attention.
        """
        check_open_positions(indptr, positions, self.n_positions)
        if self.config.level1_path == "sparse":
            summaries, attn1 = self.sparse_level1(indptr, positions, return_attention)
        else:
            summaries, attn1 = self.dense_level1(indptr, positions, return_attention)
        embedding, attn2 = self.encode_level2(summaries, return_attention, self.depth_term(indptr))
        logits = self.head(embedding)
        if self.linear is not None:
            logits = logits + self.linear(indptr, positions).to(logits.dtype)
        return ModelOutput(logits, embedding, attn1, attn2)

    # level 1, dense ----------------------------------------------------------------------
    def dense_level1(self, indptr: torch.Tensor, positions: torch.Tensor,
                     need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summaries ``[B, T, D]`` by running every level-1 layer over all tokens."""
        t, p = self.config.n_types, self.config.peaks_per_type
        b = indptr.numel() - 1
        states = dense_states(indptr, positions, self.n_positions).view(b * t, p, 1)
        closed, open_ = self.embed.peak_tokens().view(2, 1, t, p, -1).expand(2, b, t, p, -1).reshape(
            2, b * t, p, -1)
        peaks = torch.where(states, open_, closed)
        sets = self.embed.set_tokens().expand(b, t, -1).reshape(b * t, 1, -1)
        x = torch.cat([sets, peaks], dim=1)
        weights = None
        for i, layer in enumerate(self.level1):
            last = i == len(self.level1) - 1
            x, weights = layer(x, self.level1_attend, first_only=last, need_weights=last and need_weights)
        attn = None
        if weights is not None:
            attn = weights[:, :, 0, 1:].mean(dim=1).view(b, t, p)
        return x[:, 0].view(b, t, -1), attn

    # level 1, sparse ---------------------------------------------------------------------
    def sparse_level1(self, indptr: torch.Tensor, positions: torch.Tensor,
                      need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summaries ``[B, T, D]`` from the set-token attention corrected by open peaks only.

        Per set ``t`` and head ``h``: ``Z = Z_closed + Σ_open (e1 − e0)`` and
        ``N = N_closed + Σ_open (e1·V1 − e0·V0)``, ``context = N / Z``, where
        ``e_s,p = exp(q_t·K_s,p/√d − m_t,h)``; everything but the two sums over open
        peaks is computed once per call for the whole panel.
        """
        panel = self.cached_panel_terms()
        t, p = self.config.n_types, self.config.peaks_per_type
        b = indptr.numel() - 1
        indicator = open_sets(indptr, positions, t, p)
        h = panel.z_closed.shape[-1]
        with torch.autocast(device_type=positions.device.type, enabled=False):
            # one sum over the batch's open peaks for Z, N and the closed mass they remove
            # (which measures the cancellation)
            context, ill = OpenSetContext.apply(indicator, panel.deltas, panel.closed, h, self.ill_conditioned_rows)
            if bool(ill.any()):
                context = self.exact_rows(panel, context, ill, indicator.rows, indicator.positions)
        sets = panel.set_tokens.expand(b, t, -1)
        summaries = self.level1[0].finish(sets, context.reshape(b, t, -1).to(sets.dtype))
        attn = self.sparse_attention_map(panel, indptr, positions) if need_weights else None
        return summaries, attn

    @staticmethod
    def ill_conditioned_rows(z: torch.Tensor, cancelled: torch.Tensor) -> torch.Tensor:
        """(cell, set) rows whose ``Z`` lost precision to ``Z_closed − Σ_open e0`` cancellation.

        ``cancelled = Z_closed + Σ_open e0`` bounds the rounding error of ``Z`` (up to
        machine epsilon); a row whose open peaks held almost all of the closed-state
        mass, or whose mass underflowed the shared stabiliser, is recomputed exactly.
        """
        return ((cancelled > CANCELLATION_LIMIT * z) | ~(z > 0)).any(dim=-1)

    def exact_rows(self, panel: PanelTerms, context: torch.Tensor, ill: torch.Tensor,
                   rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Replace the ``ill`` rows of ``context [B*T, H, d]`` by a direct softmax over their set."""
        t, p = self.config.n_types, self.config.peaks_per_type
        ill_rows = ill.nonzero().squeeze(1)
        slot = torch.full_like(ill, -1, dtype=torch.long)
        slot[ill_rows] = torch.arange(ill_rows.numel(), device=ill.device)
        entry_slot = slot[rows]
        picked = entry_slot >= 0
        states = torch.zeros(ill_rows.numel(), p, dtype=torch.bool, device=ill.device)
        states[entry_slot[picked], positions[picked] % p] = True
        sets = ill_rows % t
        logits = torch.where(states.unsqueeze(-1), panel.logits_open[sets], panel.logits_closed[sets])  # [R, P, H]
        scores = torch.cat([panel.self_logit[sets].unsqueeze(1), logits], dim=1).softmax(dim=1)
        v_closed, v_open = panel.values_closed[sets], panel.values_open[sets]  # [R, P, H, d]
        peak_weights = scores[:, 1:]
        exact = (scores[:, 0].unsqueeze(-1) * panel.self_value[sets]
                 + torch.einsum("rph,rphd->rhd", peak_weights, v_closed)
                 + torch.einsum("rph,rphd->rhd", peak_weights * states.unsqueeze(-1), v_open - v_closed))
        return context.index_put((ill_rows,), exact)

    def sparse_attention_map(self, panel: PanelTerms, indptr: torch.Tensor,
                             positions: torch.Tensor) -> torch.Tensor:
        """Set-token → peak attention ``[B, T, P]`` (mean over heads), densely for a small batch."""
        t, p = self.config.n_types, self.config.peaks_per_type
        b = indptr.numel() - 1
        states = dense_states(indptr, positions, self.n_positions).view(b, t, p, 1)
        logits = torch.where(states, panel.logits_open, panel.logits_closed)  # [B, T, P, H]
        own = panel.self_logit.expand(b, t, -1).unsqueeze(2)
        scores = torch.cat([own, logits], dim=2).softmax(dim=2)
        return scores[:, :, 1:].mean(dim=-1)

    def cached_panel_terms(self) -> PanelTerms:
        """The panel terms, computed once and reused while no gradient is taken and no
        parameter has changed (inference), else afresh (training needs their graph)."""
        if torch.is_grad_enabled():
            self._panel_cache = None
            return self.panel_attention_terms()
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        cache = getattr(self, "_panel_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, self.panel_attention_terms())
            self._panel_cache = cache
        return cache[1]

    def panel_attention_terms(self) -> PanelTerms:
        """The cell-independent quantities of the sparse path, for the whole panel.

        The closed and open states are kept as separate tensors (not one stacked
        ``[2, …]`` tensor): slicing a stack costs a zero-filled gradient per slice.
        """
        layer = self.level1[0]
        t, p = self.config.n_types, self.config.peaks_per_type
        h = self.config.level1_heads
        with torch.autocast(device_type=self.cls.device.type, enabled=False):
            sets = self.embed.set_tokens()  # [T, D]
            d = sets.shape[-1] // h
            scale = 1.0 / math.sqrt(d)
            q = layer.query(sets).view(t, h, d)
            # q·K without forming K: logits = x · (W_kᵀ q) + b_k·q, per set and head
            w_k = layer.key.weight.view(h, d, -1)
            folded = torch.einsum("thd,hde->the", q, w_k) * scale  # [T, H, D]
            bias = (layer.key.bias.view(1, h, d) * q).sum(-1) * scale  # [T, H]
            self_logit = torch.einsum("te,the->th", sets, folded) + bias  # [T, H]
            tokens = [self.embed.peak_tokens_in(state) for state in (0, 1)]  # closed, open: [T*P, D]
            logits = [torch.einsum("tpe,the->tph", x.view(t, p, -1), folded) + bias[:, None] for x in tokens]
            m = torch.maximum(torch.maximum(logits[0].amax(dim=1), logits[1].amax(dim=1)), self_logit).detach()
            e0, e1 = (torch.exp(lg - m[:, None]) for lg in logits)  # [T, P, H]
            e_self = torch.exp(self_logit - m)
            v0, v1 = (layer.value(x).view(t, p, h, d) for x in tokens)
            v_self = layer.value(sets).view(t, h, d)
            z_closed = e_self + e0.sum(dim=1)
            weighted_closed = e0.unsqueeze(-1) * v0  # [T, P, H, d], shared by N_closed and the deltas
            n_closed = e_self.unsqueeze(-1) * v_self + weighted_closed.sum(dim=1)
            delta_n = e1.unsqueeze(-1) * v1 - weighted_closed
            return PanelTerms(
                set_tokens=sets,
                z_closed=z_closed,
                closed=torch.cat([z_closed, n_closed.reshape(t, h * d), z_closed.detach()], dim=1),
                deltas=torch.cat([(e1 - e0).reshape(t * p, h), delta_n.reshape(t * p, h * d),
                                  e0.reshape(t * p, h).detach()], dim=1),
                logits_closed=logits[0],
                logits_open=logits[1],
                self_logit=self_logit,
                values_closed=v0,
                values_open=v1,
                self_value=v_self,
            )

    # level 2 -----------------------------------------------------------------------------
    def depth_term(self, indptr: torch.Tensor) -> torch.Tensor | None:
        """``[B, D]`` added to the CLS token: a learned direction times ``log(1 + n_open)``."""
        if self.depth is None:
            return None
        n_open = (indptr[1:] - indptr[:-1]).to(self.depth.weight.dtype)
        return self.depth(torch.log1p(n_open).unsqueeze(1))

    def encode_level2(self, summaries: torch.Tensor, need_weights: bool,
                      depth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cell embeddings ``[B, D]`` from ``[CLS, summaries]``; the last layer computes CLS only."""
        b = summaries.shape[0]
        fused = (depth is None and not need_weights and len(self.level2) == 1 and summaries.device.type == "cpu"
                 and not torch.is_autocast_enabled(summaries.device.type))
        if fused:  # one shared CLS query and only its output used: the fused CPU kernel
            return self.level2[0].shared_query_token(self.cls.to(summaries.dtype), summaries)[:, 0], None
        cls = self.cls.to(summaries.dtype).expand(b, 1, -1)
        if depth is not None:
            cls = cls + depth.to(summaries.dtype).unsqueeze(1)
        x = torch.cat([cls, summaries], dim=1)
        weights = None
        for i, layer in enumerate(self.level2):
            last = i == len(self.level2) - 1
            if last and not need_weights:  # only CLS is used: skip the other tokens' keys and values
                x = layer.first_token(x, first=cls if i == 0 else None)
            else:
                x, weights = layer(x, sdpa_attention, need_weights=last and need_weights)
        attn = weights.mean(dim=1) if weights is not None else None
        return x[:, 0], attn


@dataclass
class PanelTerms:
    """Cell-independent sparse-path quantities: closed sums and per-peak open−closed deltas."""

    set_tokens: torch.Tensor  # [T, D]
    z_closed: torch.Tensor  # [T, H] all-closed softmax denominators
    closed: torch.Tensor  # [T, H + D + H]: Z_closed | N_closed | Z_closed (no grad)
    deltas: torch.Tensor  # [T*P, H + D + H]: e1 − e0 | e1·V1 − e0·V0 | e0 (no grad), per peak
    logits_closed: torch.Tensor  # [T, P, H] set-token query · closed peak keys / √d
    logits_open: torch.Tensor  # [T, P, H] the same for open peaks
    self_logit: torch.Tensor  # [T, H] set-token query · its own key / √d
    values_closed: torch.Tensor  # [T, P, H, d] closed peak values
    values_open: torch.Tensor  # [T, P, H, d] open peak values
    self_value: torch.Tensor  # [T, H, d]
