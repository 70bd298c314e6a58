"""CPU speed kernels: each a faster equivalent of a plain torch expression, with a switch.

Every kernel computes the same function as the plain expression it replaces (the tests
compare them, values and gradients); it differs in speed on the CPU, in rounding, and
for dropout in which random numbers make the mask. Each one can be turned off:

==========================  =============================================  =========================================
name                        kernel                                         plain fallback
==========================  =============================================  =========================================
``dropout``                 :class:`Dropout`: PCG64 masks, ``addcmul``     ``F.dropout``, ``residual + dropout(x)``
``headwise_projection``     :class:`HeadwiseProjection`                    ``torch.einsum("nhe,hde->nhd", x, w)``
``first_token``             :func:`first_token`: one-query attention       ``EncoderLayer.forward(first_only=True)``
``shared_query_attention``  :class:`SharedQueryAttention` (level 2's CLS)  concatenate CLS, then :func:`first_token`
``open_set_context``        :class:`OpenSetContext` (sparse level 1)       autograd's embedding_bag sum, add, divide
``weighted_bag_sum``        :class:`WeightedBagSum` (the linear path)      ``F.embedding_bag`` and its backward
==========================  =============================================  =========================================

Switch them with ``KERNELS[name] = False``, for a block with ``with plain_kernels(name,
...)`` (``"all"`` names every one), or for a whole process with the environment variable
``HITANNO_PLAIN_KERNELS=name,name`` (or ``all``), read at import. By default all are on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hitanno_cli.errors import UserError
from hitanno_cli.model.attention import sdpa_attention

if TYPE_CHECKING:
    from hitanno_cli.model.model import EncoderLayer
    from hitanno_cli.model.sparse import OpenSets

#: The environment variable that turns kernels off for a process.
PLAIN_KERNELS_ENV = "HITANNO_PLAIN_KERNELS"

#: Each kernel's switch: True runs the kernel, False its plain torch expression.
KERNELS: dict[str, bool] = dict.fromkeys(
    ("dropout", "headwise_projection", "first_token", "shared_query_attention", "open_set_context", "weighted_bag_sum"),
    True,
)


# -- the switches ------------------------------------------------------------------------
def parse_plain_kernels(value: str) -> frozenset[str]:
    """The kernels a ``HITANNO_PLAIN_KERNELS`` value names: comma-separated names, or ``all``."""
    names = {name.strip().lower() for name in value.split(",")} - {""}
    if "all" in names:
        return frozenset(KERNELS)
    unknown = sorted(names - KERNELS.keys())
    if unknown:
        raise UserError(
            f"unknown kernel {', '.join(unknown)} (in {PLAIN_KERNELS_ENV} or plain_kernels)",
            f"name some of {', '.join(KERNELS)}, or all",
        )
    return frozenset(names)


@contextmanager
def plain_kernels(*names: str) -> Iterator[None]:
    """Run the block with the named kernels (``"all"``: every one; none: no change) replaced by
    their plain expressions; the switches are restored afterwards."""
    saved = dict(KERNELS)
    KERNELS.update(dict.fromkeys(parse_plain_kernels(",".join(names)), False))
    try:
        yield
    finally:
        KERNELS.update(saved)


KERNELS.update(dict.fromkeys(parse_plain_kernels(os.environ.get(PLAIN_KERNELS_ENV, "")), False))


# -- dropout -----------------------------------------------------------------------------
class Dropout(nn.Module):
    """Inverted dropout whose CPU mask comes from numpy's PCG64 generator (kernel ``dropout``).

    A faster equivalent of :func:`torch.nn.functional.dropout` on the CPU: the mask is
    16-bit slices of PCG64's raw 64-bit output, compared with the keep probability
    quantised to 1/65536; the scale is its exact inverse, so the layer stays unbiased. Each
    call seeds PCG64 from torch's generator: ``torch.manual_seed`` and resumed RNG state
    still reproduce a run. Other devices, and the switch off, use ``F.dropout``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or not KERNELS["dropout"]:
            return F.dropout(x, self.p, training=True)
        return x * self.scale_mask(x)

    def add_to(self, residual: Tensor, x: Tensor) -> Tensor:
        """``residual + dropout(x)``; on the CPU in one pass (``addcmul``)."""
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or not KERNELS["dropout"]:
            return residual + self(x)
        return torch.addcmul(residual, x, self.scale_mask(x))

    def scale_mask(self, x: Tensor) -> Tensor:
        """A fresh mask shaped like ``x``: 0 where dropped, the inverse keep rate elsewhere."""
        keep = max(1, round((1.0 - self.p) * 65536))
        seed = int(torch.randint(0, 2**62, (1,)).item())
        n = x.numel()
        draws = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]
        kept = (draws < keep).view(np.uint8)  # as bytes: torch converts uint8 to float faster than bool
        return torch.from_numpy(kept).view(x.shape).to(x.dtype).mul_(65536.0 / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# -- per-head products -------------------------------------------------------------------
def _per_head_gram(a: Tensor, b: Tensor) -> Tensor:
    """``out[h] = a[:, h]ᵀ @ b[:, h]`` ``[H, K, M]`` for ``a [N, H, K]``, ``b [N, H, M]``: one
    GEMM per head on strided views (a per-head weight's gradient), with no head-major copy."""
    out = torch.empty(a.shape[1], a.shape[2], b.shape[2], dtype=a.dtype, device=a.device)
    for head in range(a.shape[1]):
        torch.mm(a[:, head].T, b[:, head], out=out[head])
    return out


def _per_head_mm(a: Tensor, b: Tensor) -> Tensor:
    """``out[:, h] = a[:, h] @ b[h]`` for ``a [N, H, K]``: one GEMM per head on strided views,
    written head-major (returned as an ``[N, H, M]`` view); einsum and bmm would first copy
    ``a`` into head-major order."""
    out = torch.empty(b.shape[0], a.shape[0], b.shape[2], dtype=a.dtype, device=a.device)
    for head in range(b.shape[0]):
        torch.mm(a[:, head], b[head], out=out[head])
    return out.transpose(0, 1)


class HeadwiseProjection(torch.autograd.Function):
    """``out[n, h] = weight[h] · x[n, h]`` for ``x [N, H, E]``, ``weight [H, d, E]``: each
    head's own linear map, ``einsum("nhe,hde->nhd")`` (kernel ``headwise_projection``).

    The forward is that einsum; the backward computes the weight's gradient as one
    ``[d, N] × [N, E]`` product per head on strided views, where einsum's backward first
    copies ``x`` into head-major order.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.einsum("nhe,hde->nhd", x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        with torch.autocast(device_type=grad.device.type, enabled=False):  # in the gradient's precision
            if ctx.needs_input_grad[0]:
                grad_x = torch.bmm(grad.transpose(0, 1), weight.to(grad.dtype)).transpose(0, 1).to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = _per_head_gram(grad, x.to(grad.dtype)).to(weight.dtype)
        return grad_x, grad_weight


def headwise_projection(x: Tensor, weight: Tensor) -> Tensor:
    """``einsum("nhe,hde->nhd", x, weight)``, through :class:`HeadwiseProjection` when it is on."""
    if KERNELS["headwise_projection"]:
        return HeadwiseProjection.apply(x, weight)
    return torch.einsum("nhe,hde->nhd", x, weight)


# -- one-query attention (level 2's last layer) ------------------------------------------
def first_token(layer: EncoderLayer, x: Tensor, first: Tensor | None = None) -> Tensor:
    """Token 0's output ``[N, 1, D]`` of ``layer`` over ``x [N, S, D]``, without forming keys or
    values (kernel ``first_token``; plain: ``layer(x, sdpa_attention, first_only=True)``).

    With a single query per sequence, ``q·k_s = x_s·(W_kᵀ q) + b_k·q`` and
    ``Σ_s a_s v_s = W_v (Σ_s a_s x_s) + b_v``: the multiply-adds per sequence fall from
    about ``2·S·D²`` to ``3·D² + 2·S·D·H``. ``first`` is ``x[:, :1]`` when the caller has it
    unsliced (slicing ``x`` costs a zero-filled gradient of ``x``'s size).
    """
    if not KERNELS["first_token"]:
        return layer(x, sdpa_attention, first_only=True)[0]
    n, _, dim = x.shape
    h = layer.heads
    d = dim // h
    first = x[:, :1] if first is None else first
    shared = n > 1 and first.stride(0) == 0  # one token broadcast to every sequence (level 2's CLS)
    folded, bias = layer.folded_query(first[:1] if shared else first)
    bias = bias.unsqueeze(-1)  # [N or 1, H, 1]
    if shared:  # one query for all: the scores are a single GEMM, not N small ones
        scores = (x @ folded[0].T + bias[0, :, 0]).transpose(1, 2).softmax(dim=-1)  # [N, H, S]
    else:
        scores = torch.baddbmm(bias, folded, x.transpose(1, 2)).softmax(dim=-1)
    mixed = torch.bmm(scores, x)  # [N, H, D]: attention-weighted inputs per head
    context = headwise_projection(mixed, layer.value.weight.view(h, d, dim)) + layer.value.bias.view(h, d)
    return layer.finish(first, context.reshape(n, 1, dim))


class SharedQueryAttention(torch.autograd.Function):
    """Level 2's CLS attention when CLS is one token shared by every cell, fused (kernel
    ``shared_query_attention``).

    For ``summaries [N, S, D]`` and per head ``h``: logits ``s·folded[h] + bias[h]`` over
    the summaries and the given ``cls_logit[h]`` for CLS itself, a softmax over those
    ``S + 1``, and the per-head value projection of the weighted inputs:
    ``out[n, h] = w_v[h] · Σ_s p[n, h, s] summaries[n, s] + p[n, h, cls] · cls_value[h]``.
    The same function as concatenating CLS in front of every cell and calling
    :func:`first_token`, without the concatenated copy; the backward writes each gradient
    once, where autograd's chain of einsum, bmm and cat copies the ``[N, S, D]`` tensors.
    """

    @staticmethod
    def forward(
        ctx, summaries: Tensor, cls_logit: Tensor, cls_value: Tensor, folded: Tensor, bias: Tensor, w_v: Tensor
    ) -> Tensor:
        n, s, dim = summaries.shape
        h = cls_value.shape[0]
        logits = torch.addmm(bias, summaries.reshape(n * s, dim), folded.T).view(n, s, h)
        p = torch.cat([cls_logit.expand(n, 1, h), logits], dim=1).transpose(1, 2).softmax(dim=-1)  # [N, H, S+1]
        mixed = torch.bmm(p[:, :, 1:], summaries)  # [N, H, D]
        out = _per_head_mm(mixed, w_v.transpose(1, 2)).addcmul_(p[:, :, 0].unsqueeze(-1), cls_value)
        ctx.save_for_backward(summaries, cls_value, folded, w_v, p, mixed)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        summaries, cls_value, folded, w_v, p, mixed = ctx.saved_tensors
        n, s, dim = summaries.shape
        h = cls_value.shape[0]
        grad = grad.contiguous()
        p_cls, p_sum = p[:, :, 0], p[:, :, 1:]
        grad_w_v = _per_head_gram(grad, mixed)
        grad_cls_value = (grad * p_cls.unsqueeze(-1)).sum(dim=0)  # [H, d]
        grad_mixed = torch.bmm(grad.transpose(0, 1), w_v).transpose(0, 1)  # [N, H, D], head-major
        grad_p = torch.cat(
            [(grad * cls_value).sum(dim=-1, keepdim=True), torch.bmm(grad_mixed, summaries.transpose(1, 2))], dim=-1
        )  # [N, H, S+1]
        grad_logits = p * (grad_p - (grad_p * p).sum(dim=-1, keepdim=True))  # softmax backward, [N, H, S+1]
        grad_cls_logit = grad_logits[:, :, 0].sum(dim=0)
        per_summary = grad_logits[:, :, 1:].transpose(1, 2).reshape(n * s, h)  # [N*S, H]
        grad_bias = per_summary.sum(dim=0)
        grad_folded = per_summary.T @ summaries.reshape(n * s, dim)
        grad_summaries = torch.baddbmm((per_summary @ folded).view(n, s, dim), p_sum.transpose(1, 2), grad_mixed)
        return grad_summaries, grad_cls_logit, grad_cls_value, grad_folded, grad_bias, grad_w_v


def shared_query_token(layer: EncoderLayer, cls: Tensor, others: Tensor) -> Tensor:
    """Token 0's output ``[N, 1, D]`` of ``layer`` over ``[cls, others[n]]``, one ``cls [D]`` shared
    by all ``N`` sequences: through :class:`SharedQueryAttention` on the CPU without autocast,
    else (and with the switch off) by concatenating ``cls`` and calling :func:`first_token`."""
    n, _, dim = others.shape
    device = others.device.type
    if not KERNELS["shared_query_attention"] or device != "cpu" or torch.is_autocast_enabled(device):
        first = cls.expand(n, 1, dim)
        return first_token(layer, torch.cat([first, others], dim=1), first=first)
    h = layer.heads
    d = dim // h
    folded, bias = (term[0] for term in layer.folded_query(cls.unsqueeze(0)))
    w_v = layer.value.weight.view(h, d, dim)
    context = SharedQueryAttention.apply(others, folded @ cls + bias, w_v @ cls, folded, bias, w_v)
    context = context + layer.value.bias.view(h, d)
    return layer.finish(cls.expand(n, 1, dim), context.reshape(n, 1, dim))


# -- the sparse path's context -----------------------------------------------------------
class OpenSetContext(torch.autograd.Function):
    """Each (cell, set) row's attention context ``N / Z`` from the open sets ``S`` (kernel
    ``open_set_context``).

    ``sums = S · deltas + closed`` holds, per row, ``Z | N | Z_closed + Σ_open e0`` (the
    last block, without gradient, measures cancellation); rows that ``ill_rows`` flags get
    ``Z = 1`` here and are recomputed by the caller. One fused function instead of
    autograd's chain of embedding_bag, add, split, where and divide: the backward writes the
    gradient of ``sums`` once and multiplies it by ``Sᵀ`` with the same embedding_bag kernel.
    Returns the context ``[rows, H, d]`` and the flagged rows (no gradient).
    """

    @staticmethod
    def forward(
        ctx, sets: OpenSets, deltas: Tensor, closed: Tensor, heads: int, ill_rows: Callable[[Tensor, Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
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
    def backward(ctx, grad: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        reciprocal, context, ill = ctx.saved_tensors
        h = ctx.heads
        grad_sums = torch.empty(
            context.shape[0], h + context.shape[1] * context.shape[2], dtype=grad.dtype, device=grad.device
        )
        # Z of a flagged row was replaced by a constant: no gradient flows to it
        grad_z = (grad * context).sum(dim=-1).mul_(reciprocal).neg_().masked_fill_(ill.unsqueeze(-1), 0.0)
        grad_sums[:, :h] = grad_z
        torch.mul(grad, reciprocal.unsqueeze(-1), out=grad_sums[:, h:].view_as(grad))
        grad_closed = grad_sums.view(-1, ctx.n_types, grad_sums.shape[1]).sum(dim=0)
        grad_deltas = None
        if ctx.needs_input_grad[1]:
            grad_deltas = F.pad(ctx.sets.transposed_sum(grad_sums), (0, h))  # the Σ e0 block: none
        return None, grad_deltas, F.pad(grad_closed, (0, h)), None, None


def open_set_context(
    sets: OpenSets, deltas: Tensor, closed: Tensor, heads: int, ill_rows: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """:class:`OpenSetContext`, or with the switch off the same function through autograd."""
    if KERNELS["open_set_context"]:
        return OpenSetContext.apply(sets, deltas, closed, heads, ill_rows)
    n_types, width = closed.shape
    sums = (sets.sum(deltas).view(-1, n_types, width) + closed).view(-1, width)
    z = sums[:, :heads]
    ill = ill_rows(z.detach(), sums[:, width - heads :].detach())
    z = torch.where(ill.unsqueeze(-1), torch.ones_like(z), z)
    return sums[:, heads : width - heads].reshape(sets.n_rows, heads, -1) / z.unsqueeze(-1), ill


# -- sums over sparse rows ---------------------------------------------------------------
def transposed_bag_sum(
    rows: Tensor, columns: Tensor, table: Tensor, n_columns: int, weights: Tensor | None = None
) -> Tensor:
    """``Mᵀ · table`` ``[n_columns, width]`` for the sparse ``M`` with entries at ``(rows, columns)``
    (values ``weights``, default 1) and ``table [n_rows, width]``.

    The ``embedding_bag`` sum over ``Mᵀ``'s rows, built by a stable radix sort of the
    columns: each output row is written once, where a scatter-add would first zero-fill
    the output and then add into it.
    """
    key_dtype = torch.int16 if n_columns <= 2**15 else torch.int32 if n_columns <= 2**31 else torch.long
    order = torch.sort(columns.to(key_dtype), stable=True).indices  # a radix sort for small integers
    starts = torch.zeros(n_columns, dtype=torch.long, device=columns.device)
    starts[1:] = torch.bincount(columns, minlength=n_columns)[:-1].cumsum(0)
    per_entry = None if weights is None else weights[order]
    return F.embedding_bag(rows[order], table, starts, mode="sum", per_sample_weights=per_entry)


class WeightedBagSum(torch.autograd.Function):
    """``out[b] = Σ_e w_e · table[indices_e]`` over the entries ``e`` of bag ``b`` (kernel
    ``weighted_bag_sum``): ``F.embedding_bag(mode="sum")`` with per-entry weights that take
    no gradient, as in the linear path.

    The forward is that embedding_bag; the backward forms the table's gradient by
    :func:`transposed_bag_sum`, writing each row once, where embedding_bag's backward
    zero-fills a table-sized gradient and adds into it: the linear path's table has
    ``T² · P`` entries (six million at 100 types), and a batch reads only its open peaks' rows.
    """

    @staticmethod
    def forward(ctx, indices: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(indices, offsets, weights)
        ctx.n_rows, ctx.dtype = table.shape[0], table.dtype
        return F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        indices, offsets, weights = ctx.saved_tensors
        counts = torch.diff(offsets, append=offsets.new_tensor([indices.numel()]))
        bags = torch.repeat_interleave(torch.arange(offsets.numel(), device=offsets.device), counts)
        grad_table = transposed_bag_sum(bags, indices, grad.contiguous(), ctx.n_rows, weights.to(grad.dtype))
        return None, grad_table.to(ctx.dtype), None, None


def weighted_bag_sum(indices: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """:class:`WeightedBagSum` on the CPU when it is on and ``weights`` take no gradient, else
    ``F.embedding_bag``."""
    if KERNELS["weighted_bag_sum"] and indices.device.type == "cpu" and not weights.requires_grad:
        return WeightedBagSum.apply(indices, table, offsets, weights)
    return F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)
