"""The HitAnno hierarchical transformer for scATAC-seq cell-type annotation.

A cell is ``n_types`` peak sets of ``P`` peaks each (the panel), every peak closed or
open. Level 1 encodes each ``[set token, P peak tokens]`` sequence, with weights shared
across sets, and keeps the set token's output as the set's summary; level 2 encodes
``[CLS, summaries]`` and keeps CLS as the cell embedding; a two-layer head gives the
logits. This is the published HitAnno model; ``linear_path`` and ``depth_signal`` are
additions beyond it (off by default).

Inputs are sparse: ``indptr [B+1]`` and ``positions [nnz]`` list each cell's *open*
panel positions ``t * P + j`` (what :meth:`SentenceStore.read_open` returns).

Level 1 has two paths that compute the same function:

* **dense** (here) — the textbook encoder over every token of every set, attention
  through SDPA or ``flash-attn``; any number of level-1 layers; the reference the tests
  compare with.
* **sparse** (:mod:`.sparse`, the default with one level-1 layer) — the set token's
  attention is the all-closed cell's attention corrected by a sum over the open peaks
  only: exact, at a cost per cell that follows its open peaks rather than ``n_types·P²``.

Design decisions (see ``docs/model.md``):

* peak tokens are ``LayerNorm(identity[p] + state[s])`` (BERT's embedding LayerNorm), set
  tokens ``LayerNorm(set[t])``; no position embedding, as a peak's identity already fixes
  its place in its set;
* no embedding dropout: it would make every cell's keys random and the sparse path inexact;
  hidden dropout sits where BERT has it (after the attention output projection and after
  the feed-forward); attention-probability dropout is 0 on both paths;
* the last layer of each level computes only the output that is used (set token, CLS).

The CPU speed kernels this uses (:mod:`.kernels`) are faster equivalents of plain torch
expressions, each with a switch that turns it off.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hitanno_cli.errors import UserError
from hitanno_cli.model import kernels, sparse
from hitanno_cli.model.attention import ATTENTION_CHOICES, AttentionFn, attention_for, attention_weights, sdpa_attention
from hitanno_cli.tfidf import SCALE

#: BERT's LayerNorm epsilon.
LAYER_NORM_EPS = 1e-12

#: The options that are sizes (positive integers).
_SIZES = (
    "n_types peaks_per_type embed_dim level1_heads level1_ff level1_layers level2_heads level2_ff level2_layers "
    "head_hidden"
).split()


@dataclass
class ModelConfig:
    """Every size of the model; the defaults are the published ones."""

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
    linear_path: bool = False  # beyond the published model: a linear read-out of the open peaks added to the logits
    linear_idf: bool = False  # weigh the linear path's open peaks by the reference's idf (TF-IDF)
    depth_signal: bool = False  # beyond the published model: tell level 2's CLS the cell's log open-peak count

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse sizes the model cannot be built with."""
        for name in _SIZES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(
                    f"model option {name} must be a positive integer, got {value!r}", f"set {name} to 1 or more"
                )
        for heads in ("level1_heads", "level2_heads"):
            if self.embed_dim % getattr(self, heads):
                raise UserError(
                    f"embed_dim {self.embed_dim} is not divisible by {heads} {getattr(self, heads)}",
                    "choose a head count that divides embed_dim",
                )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}", "pass e.g. --dropout 0.1")
        if self.attention not in ATTENTION_CHOICES:
            raise UserError(f"unknown attention {self.attention!r}", f"choose one of {', '.join(ATTENTION_CHOICES)}")
        if self.attention == "sparse" and self.level1_layers != 1:
            raise UserError(
                f"sparse attention needs exactly one level-1 layer, got {self.level1_layers}",
                "use --attention dense (or auto) for deeper level-1 stacks",
            )

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
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(
                f"unknown model config keys: {', '.join(unknown)}",
                "the model was written by a newer hitanno; upgrade hitanno",
            )
        missing = sorted(name for name in ("n_types", "peaks_per_type") if name not in d)
        if missing:
            raise UserError(f"model config lacks {', '.join(missing)}", "re-train the model")
        return cls(**d)


@dataclass
class ModelOutput:
    """What one forward pass returns."""

    logits: Tensor  # [B, n_types]
    embedding: Tensor  # [B, embed_dim], level-2 CLS output
    level1_attention: Tensor | None = None  # [B, n_types, P], set token → peaks
    level2_attention: Tensor | None = None  # [B, n_types + 1, n_types + 1], 0 = CLS


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

    def peak_tokens(self) -> Tensor:
        """Both normalised token vectors of every panel peak, ``[2, T*P, D]`` (closed, open)."""
        return torch.stack([self.peak_tokens_in(state) for state in (0, 1)])

    def peak_tokens_in(self, state: int) -> Tensor:
        """The normalised token of every panel peak in one state, ``[T*P, D]`` (0 closed, 1 open)."""
        return self.norm(self.identity.weight + self.state.weight[state])

    def set_tokens(self) -> Tensor:
        """The normalised set token of every cell type, ``[T, D]``."""
        return self.norm(self.set_token.weight)


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
        self.dropout = kernels.Dropout(dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        """``[N, S, D]`` → ``[N, H, S, D/H]``."""
        n, s, d = x.shape
        return x.view(n, s, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self, x: Tensor, attend: AttentionFn, first_only: bool = False, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
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

    def finish(self, x: Tensor, context: Tensor) -> Tensor:
        """Everything after attention: output projection, residuals, LayerNorms, FFN."""
        h = self.attn_norm(self.dropout.add_to(x, self.attn_out(context)))
        return self.ff_norm(self.dropout.add_to(h, self.ff_out(F.gelu(self.ff_in(h)))))

    def folded_query(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """For query tokens ``[N, …, D]``: ``W_kᵀ q / √d`` per head ``[N, H, D]`` and ``b_k·q / √d``
        ``[N, H]``, so that a token ``x``'s attention logit is ``x · folded + bias`` (no keys formed).

        The one fold behind level 2's one-query kernels and the sparse path's panel terms.
        """
        dim = tokens.shape[-1]
        h = self.heads
        d = dim // h
        scale = 1.0 / math.sqrt(d)
        q = self.query(tokens).view(-1, h, d)
        folded = torch.einsum("nhd,hde->nhe", q, self.key.weight.view(h, d, dim)) * scale
        bias = (q * self.key.bias.view(h, d)).sum(-1) * scale
        return folded, bias

    def first_token(self, x: Tensor, first: Tensor | None = None) -> Tensor:
        """Token 0's output ``[N, 1, D]``, as ``forward(x, first_only=True)``: :func:`.kernels.first_token`."""
        return kernels.first_token(self, x, first)

    def shared_query_token(self, cls: Tensor, others: Tensor) -> Tensor:
        """Token 0's output ``[N, 1, D]`` for ``[cls, others[n]]``, one ``cls [D]`` shared by all:
        :func:`.kernels.shared_query_token`."""
        return kernels.shared_query_token(self, cls, others)


class LinearPath(nn.Module):
    """Per-type logits linear in a cell's L2-normalised TF-IDF row (:mod:`hitanno_cli.tfidf` of
    its open peaks, ``log(1 + SCALE · idf_p / n_open)``): a "wide" path beside the transformer,
    like a logistic regression. With ``idf`` all ones (no idf) every open peak weighs
    ``1 / √n_open``; the trainer sets ``idf`` from the reference when ``linear_idf``."""

    def __init__(self, n_positions: int, n_types: int) -> None:
        super().__init__()
        self.weight = nn.EmbeddingBag(n_positions, n_types, mode="sum")
        nn.init.zeros_(self.weight.weight)
        self.register_buffer("idf", torch.ones(n_positions))

    def forward(self, indptr: Tensor, positions: Tensor) -> Tensor:
        n_open = (indptr[1:] - indptr[:-1]).clamp(min=1).to(self.idf.dtype)
        cells = sparse.cell_of_entries(indptr, positions.numel())
        values = torch.log1p(SCALE * self.idf[positions] / n_open[cells])
        norm = torch.zeros_like(n_open).index_add_(0, cells, values * values).sqrt().clamp(min=1e-12)
        weights = (values / norm[cells]).to(self.weight.weight.dtype)
        return kernels.weighted_bag_sum(positions, self.weight.weight, indptr[:-1], weights)


class HitAnno(nn.Module):
    """Hierarchical transformer: peak sets → set summaries → cell embedding → logits."""

    #: The sparse path's choice of rows to recompute exactly (replaceable, for tests).
    ill_conditioned_rows = staticmethod(sparse.ill_conditioned_rows)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.level1_attend: AttentionFn = attention_for(config.level1_path)  # refuses flash where it cannot run
        self.config = c = config
        d, p = c.embed_dim, c.dropout
        self.embed = TokenEmbedding(c.n_types, c.peaks_per_type, d)
        self.level1 = nn.ModuleList(EncoderLayer(d, c.level1_heads, c.level1_ff, p) for _ in range(c.level1_layers))
        self.cls = nn.Parameter(torch.randn(d) * 0.02)
        self.level2 = nn.ModuleList(EncoderLayer(d, c.level2_heads, c.level2_ff, p) for _ in range(c.level2_layers))
        self.head = nn.Sequential(nn.Linear(d, c.head_hidden), nn.ReLU(), nn.Linear(c.head_hidden, c.n_types))
        self.linear = LinearPath(self.n_positions, config.n_types) if config.linear_path else None
        self.depth = nn.Linear(1, d) if config.depth_signal else None
        if self.depth is not None:  # starts silent: the published model until it learns otherwise
            nn.init.zeros_(self.depth.weight)
            nn.init.zeros_(self.depth.bias)

    @property
    def n_positions(self) -> int:
        """Panel positions per cell, ``n_types * P``."""
        return self.config.n_types * self.config.peaks_per_type

    def forward(self, indptr: Tensor, positions: Tensor, return_attention: bool = False) -> ModelOutput:
        """Logits and embeddings of the cells whose open positions are given in CSR form.

        ``indptr``: LongTensor ``[B+1]``; ``positions``: LongTensor ``[nnz]`` of open
        panel positions ``t * P + j`` per cell, exactly what ``SentenceStore.read_open``
        returns. ``return_attention`` adds both levels' head-averaged attention.
        """
        sparse.check_open_positions(indptr, positions, self.n_positions)
        level1 = self.sparse_level1 if self.config.level1_path == "sparse" else self.dense_level1
        summaries, attn1 = level1(indptr, positions, return_attention)
        embedding, attn2 = self.encode_level2(summaries, return_attention, self.depth_term(indptr))
        logits = self.head(embedding)
        if self.linear is not None:
            logits = logits + self.linear(indptr, positions).to(logits.dtype)
        return ModelOutput(logits, embedding, attn1, attn2)

    def dense_level1(self, indptr: Tensor, positions: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Summaries ``[B, T, D]`` by running every level-1 layer over all tokens."""
        t, p = self.config.n_types, self.config.peaks_per_type
        b = indptr.numel() - 1
        states = sparse.dense_states(indptr, positions, self.n_positions).view(b * t, p, 1)
        tokens = self.embed.peak_tokens().view(2, 1, t, p, -1).expand(2, b, t, p, -1)
        closed, open_ = tokens.reshape(2, b * t, p, -1)
        peaks = torch.where(states, open_, closed)
        sets = self.embed.set_tokens().expand(b, t, -1).reshape(b * t, 1, -1)
        x = torch.cat([sets, peaks], dim=1)
        weights = None
        for i, layer in enumerate(self.level1):
            last = i == len(self.level1) - 1
            x, weights = layer(x, self.level1_attend, first_only=last, need_weights=last and need_weights)
        attn = weights[:, :, 0, 1:].mean(dim=1).view(b, t, p) if weights is not None else None
        return x[:, 0].view(b, t, -1), attn

    def sparse_level1(self, indptr: Tensor, positions: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Summaries ``[B, T, D]`` from the set-token attention corrected by open peaks only
        (one level-1 layer): :func:`.sparse.level1`, the panel terms cached for inference."""
        panel = sparse.cached_panel_terms(self)
        return sparse.level1(panel, self.level1[0], indptr, positions, need_weights, ill_rows=self.ill_conditioned_rows)

    def depth_term(self, indptr: Tensor) -> Tensor | None:
        """``[B, D]`` added to the CLS token: a learned direction times ``log(1 + n_open)``."""
        if self.depth is None:
            return None
        n_open = (indptr[1:] - indptr[:-1]).to(self.depth.weight.dtype)
        return self.depth(torch.log1p(n_open).unsqueeze(1))

    def encode_level2(
        self, summaries: Tensor, need_weights: bool, depth: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Cell embeddings ``[B, D]`` from ``[CLS, summaries]``; the last layer computes CLS only."""
        b = summaries.shape[0]
        if depth is None and not need_weights and len(self.level2) == 1:  # one CLS query shared by every cell
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
