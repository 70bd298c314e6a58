"""HitAnno run the way the published code ran it: the baseline of ``bench/throughput.py``.

BERT-style encoder layers with eager attention (explicit ``QKᵀ``, softmax, dropout on
the probabilities, ``·V``), BERT embeddings (word + token-type + position, LayerNorm,
dropout), float32, dense ``[B, T, P]`` state tensors, every token through every layer.
Same sizes as :class:`hitanno_cli.model.HitAnno` so the comparison is at equal model size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hitanno_cli.model import ModelConfig


class EagerBertLayer(nn.Module):
    """A post-LN BERT layer with explicit attention matrices (``[N, H, S, S]`` in memory)."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=1e-12)
        self.ff_in, self.ff_out = nn.Linear(dim, ff), nn.Linear(ff, dim)
        self.ff_norm = nn.LayerNorm(dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        split = lambda y: y.view(n, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        probs = self.dropout(scores.softmax(dim=-1))  # BERT's attention-probability dropout
        context = (probs @ v).transpose(1, 2).reshape(n, s, d)
        h = self.attn_norm(x + self.dropout(self.attn_out(context)))
        return self.ff_norm(h + self.dropout(self.ff_out(F.gelu(self.ff_in(h)))))


class ReferenceHitAnno(nn.Module):
    """The published computation: dense states in, eager BERT over every set, then over sets."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        t, p, d = config.n_types, config.peaks_per_type, config.embed_dim
        self.t, self.p = t, p
        self.word = nn.Embedding(t * p + t, d)  # panel peaks, then one set token per type
        self.token_type = nn.Embedding(2, d)  # closed / open
        self.position = nn.Embedding(p + 1, d)
        self.embed_norm = nn.LayerNorm(d, eps=1e-12)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.level1 = nn.ModuleList(
            EagerBertLayer(d, config.level1_heads, config.level1_ff, config.dropout)
            for _ in range(config.level1_layers)
        )
        self.cls = nn.Parameter(torch.randn(d) * 0.02)
        self.level2 = nn.ModuleList(
            EagerBertLayer(d, config.level2_heads, config.level2_ff, config.dropout)
            for _ in range(config.level2_layers)
        )
        self.head = nn.Sequential(nn.Linear(d, config.head_hidden), nn.ReLU(), nn.Linear(config.head_hidden, t))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T]`` from dense 0/1 states ``[B, T, P]``."""
        b, t, p = states.shape
        peak_ids = torch.arange(t * p, device=states.device).view(1, t, p).expand(b, t, p)
        set_ids = (t * p + torch.arange(t, device=states.device)).view(1, t, 1).expand(b, t, 1)
        ids = torch.cat([set_ids, peak_ids], dim=2).reshape(b * t, p + 1)
        types = torch.cat([torch.zeros_like(states[..., :1]), states], dim=2).reshape(b * t, p + 1).long()
        positions = torch.arange(p + 1, device=states.device)
        x = self.word(ids) + self.token_type(types) + self.position(positions)
        x = self.embed_dropout(self.embed_norm(x))
        for layer in self.level1:
            x = layer(x)
        summaries = x[:, 0].view(b, t, -1)
        y = torch.cat([self.cls.expand(b, 1, -1), summaries], dim=1)
        for layer in self.level2:
            y = layer(y)
        return self.head(y[:, 0])
