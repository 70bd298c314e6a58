"""AttentionAE-sc: a denoising autoencoder fused with a GCN by cross-cell attention.

Layout as published: encoder ``n_input → 256 → 64 → 16`` (ReLU + BatchNorm on the two
hidden layers, Gaussian noise of σ 0.1 × |input| before each layer while training); a
two-layer GCN ``256 → 64 → 16`` (tanh) reading the encoder's first hidden layer over
the cell graph; multi-head attention whose **queries are GCN features and keys/values
autoencoder features**, with a residual connection, at the 64-d and the 16-d layer;
decoder ``16 → 64 → 256`` to the ZINB heads (mean: exp clamped to [1e-5, 1e4];
dispersion: softplus clamped to [1e-4, 1e3]; dropout: sigmoid, kept as a logit) or, for
scATAC-seq, to one Bernoulli logit per target peak. The graph decoder
``sigmoid(h hᵀ)`` acts on the GCN output and lives in :mod:`.losses`.

What differs from the published code is only *where the cells come from*: every
operation takes a batch of query cells. The GCN reads a sparse adjacency whose rows are
the batch and whose columns are ``[batch cells, other cells]``; features of the other
cells come from a cache (see :mod:`.trainer`). Attention runs across the cells of the
batch, or across an explicit key set at inference. When the batch is all cells, this is
the published full-batch computation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of an :class:`AttentionAE` (saved with its weights)."""

    n_input: int
    n_output: int
    likelihood: str = "zinb"  # "zinb" (scRNA-seq counts) or "bernoulli" (scATAC-seq, binary)
    n_enc_1: int = 256
    n_enc_2: int = 64
    n_z: int = 16
    n_dec_1: int = 64
    n_dec_2: int = 256
    n_heads: int = 8
    noise_sigma: float = 0.1
    attn_dropout: float = 0.2
    adjacency: str = "normalized"  # what the GCN reads: "normalized" or "raw" (published)

    def to_dict(self) -> dict:
        return asdict(self)


class GaussianNoise(nn.Module):
    """Additive Gaussian noise of standard deviation ``sigma · |x|`` while training."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.sigma:
            return x + torch.randn_like(x) * (self.sigma * x.detach())
        return x


class GraphConv(nn.Module):
    """``tanh(A · X · W)`` with a sparse (or dense) adjacency ``A``, as the published layer."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        support = x @ self.weight
        out = torch.sparse.mm(adj, support) if adj.is_sparse else adj @ support
        return torch.tanh(out)


class CrossCellAttention(nn.Module):
    """The published ``AttentionWide``: ``heads`` heads, each of the full width ``emb``;
    dropout on the queries; scaled dot-product attention across cells.

    ``forward(kv, q)``: keys and values from ``kv`` [n_keys, emb], queries from ``q``
    [n_queries, emb]; returns [n_queries, emb]. Runs through
    ``torch.nn.functional.scaled_dot_product_attention``, so no n_queries × n_keys
    matrix per head needs to be stored where a fused kernel exists.
    """

    def __init__(self, emb: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.emb, self.heads = emb, heads
        self.dropout = nn.Dropout(dropout)
        self.tokeys = nn.Linear(emb, emb * heads, bias=False)
        self.toqueries = nn.Linear(emb, emb * heads, bias=False)
        self.tovalues = nn.Linear(emb, emb * heads, bias=False)
        self.unifyheads = nn.Linear(heads * emb, emb)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[heads, n_keys, emb]`` (computed once for many query chunks)."""
        n, h, e = kv.shape[0], self.heads, self.emb
        keys = self.tokeys(kv).view(n, h, e).transpose(0, 1)
        values = self.tovalues(kv).view(n, h, e).transpose(0, 1)
        return keys, values

    def attend(self, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        n, h, e = q.shape[0], self.heads, self.emb
        queries = self.dropout(self.toqueries(q)).view(n, h, e).transpose(0, 1)
        out = F.scaled_dot_product_attention(queries.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0))
        return self.unifyheads(out.squeeze(0).transpose(0, 1).reshape(n, h * e))

    def forward(self, kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.project_kv(kv), q)


class Reconstruction(NamedTuple):
    """Decoder output: ZINB ``mean``, ``disp``, ``pi_logit``; or Bernoulli ``logit``."""

    mean: torch.Tensor | None = None
    disp: torch.Tensor | None = None
    pi_logit: torch.Tensor | None = None
    logit: torch.Tensor | None = None


class Output(NamedTuple):
    """One batch through the model."""

    z: torch.Tensor  # latent code [batch, n_z]
    e1: torch.Tensor  # encoder hidden layer 1 [batch, 256] (GCN input)
    h1: torch.Tensor  # GCN layer 1 [batch, 64]
    h2: torch.Tensor  # GCN layer 2 [batch, 16] (graph decoder input)
    recon: Reconstruction


class AttentionAE(nn.Module):
    """The AttentionAE-sc network; see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = self.config = config
        self.noise = GaussianNoise(c.noise_sigma)
        self.enc_1 = nn.Linear(c.n_input, c.n_enc_1)
        self.BN_1 = nn.BatchNorm1d(c.n_enc_1)
        self.enc_2 = nn.Linear(c.n_enc_1, c.n_enc_2)
        self.BN_2 = nn.BatchNorm1d(c.n_enc_2)
        self.z_layer = nn.Linear(c.n_enc_2, c.n_z)
        self.dec_1 = nn.Linear(c.n_z, c.n_dec_1)
        self.dec_2 = nn.Linear(c.n_dec_1, c.n_dec_2)
        if c.likelihood == "zinb":
            self.calcu_pi = nn.Linear(c.n_dec_2, c.n_output)
            self.calcu_disp = nn.Linear(c.n_dec_2, c.n_output)
            self.calcu_mean = nn.Linear(c.n_dec_2, c.n_output)
        elif c.likelihood == "bernoulli":
            self.calcu_logit = nn.Linear(c.n_dec_2, c.n_output)
        else:
            raise ValueError(f"unknown likelihood {c.likelihood!r}")
        self.gnn_1 = GraphConv(c.n_enc_1, c.n_enc_2)
        self.gnn_2 = GraphConv(c.n_enc_2, c.n_z)
        self.attn1 = CrossCellAttention(c.n_enc_2, c.n_heads, c.attn_dropout)
        self.attn2 = CrossCellAttention(c.n_z, c.n_heads, c.attn_dropout)

    # -- pieces ---------------------------------------------------------------------------
    def encode_1(self, x: torch.Tensor) -> torch.Tensor:
        return self.BN_1(F.relu(self.enc_1(self.noise(x))))

    def encode_2(self, e1: torch.Tensor) -> torch.Tensor:
        return self.BN_2(F.relu(self.enc_2(self.noise(e1))))

    def to_z(self, enc_h2: torch.Tensor) -> torch.Tensor:
        return self.z_layer(self.noise(enc_h2))

    def decode(self, z: torch.Tensor) -> Reconstruction:
        d = F.relu(self.dec_2(F.relu(self.dec_1(z))))
        if self.config.likelihood == "bernoulli":
            return Reconstruction(logit=self.calcu_logit(d))
        mean = torch.clamp(torch.exp(self.calcu_mean(d)), 1e-5, 1e4)
        disp = torch.clamp(F.softplus(self.calcu_disp(d)), 1e-4, 1e3)
        return Reconstruction(mean=mean, disp=disp, pi_logit=self.calcu_pi(d))

    # -- a batch --------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, adj: torch.Tensor, e1_out: torch.Tensor | None = None, h1_out: torch.Tensor | None = None
    ) -> Output:
        """One batch of cells.

        ``adj`` is ``[batch, batch + n_out]``: the graph rows of the batch cells, columns
        ordered as the batch cells then ``n_out`` other cells whose encoder features
        ``e1_out`` and GCN features ``h1_out`` are given (cached, without gradient).
        With the batch being all cells, ``n_out`` is 0 and this is the published forward.
        """
        e1 = self.encode_1(x)
        h1 = self.gnn_1(adj, e1 if e1_out is None else torch.cat([e1, e1_out]))
        h2 = self.gnn_2(adj, h1 if h1_out is None else torch.cat([h1, h1_out]))
        enc_h2 = self.encode_2(e1)
        enc_h2 = self.attn1(enc_h2, h1) + enc_h2
        z = self.to_z(enc_h2)
        z = self.attn2(z, h2) + z
        return Output(z, e1, h1, h2, self.decode(z))

    def cluster_parameters(self) -> list[nn.Parameter]:
        """What the clustering stage updates, as published: encoder, GCN, attention and
        latent layer (the decoder and BatchNorm affine parameters stay fixed)."""
        modules = [self.enc_1, self.enc_2, self.attn1, self.attn2, self.gnn_1, self.gnn_2, self.z_layer]
        return [p for m in modules for p in m.parameters()]
