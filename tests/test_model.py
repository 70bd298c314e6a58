"""The HitAnno model: shapes, attention kernels, sparse = dense, learning, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hitanno_cli.errors import UserError
from hitanno_cli.model import (
    Dropout,
    EncoderLayer,
    HeadwiseProjection,
    HitAnno,
    ModelConfig,
    OpenSetContext,
    flash_unavailable_reason,
    open_sets,
    sdpa_attention,
)

T, P = 4, 12


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Tiny tensors run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides: object) -> ModelConfig:
    sizes = dict(
        n_types=T,
        peaks_per_type=P,
        embed_dim=16,
        level1_heads=4,
        level1_ff=24,
        level2_heads=2,
        level2_ff=20,
        head_hidden=8,
    )
    sizes.update(overrides)
    return ModelConfig(**sizes)  # type: ignore[arg-type]


def to_csr(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[B, T*P]`` states → ``(indptr, positions)`` as the store returns them."""
    rows, positions = states.nonzero(as_tuple=True)
    indptr = torch.zeros(states.shape[0] + 1, dtype=torch.long)
    indptr[1:] = torch.bincount(rows, minlength=states.shape[0]).cumsum(0)
    return indptr, positions


def random_states(n_cells: int, density: float, seed: int = 0) -> torch.Tensor:
    """Random sentences at ``density``, with an all-closed and an all-open cell in front."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.rand(n_cells, T * P, generator=gen) < density
    states[0] = False
    states[1] = True
    return states


def paired_models(dtype: torch.dtype, **overrides: object) -> tuple[HitAnno, HitAnno]:
    """The same weights under the sparse and the dense level-1 path, in eval mode."""
    torch.manual_seed(1)
    sparse = HitAnno(tiny_config(attention="sparse", **overrides)).to(dtype).eval()
    dense = HitAnno(tiny_config(attention="dense", **overrides)).to(dtype).eval()
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error relative to the reference's scale (gradients that are 0 in exact arithmetic,
    like the key bias's under softmax, compare against a floor)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# -- configuration ----------------------------------------------------------------------
def test_config_round_trips_and_refuses_unknown_keys() -> None:
    config = tiny_config(dropout=0.2, level1_layers=2)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.level1_path == "dense"
    assert tiny_config().level1_path == "sparse"
    with pytest.raises(UserError, match="unknown model config keys: colour"):
        ModelConfig.from_dict({**config.to_dict(), "colour": 1})


@pytest.mark.parametrize(
    "bad",
    [
        dict(embed_dim=18),
        dict(level1_layers=0),
        dict(dropout=1.0),
        dict(attention="fast"),
        dict(attention="sparse", level1_layers=2),
    ],
)
def test_config_refuses_impossible_sizes(bad: dict) -> None:
    with pytest.raises(UserError):
        tiny_config(**bad)


def test_flash_without_flash_attn_or_cuda_says_why() -> None:
    reason = flash_unavailable_reason()
    if reason is None:
        pytest.skip("flash-attn and CUDA are both available here")
    with pytest.raises(UserError, match="flash is unavailable: .*(flash-attn|CUDA)"):
        HitAnno(tiny_config(attention="flash"))


def test_malformed_batches_are_refused() -> None:
    model = HitAnno(tiny_config())
    with pytest.raises(UserError, match=r"\[0, 48\)"):
        model(torch.tensor([0, 1]), torch.tensor([T * P]))
    with pytest.raises(UserError, match="indptr spans"):
        model(torch.tensor([0, 2]), torch.tensor([1]))
    with pytest.raises(UserError, match="int64"):
        model(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))


# -- shapes and masking -------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_shapes_and_attention_rows(attention: str) -> None:
    model = HitAnno(tiny_config(attention=attention)).eval()
    indptr, positions = to_csr(random_states(5, 0.3))
    out = model(indptr, positions, return_attention=True)
    assert out.logits.shape == (5, T)
    assert out.embedding.shape == (5, 16)
    assert out.level1_attention.shape == (5, T, P)
    assert out.level2_attention.shape == (5, T + 1, T + 1)
    # level 2 rows are full distributions; level 1 leaves the set token's self-attention out
    assert torch.allclose(out.level2_attention.sum(-1), torch.ones(5, T + 1), atol=1e-5)
    row_sums = out.level1_attention.sum(-1)
    assert bool((row_sums > 0.5).all() and (row_sums < 1).all())
    plain = model(indptr, positions)
    assert plain.level1_attention is None and plain.level2_attention is None
    assert torch.allclose(plain.logits, out.logits, atol=1e-6)


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_level1_sees_only_its_own_set_and_level2_sees_all(attention: str) -> None:
    """Opening a peak of set 2 changes set 2's summary only, but changes the embedding."""
    model = HitAnno(tiny_config(attention=attention)).double().eval()
    states = random_states(3, 0.2)
    flipped = states.clone()
    flipped[:, 2 * P + 5] = ~flipped[:, 2 * P + 5]
    level1 = model.sparse_level1 if attention == "sparse" else model.dense_level1
    before, _ = level1(*to_csr(states), False)
    after, _ = level1(*to_csr(flipped), False)
    changed = (before - after).abs().amax(dim=-1) > 1e-12  # [B, T]
    assert changed[:, 2].all() and not changed[:, [0, 1, 3]].any()
    assert not torch.allclose(model(*to_csr(states)).embedding, model(*to_csr(flipped)).embedding)


def test_cell_results_do_not_depend_on_batch_neighbours() -> None:
    model = HitAnno(tiny_config()).eval()
    states = random_states(6, 0.3)
    together = model(*to_csr(states)).logits
    alone = torch.cat([model(*to_csr(states[i : i + 1])).logits for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-6)


# -- attention kernel ---------------------------------------------------------------------
def test_sdpa_equals_explicit_softmax_attention() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 9, 8) for _ in range(3))
    explicit = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    assert (sdpa_attention(q, k, v) - explicit).abs().max() < 1e-5


def test_encoder_layer_with_sdpa_equals_explicit_layer() -> None:
    torch.manual_seed(0)
    layer = EncoderLayer(16, 4, 24, dropout=0.0).eval()
    x = torch.randn(3, 7, 16)

    def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v

    full, _ = layer(x, sdpa_attention)
    reference, _ = layer(x, explicit)
    first, _ = layer(x, sdpa_attention, first_only=True)
    assert (full - reference).abs().max() < 1e-5
    assert (first[:, 0] - full[:, 0]).abs().max() < 1e-5


# -- the sparse path is the dense path ----------------------------------------------------
def test_attention_map_in_blocks_of_cells_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """The level-1 map is drawn a few cells at a time (bounded memory at many types): the
    same map, cells with no open peak included."""
    import hitanno_cli.model.sparse as sparse_path

    sparse, _ = paired_models(torch.float32)
    states = random_states(7, 0.2, seed=5)
    states[3] = False
    indptr, positions = to_csr(states)
    whole = sparse(indptr, positions, return_attention=True).level1_attention
    heads = sparse.config.level1_heads
    monkeypatch.setattr(sparse_path, "ATTENTION_BLOCK_VALUES", 2 * T * P * heads)  # two cells per block
    blocked = sparse(indptr, positions, return_attention=True).level1_attention
    assert blocked.shape == (7, T, P)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=0)


@pytest.mark.parametrize("density", [0.0, 0.02, 0.3, 0.9, 1.0])
def test_sparse_equals_dense_outputs_float32(density: float) -> None:
    sparse, dense = paired_models(torch.float32)
    indptr, positions = to_csr(random_states(8, density, seed=int(density * 100)))
    a = sparse(indptr, positions, return_attention=True)
    b = dense(indptr, positions, return_attention=True)
    for name in ("logits", "embedding", "level1_attention", "level2_attention"):
        assert rel_err(getattr(a, name), getattr(b, name)) <= 1e-5, name


@pytest.mark.parametrize("density", [0.05, 0.5])
def test_sparse_equals_dense_gradients_float64(density: float) -> None:
    sparse, dense = paired_models(torch.float64)
    indptr, positions = to_csr(random_states(6, density, seed=3))
    labels = torch.arange(6) % T
    for model in (sparse, dense):
        F.cross_entropy(model(indptr, positions).logits, labels).backward()
    grads = dict(dense.named_parameters())
    for name, param in sparse.named_parameters():
        assert param.grad is not None and grads[name].grad is not None, name
        assert rel_err(param.grad, grads[name].grad) <= 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_path_is_stable_with_large_attention_logits(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits of hundreds overflow a naive exp and make the closed-sum correction cancel;
    the stabiliser and the exact recomputation of ill-conditioned rows keep both equal."""
    sparse, dense = paired_models(dtype)
    with torch.no_grad():
        for model in (sparse, dense):
            model.level1[0].query.weight.mul_(300.0)
            model.embed.state.weight.mul_(50.0)
    indptr, positions = to_csr(random_states(6, 0.3))
    a = sparse(indptr, positions, return_attention=True)
    b = dense(indptr, positions, return_attention=True)
    assert torch.isfinite(a.logits).all()
    for name in ("logits", "level1_attention"):
        assert rel_err(getattr(a, name), getattr(b, name)) <= 1e-5, name
    if dtype == torch.float32:
        return  # float32 gradients at logits of hundreds are noisy on the dense path too
    labels = torch.arange(6) % T
    for model in (sparse, dense):
        F.cross_entropy(model(indptr, positions).logits, labels).backward()
    grads = dict(dense.named_parameters())
    for name, param in sparse.named_parameters():
        assert torch.isfinite(param.grad).all(), name
        if name.endswith("key.bias"):
            continue  # softmax ignores a key bias: its exact gradient is 0, both give noise
        assert rel_err(param.grad, grads[name].grad) <= 1e-5, name
    # the exact recomputation of ill-conditioned rows is what saves it: without it,
    # the closed-sum correction cancels catastrophically even in float64
    monkeypatch.setattr(
        HitAnno, "ill_conditioned_rows", staticmethod(lambda z, _: torch.zeros(z.shape[0], dtype=torch.bool))
    )
    assert not rel_err(sparse(indptr, positions).logits, b.logits) <= 1e-3  # wrong or NaN


def test_sparse_matches_dense_with_hidden_dropout_in_training() -> None:
    """Hidden dropout stays on in training; with the same RNG both paths drop alike."""
    sparse, dense = paired_models(torch.float64, dropout=0.3)
    sparse.train(), dense.train()
    indptr, positions = to_csr(random_states(4, 0.3))
    torch.manual_seed(7)
    a = sparse(indptr, positions).logits
    torch.manual_seed(7)
    b = dense(indptr, positions).logits
    torch.manual_seed(8)
    c = sparse(indptr, positions).logits
    assert rel_err(a, b) <= 1e-10
    assert not torch.allclose(a, c)


def test_deeper_level1_stack_runs_dense() -> None:
    model = HitAnno(tiny_config(level1_layers=2, level2_layers=2)).eval()
    out = model(*to_csr(random_states(3, 0.3)), return_attention=True)
    assert out.logits.shape == (3, T) and out.level1_attention.shape == (3, T, P)


# -- it learns ----------------------------------------------------------------------------
def test_tiny_model_overfits_a_tiny_synthetic_set() -> None:
    torch.manual_seed(0)
    n = 32
    labels = torch.arange(n) % T
    states = torch.rand(n, T, P) < 0.1
    for i, label in enumerate(labels):  # each type opens a few of its own set's peaks
        states[i, label, torch.randperm(P)[:4]] = True
    indptr, positions = to_csr(states.view(n, -1))
    model = HitAnno(tiny_config(dropout=0.0))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        optimiser.zero_grad()
        F.cross_entropy(model(indptr, positions).logits, labels).backward()
        optimiser.step()
    model.eval()
    assert bool((model(indptr, positions).logits.argmax(-1) == labels).all())


def test_inference_reuses_panel_terms_until_a_parameter_changes() -> None:
    torch.manual_seed(0)
    model = HitAnno(
        ModelConfig(
            n_types=3,
            peaks_per_type=20,
            embed_dim=16,
            level1_heads=2,
            level2_heads=2,
            level1_ff=16,
            level2_ff=16,
            head_hidden=8,
        )
    ).eval()
    indptr = torch.tensor([0, 3, 5])
    positions = torch.tensor([0, 21, 45, 7, 59])
    fresh = model(indptr, positions).logits.detach()  # gradients on: computed afresh
    with torch.no_grad():
        first = model(indptr, positions).logits
        assert model._panel_cache is not None
        cached = model._panel_cache[1]
        again = model(indptr, positions).logits
        assert model._panel_cache[1] is cached  # reused, not recomputed
        torch.testing.assert_close(first, fresh)
        torch.testing.assert_close(again, fresh)
        model.embed.identity.weight.add_(torch.randn_like(model.embed.identity.weight))  # in place, as an optimiser
        changed = model(indptr, positions).logits
    assert model._panel_cache[1] is not cached and not torch.allclose(changed, fresh)


def test_depth_signal_moves_the_cls_token_by_open_peak_count_on_both_paths() -> None:
    sparse, dense = paired_models(torch.float32, depth_signal=True, linear_path=True)
    states = random_states(6, 0.3, seed=5)
    silent = sparse(*to_csr(states)).logits  # zero-initialised: no effect yet
    with torch.no_grad():
        for model in (sparse, dense):
            torch.nn.init.constant_(model.depth.weight, 0.5)
    loud_sparse, loud_dense = sparse(*to_csr(states)).logits, dense(*to_csr(states)).logits
    assert rel_err(loud_sparse, loud_dense) <= 1e-5
    assert not torch.allclose(silent, loud_sparse, atol=1e-4)
    expected = sparse.depth(torch.log1p(states.sum(1, keepdim=True).float()))
    assert torch.allclose(sparse.depth_term(to_csr(states)[0]), expected)


def test_sparse_path_accepts_open_positions_in_any_order_within_a_cell() -> None:
    sparse, dense = paired_models(torch.float32)
    indptr, positions = to_csr(random_states(5, 0.3, seed=7))
    shuffled = positions.clone()
    gen = torch.Generator().manual_seed(0)
    for lo, hi in zip(indptr[:-1].tolist(), indptr[1:].tolist(), strict=True):
        shuffled[lo:hi] = positions[lo:hi][torch.randperm(hi - lo, generator=gen)]
    assert not torch.equal(shuffled, positions)
    reference = dense(indptr, positions).logits
    assert rel_err(sparse(indptr, shuffled).logits, reference) <= 1e-5
    assert rel_err(sparse(indptr, positions).logits, reference) <= 1e-5


def test_first_token_equals_full_layer_output_and_gradients() -> None:
    """The folded one-query attention of level 2 is the layer's token-0 output, exactly."""
    torch.manual_seed(0)
    layer = EncoderLayer(32, 4, 16, dropout=0.0)
    x = torch.randn(5, 9, 32, requires_grad=True)
    full, _ = layer(x, sdpa_attention, first_only=True)
    grad_full = torch.autograd.grad(full.square().sum(), [x, *layer.parameters()], allow_unused=True)
    folded = layer.first_token(x)
    grad_folded = torch.autograd.grad(folded.square().sum(), [x, *layer.parameters()], allow_unused=True)
    assert folded.shape == (5, 1, 32) and rel_err(folded, full) <= 1e-5
    scale = max(float(g.abs().max()) for g in grad_full if g is not None)
    for a, b in zip(grad_folded, grad_full, strict=True):  # the key bias's is 0 in exact arithmetic: absolute floor
        if b is not None:
            assert float((a - b).abs().max()) <= 1e-5 * scale
    first = x[:, :1].detach().clone().requires_grad_()  # given unsliced, the same function
    assert rel_err(layer.first_token(torch.cat([first, x[:, 1:]], dim=1), first=first), full) <= 1e-5
    cls = torch.randn(32).expand(5, 1, 32)  # one token shared by all (level 2's CLS): the one-GEMM branch
    shared_x = torch.cat([cls, x[:, 1:]], dim=1)
    expected, _ = layer(shared_x, sdpa_attention, first_only=True)
    got = layer.first_token(shared_x, first=cls)
    assert rel_err(got, expected) <= 1e-5
    params = list(layer.parameters())
    g_expected = torch.autograd.grad(expected.square().sum(), [x, *params], allow_unused=True)
    g_got = torch.autograd.grad(got.square().sum(), [x, *params], allow_unused=True)
    scale = max(float(g.abs().max()) for g in g_expected if g is not None)
    for a, b in zip(g_got, g_expected, strict=True):
        if b is not None:
            assert float((a - b).abs().max()) <= 1e-5 * scale


def test_dropout_rate_scale_and_reproducibility() -> None:
    drop = Dropout(0.25)
    x = torch.ones(400, 500)
    torch.manual_seed(3)
    a = drop(x)
    assert abs(float((a == 0).float().mean()) - 0.25) < 0.005  # the requested share is dropped
    assert abs(float(a.mean()) - 1.0) < 0.01  # and the survivors are scaled to keep the mean
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)  # seeded by torch's generator: runs reproduce
    assert not torch.equal(drop(x), a)  # and each call draws a new mask
    drop.eval()
    assert drop(x) is x
    y = torch.ones(10, requires_grad=True)
    drop.train()
    out = drop(y)
    out.sum().backward()
    assert torch.equal(y.grad, out.detach())  # gradient passes through the same mask and scale
    residual = torch.randn(400, 500)
    torch.manual_seed(4)
    fused = drop.add_to(residual, x)  # residual + dropout(x) in one pass: the same mask
    torch.manual_seed(4)
    assert torch.allclose(fused, residual + drop(x))


@pytest.mark.parametrize("n_types, peaks", [(4, 12), (3, 11_000)])  # int16 and int32 sort keys
def test_open_set_context_equals_the_dense_computation_and_its_gradients(n_types: int, peaks: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n_positions, heads, d = n_types * peaks, 2, 3
    states = torch.rand(6, n_positions, generator=gen) < min(0.3, 40 / n_positions)
    states[2] = False  # a cell with nothing open
    indptr, positions = to_csr(states)
    sets = open_sets(indptr, positions, n_types, peaks)
    dense = torch.zeros(sets.n_rows, n_positions, dtype=torch.float64)
    dense[sets.rows, sets.positions] = 1
    assert torch.equal(
        dense,
        states.double().repeat_interleave(n_types, 0)
        * torch.eye(n_types, dtype=torch.float64).repeat_interleave(peaks, 1).repeat(6, 1),
    )
    table = torch.randn(6 * n_types, 5, generator=gen, dtype=torch.float64)
    assert torch.allclose(sets.transposed_sum(table), dense.T @ table)
    width = 2 * heads + heads * d  # Z | N | the cancellation measure (no gradient)
    deltas = (torch.rand(n_positions, width, generator=gen, dtype=torch.float64) * 0.1).requires_grad_()
    closed = (torch.rand(n_types, width, generator=gen, dtype=torch.float64) + 1.0).requires_grad_()
    flag_row_4 = lambda z, _: torch.arange(z.shape[0]) == 4  # noqa: E731 (one flagged row: Z held constant)
    context, ill = OpenSetContext.apply(sets, deltas, closed, heads, flag_row_4)
    sums = dense @ deltas + closed.repeat(6, 1)
    z = torch.where(ill.unsqueeze(-1), torch.ones(()), sums[:, :heads])
    expected = sums[:, heads:-heads].reshape(-1, heads, d) / z.unsqueeze(-1)
    assert ill.tolist() == [r == 4 for r in range(6 * n_types)] and torch.allclose(context, expected)
    grad = torch.randn(context.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(context, (deltas, closed), grad)
    want = torch.autograd.grad(expected, (deltas, closed), grad)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-10)


def test_headwise_projection_equals_einsum_values_and_gradients() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, 6, generator=gen, requires_grad=True)
    weight = torch.randn(4, 3, 6, generator=gen, requires_grad=True)
    grad = torch.randn(7, 4, 3, generator=gen)
    expected = torch.einsum("nhe,hde->nhd", x, weight)
    got = HeadwiseProjection.apply(x, weight)
    assert torch.allclose(got, expected)
    for a, b in zip(
        torch.autograd.grad(got, (x, weight), grad), torch.autograd.grad(expected, (x, weight), grad), strict=True
    ):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --precision bf16: low-precision gradient, fp32 leaves
        out = HeadwiseProjection.apply(x, weight)
    grads = torch.autograd.grad(out.float().square().sum(), (x, weight))
    assert out.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.float32, torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_query_token_equals_the_full_layer_output_and_gradients(dtype: torch.dtype) -> None:
    """Level 2's fused CPU kernel (one CLS shared by every cell) is the layer's token-0 output."""
    torch.manual_seed(0)
    layer = EncoderLayer(32, 4, 16, dropout=0.0).to(dtype)
    cls = torch.randn(32, dtype=dtype, requires_grad=True)
    others = torch.randn(6, 9, 32, dtype=dtype, requires_grad=True)
    full, _ = layer(torch.cat([cls.expand(6, 1, 32), others], dim=1), sdpa_attention, first_only=True)
    got = layer.shared_query_token(cls, others)
    assert got.shape == (6, 1, 32) and rel_err(got, full) <= 1e-5
    inputs = [cls, others, *layer.parameters()]
    weights = torch.randn(full.shape, dtype=dtype)  # a loss that weighs every output differently
    expected = torch.autograd.grad((full * weights).sum(), inputs, allow_unused=True)
    grads = torch.autograd.grad((got * weights).sum(), inputs, allow_unused=True)
    scale = max(float(g.abs().max()) for g in expected if g is not None)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    for a, b in zip(grads, expected, strict=True):  # the key bias's is 0 in exact arithmetic: an absolute floor
        assert (a is None) == (b is None)
        if b is not None:
            assert float((a - b).abs().max()) <= tolerance * scale
