"""The exact sparse level-1 path: a cell's set-token attention from its open peaks only.

With one level-1 layer only the set token's output is used, and its query, and every
peak's key and value in either state, do not depend on the cell: they are computed once
per call for the whole panel (:class:`PanelTerms`). Per set ``t`` and head ``h``, with
``e_s,p = exp(q_t·K_s,p/√d − m_t,h)`` for peak ``p`` in state ``s`` (0 closed, 1 open)::

    Z = Z_closed + Σ_open (e1 − e0)      N = N_closed + Σ_open (e1·V1 − e0·V0)      context = N / Z

where ``Z_closed`` and ``N_closed`` are the all-closed cell's softmax denominator and
numerator. A cell's cost follows its open peaks, not ``n_types·P²``. Rows whose open
peaks held almost all of the closed mass lose precision to cancellation; they are
recomputed by a direct softmax (:func:`exact_rows`). The result is the dense path's.

Inputs are CSR: ``indptr [B+1]`` and ``positions [nnz]`` of each cell's open panel
positions ``t * P + j``; the helpers for them live here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from hitanno_cli.errors import UserError
from hitanno_cli.model.kernels import open_set_context, transposed_bag_sum

if TYPE_CHECKING:
    from hitanno_cli.model.model import EncoderLayer, HitAnno, TokenEmbedding

#: A row whose ``Z_closed + Σ_open e0`` exceeds this multiple of its ``Z`` would lose more
#: than ~1e-6 relative precision (float32) to cancellation; such rows are recomputed directly.
CANCELLATION_LIMIT = 16.0


# -- CSR batches of open positions -------------------------------------------------------
def check_open_positions(indptr: Tensor, positions: Tensor, n_positions: int) -> None:
    """Refuse a malformed CSR batch (wrong dtype, lengths, or positions off the panel)."""
    if indptr.dim() != 1 or positions.dim() != 1 or indptr.numel() < 1:
        raise UserError(
            "open positions must be 1-d CSR tensors (indptr [B+1], positions [nnz])",
            "pass what SentenceStore.read_open returns",
        )
    if indptr.dtype != torch.long or positions.dtype != torch.long:
        raise UserError("indptr and positions must be int64 tensors", "convert with .long()")
    if int(indptr[0]) != 0 or int(indptr[-1]) != positions.numel():
        raise UserError(
            f"indptr spans {int(indptr[-1]) - int(indptr[0])} entries but there are {positions.numel()} positions",
            "pass a consistent CSR pair",
        )
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n_positions):
        raise UserError(f"open positions must lie in [0, {n_positions})", "encode the data through this model's panel")


def cell_of_entries(indptr: Tensor, nnz: int) -> Tensor:
    """For CSR ``indptr``, the row (cell) index of each of its ``nnz`` entries."""
    counts = indptr[1:] - indptr[:-1]
    rows = torch.arange(counts.numel(), device=indptr.device)
    return torch.repeat_interleave(rows, counts, output_size=nnz)


def dense_states(indptr: Tensor, positions: Tensor, n_positions: int) -> Tensor:
    """CSR open positions → boolean ``[B, n_positions]`` states (True = open)."""
    states = torch.zeros(indptr.numel() - 1, n_positions, dtype=torch.bool, device=positions.device)
    states[cell_of_entries(indptr, positions.numel()), positions] = True
    return states


@dataclass
class OpenSets:
    """The 0/1 matrix ``S [B*T, T*P]`` with a one at (cell·T + set, position) per open peak,
    in CSR form: row ``r``'s entries are ``positions[offsets[r]:offsets[r + 1]]``.

    ``S · table`` sums a per-position table over each (cell, set)'s open peaks, as an
    ``embedding_bag`` sum: on the CPU a faster equivalent of a CSR sparse product, with
    the same sums bit for bit.
    """

    offsets: Tensor  # [B*T + 1]
    rows: Tensor  # [nnz]: each entry's row, ascending
    positions: Tensor  # [nnz]: each entry's panel position, ascending within a row
    n_positions: int

    @property
    def n_rows(self) -> int:
        return self.offsets.numel() - 1

    def sum(self, table: Tensor) -> Tensor:
        """``S · table`` ``[B*T, width]`` for ``table [T*P, width]``."""
        return F.embedding_bag(self.positions, table, self.offsets[:-1], mode="sum")

    def transposed_sum(self, table: Tensor) -> Tensor:
        """``Sᵀ · table`` ``[T*P, width]`` for ``table [B*T, width]``: :func:`transposed_bag_sum`."""
        return transposed_bag_sum(self.rows, self.positions, table, self.n_positions)


def open_sets(indptr: Tensor, positions: Tensor, n_types: int, peaks_per_type: int) -> OpenSets:
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


# -- the panel's cell-independent terms --------------------------------------------------
@dataclass
class PanelTerms:
    """Cell-independent sparse-path quantities: closed sums and per-peak open−closed deltas."""

    set_tokens: Tensor  # [T, D]
    z_closed: Tensor  # [T, H] all-closed softmax denominators
    closed: Tensor  # [T, H + D + H]: Z_closed | N_closed | Z_closed (no grad)
    deltas: Tensor  # [T*P, H + D + H]: e1 − e0 | e1·V1 − e0·V0 | e0 (no grad), per peak
    logits_closed: Tensor  # [T, P, H] set-token query · closed peak keys / √d
    logits_open: Tensor  # [T, P, H] the same for open peaks
    self_logit: Tensor  # [T, H] set-token query · its own key / √d
    values_closed: Tensor  # [T, P, H, d] closed peak values
    values_open: Tensor  # [T, P, H, d] open peak values
    self_value: Tensor  # [T, H, d]

    @property
    def panel_shape(self) -> tuple[int, int]:
        """``(T, P)``: peak sets and peaks per set."""
        return self.logits_closed.shape[0], self.logits_closed.shape[1]


def panel_terms(embed: TokenEmbedding, layer: EncoderLayer) -> PanelTerms:
    """The cell-independent quantities of the sparse path for the whole panel, in float32 or wider.

    The closed and open states are kept as separate tensors (not one stacked ``[2, …]``
    tensor): slicing a stack costs a zero-filled gradient per slice.
    """
    t = embed.set_token.num_embeddings
    p = embed.identity.num_embeddings // t
    h = layer.heads
    with torch.autocast(device_type=embed.set_token.weight.device.type, enabled=False):
        sets = embed.set_tokens()  # [T, D]
        d = sets.shape[-1] // h
        folded, bias = layer.folded_query(sets)  # a token x's logit is x · folded + bias: no keys formed
        self_logit = torch.einsum("te,the->th", sets, folded) + bias  # [T, H]
        tokens = [embed.peak_tokens_in(state) for state in (0, 1)]  # closed, open: [T*P, D]
        logits = [torch.einsum("tpe,the->tph", x.view(t, p, -1), folded) + bias[:, None] for x in tokens]
        with torch.no_grad():  # the shared stabiliser; max(dim) reduces [T, P, H] faster than amax on the CPU
            m = torch.maximum(torch.maximum(logits[0].max(dim=1).values, logits[1].max(dim=1).values), self_logit)
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
            deltas=torch.cat(
                [(e1 - e0).reshape(t * p, h), delta_n.reshape(t * p, h * d), e0.reshape(t * p, h).detach()], dim=1
            ),
            logits_closed=logits[0],
            logits_open=logits[1],
            self_logit=self_logit,
            values_closed=v0,
            values_open=v1,
            self_value=v_self,
        )


def cached_panel_terms(model: HitAnno) -> PanelTerms:
    """``model``'s panel terms, computed once and reused while no gradient is taken and no
    parameter has changed (inference), else afresh (training needs their graph)."""
    if torch.is_grad_enabled():
        model._panel_cache = None
        return panel_terms(model.embed, model.level1[0])
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cache = getattr(model, "_panel_cache", None)
    if cache is None or cache[0] != key:
        cache = (key, panel_terms(model.embed, model.level1[0]))
        model._panel_cache = cache
    return cache[1]


# -- the path ----------------------------------------------------------------------------
def ill_conditioned_rows(z: Tensor, cancelled: Tensor) -> Tensor:
    """(cell, set) rows whose ``Z`` lost precision to ``Z_closed − Σ_open e0`` cancellation.

    ``cancelled = Z_closed + Σ_open e0`` bounds the rounding error of ``Z`` (up to
    machine epsilon); a row whose open peaks held almost all of the closed-state mass, or
    whose mass underflowed the shared stabiliser, is recomputed exactly.
    """
    return ((cancelled > CANCELLATION_LIMIT * z) | ~(z > 0)).any(dim=-1)


def level1(
    panel: PanelTerms,
    layer: EncoderLayer,
    indptr: Tensor,
    positions: Tensor,
    need_weights: bool,
    *,
    ill_rows: Callable[[Tensor, Tensor], Tensor] = ill_conditioned_rows,
) -> tuple[Tensor, Tensor | None]:
    """Set summaries ``[B, T, D]`` of a CSR batch (and with ``need_weights`` the attention map).

    One sum over the batch's open peaks gives ``Z``, ``N`` and the closed mass they remove
    (which measures the cancellation); ``ill_rows`` picks the rows to recompute exactly.
    """
    t, p = panel.panel_shape
    b = indptr.numel() - 1
    indicator = open_sets(indptr, positions, t, p)
    h = panel.z_closed.shape[-1]
    with torch.autocast(device_type=positions.device.type, enabled=False):
        context, ill = open_set_context(indicator, panel.deltas, panel.closed, h, ill_rows)
        if bool(ill.any()):
            context = exact_rows(panel, context, ill, indicator.rows, indicator.positions)
    sets = panel.set_tokens.expand(b, t, -1)
    summaries = layer.finish(sets, context.reshape(b, t, -1).to(sets.dtype))
    attn = attention_map(panel, indptr, positions) if need_weights else None
    return summaries, attn


def exact_rows(panel: PanelTerms, context: Tensor, ill: Tensor, rows: Tensor, positions: Tensor) -> Tensor:
    """Replace the ``ill`` rows of ``context [B*T, H, d]`` by a direct softmax over their set."""
    t, p = panel.panel_shape
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
    exact = (
        scores[:, 0].unsqueeze(-1) * panel.self_value[sets]
        + torch.einsum("rph,rphd->rhd", peak_weights, v_closed)
        + torch.einsum("rph,rphd->rhd", peak_weights * states.unsqueeze(-1), v_open - v_closed)
    )
    return context.index_put((ill_rows,), exact)


#: Cells per block of :func:`attention_map`, so its ``[cells, T, P, H]`` temporaries stay
#: within ~2**23 values whatever the panel's size.
ATTENTION_BLOCK_VALUES = 1 << 23


def attention_map(panel: PanelTerms, indptr: Tensor, positions: Tensor) -> Tensor:
    """Set-token → peak attention ``[B, T, P]`` (mean over heads), densely, a block of cells at a time."""
    t, p = panel.panel_shape
    b = indptr.numel() - 1
    h = panel.logits_open.shape[-1]
    step = max(1, ATTENTION_BLOCK_VALUES // (t * p * h))
    blocks = []
    for lo in range(0, b, step):
        hi = min(b, lo + step)
        block_positions = positions[int(indptr[lo]) : int(indptr[hi])]
        blocks.append(_attention_block(panel, indptr[lo : hi + 1] - indptr[lo], block_positions))
    return torch.cat(blocks) if blocks else panel.logits_open.new_zeros(0, t, p)


def _attention_block(panel: PanelTerms, indptr: Tensor, positions: Tensor) -> Tensor:
    t, p = panel.panel_shape
    b = indptr.numel() - 1
    states = dense_states(indptr, positions, t * p).view(b, t, p, 1)
    logits = torch.where(states, panel.logits_open, panel.logits_closed)  # [B, T, P, H]
    own = panel.self_logit.expand(b, t, -1).unsqueeze(2)
    scores = torch.cat([own, logits], dim=2).softmax(dim=2)
    return scores[:, :, 1:].mean(dim=-1)
