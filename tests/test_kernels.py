"""The CPU speed kernels: each equals the plain torch expression it replaces, and its switch works."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hitanno_cli.errors import UserError
from hitanno_cli.model import HitAnno, ModelConfig, kernels, open_sets, sdpa_attention
from hitanno_cli.model.kernels import KERNELS, Dropout, parse_plain_kernels, plain_kernels
from hitanno_cli.model.model import EncoderLayer

#: float64 tolerances: the kernels and their plain expressions differ only in rounding.
TIGHT = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def graph_ops(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``tensor`` was computed through (which kernels ran)."""
    names, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def assert_same_function(fn, inputs: list[torch.Tensor], kernel: str, marker: str, **tolerance: float) -> None:
    """``fn(*inputs)`` with ``kernel`` on and off: close values and gradients (for a loss weighing
    every output differently), and ``marker`` in the autograd graph only with the kernel on."""
    gen = torch.Generator().manual_seed(9)
    results = {}
    for on in (True, False):
        with plain_kernels() if on else plain_kernels(kernel):
            out = fn(*inputs)
        weights = torch.randn(out.shape, generator=gen, dtype=out.dtype) if not results else results[True][2]
        grads = torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True)
        results[on] = (out, grads, weights)
        assert any(marker in op for op in graph_ops(out)) == on, (kernel, on)
    (got, got_grads, _), (want, want_grads, _) = results[True], results[False]
    torch.testing.assert_close(got, want, **tolerance)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, **tolerance)


# -- the switches ------------------------------------------------------------------------
def test_parse_plain_kernels_reads_names_and_all_and_refuses_unknown_names() -> None:
    assert parse_plain_kernels("") == frozenset()
    assert parse_plain_kernels(" dropout, First_Token ,") == {"dropout", "first_token"}
    assert parse_plain_kernels("all") == set(KERNELS) == parse_plain_kernels("dropout,ALL")
    with pytest.raises(UserError, match="unknown kernel dropuot.*HITANNO_PLAIN_KERNELS"):
        parse_plain_kernels("dropout,dropuot")


def test_plain_kernels_turns_named_kernels_off_for_the_block_only() -> None:
    assert all(KERNELS.values())  # every kernel on by default
    with plain_kernels("dropout", "open_set_context"):
        assert [name for name, on in KERNELS.items() if not on] == ["dropout", "open_set_context"]
        with plain_kernels("all"):
            assert not any(KERNELS.values())
        assert KERNELS["first_token"] and not KERNELS["dropout"]
    assert all(KERNELS.values())
    with pytest.raises(RuntimeError), plain_kernels("first_token"):
        raise RuntimeError  # restored on an exception too
    assert all(KERNELS.values())
    with pytest.raises(UserError):
        plain_kernels("fast").__enter__()
    assert all(KERNELS.values())


# -- dropout -----------------------------------------------------------------------------
@pytest.mark.parametrize("plain", [False, True])
def test_dropout_is_identity_in_eval_and_drops_p_keeping_the_mean_in_training(plain: bool) -> None:
    drop = Dropout(0.3)
    x = torch.ones(300, 400)
    with plain_kernels("dropout") if plain else plain_kernels():
        assert drop.eval()(x) is x
        torch.manual_seed(0)
        out = drop.train()(x)
    assert abs(float((out == 0).float().mean()) - 0.3) < 0.005
    assert abs(float(out.mean()) - 1.0) < 0.01


def test_plain_dropout_is_torch_dropout_and_the_kernel_is_not() -> None:
    drop = Dropout(0.25).train()
    x, residual = torch.randn(64, 50), torch.randn(64, 50)
    torch.manual_seed(1)
    expected = F.dropout(x, 0.25, training=True)
    torch.manual_seed(1)
    expected_sum = residual + F.dropout(x, 0.25, training=True)
    with plain_kernels("dropout"):
        torch.manual_seed(1)
        assert torch.equal(drop(x), expected)
        torch.manual_seed(1)
        assert torch.equal(drop.add_to(residual, x), expected_sum)
    torch.manual_seed(1)
    assert not torch.equal(drop(x), expected)  # the kernel draws its own (PCG64) mask
    torch.manual_seed(2)
    fused = drop.add_to(residual, x)
    torch.manual_seed(2)
    unfused = residual + drop(x)
    assert torch.equal(fused == residual, unfused == residual)  # addcmul: the same mask
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)  # and the same sums up to a fused rounding


# -- level 2's kernels -------------------------------------------------------------------
def test_headwise_projection_equals_einsum() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert_same_function(kernels.headwise_projection, [x, weight], "headwise_projection", "HeadwiseProjection", **TIGHT)


def test_per_head_products_equal_einsum() -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(9, 3, 5, generator=gen), torch.randn(9, 3, 4, generator=gen)
    w = torch.randn(3, 5, 4, generator=gen)
    torch.testing.assert_close(kernels._per_head_gram(a, b), torch.einsum("nhk,nhm->hkm", a, b))
    torch.testing.assert_close(kernels._per_head_mm(a, w), torch.einsum("nhk,hkm->nhm", a, w))


def layer64() -> EncoderLayer:
    torch.manual_seed(0)
    return EncoderLayer(16, 4, 12, dropout=0.0).double()


@pytest.mark.parametrize("shared", [False, True])
def test_first_token_equals_the_full_layer(shared: bool) -> None:
    """Folded one-query attention = ``forward(first_only=True)``, per-sequence and shared first token."""
    layer = layer64()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    cls = torch.randn(16, generator=gen, dtype=torch.float64, requires_grad=True)

    def run(x: torch.Tensor, cls: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        if not shared:
            return kernels.first_token(layer, x)
        first = cls.expand(5, 1, 16)  # one token broadcast to every sequence: the one-GEMM branch
        return kernels.first_token(layer, torch.cat([first, x], dim=1), first=first)

    assert_same_function(run, [x, cls, *layer.parameters()], "first_token", "HeadwiseProjection", **TIGHT)
    with plain_kernels("first_token"):
        assert any("ScaledDotProduct" in op for op in graph_ops(run(x, cls)))


def test_shared_query_attention_equals_concatenating_cls() -> None:
    layer = layer64()
    gen = torch.Generator().manual_seed(4)
    cls = torch.randn(16, generator=gen, dtype=torch.float64, requires_grad=True)
    others = torch.randn(6, 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    inputs = [cls, others, *layer.parameters()]
    run = lambda cls, others, *_: kernels.shared_query_token(layer, cls, others)  # noqa: E731
    assert_same_function(run, inputs, "shared_query_attention", "SharedQueryAttention", **TIGHT)
    with plain_kernels("shared_query_attention", "first_token"):  # all the way down to the plain layer
        plain = run(*inputs)
    full, _ = layer(torch.cat([cls.expand(6, 1, 16), others], dim=1), sdpa_attention, first_only=True)
    torch.testing.assert_close(plain, full, rtol=0, atol=0)


# -- the sparse path's context -----------------------------------------------------------
def test_open_set_context_equals_autograd_chain() -> None:
    n_types, peaks, heads, d = 3, 8, 2, 3
    gen = torch.Generator().manual_seed(5)
    states = torch.rand(5, n_types * peaks, generator=gen) < 0.3
    states[1] = False
    rows, positions = states.nonzero(as_tuple=True)
    indptr = torch.zeros(6, dtype=torch.long)
    indptr[1:] = torch.bincount(rows, minlength=5).cumsum(0)
    sets = open_sets(indptr, positions, n_types, peaks)
    width = 2 * heads + heads * d
    deltas = (torch.rand(n_types * peaks, width, generator=gen, dtype=torch.float64) * 0.1).requires_grad_()
    closed = (torch.rand(n_types, width, generator=gen, dtype=torch.float64) + 1.0).requires_grad_()
    flags = []

    def flag_row_4(z: torch.Tensor, cancelled: torch.Tensor) -> torch.Tensor:
        flags.append((z.requires_grad, cancelled.requires_grad))
        return torch.arange(z.shape[0]) == 4  # one flagged row: its Z held constant

    def context(deltas: torch.Tensor, closed: torch.Tensor) -> torch.Tensor:
        out, ill = kernels.open_set_context(sets, deltas, closed, heads, flag_row_4)
        assert ill.tolist() == [r == 4 for r in range(5 * n_types)]
        return out

    assert_same_function(context, [deltas, closed], "open_set_context", "OpenSetContext", **TIGHT)
    assert flags == [(False, False)] * 2  # the flagging never sees a graph
    with plain_kernels("open_set_context"):
        assert "EmbeddingBagBackward0" in graph_ops(context(deltas, closed))


# -- the linear path's weighted sum ----------------------------------------------------
def test_weighted_bag_sum_equals_embedding_bag() -> None:
    """Bags with repeated, missing and shared indices, one empty bag, rows no bag uses."""
    gen = torch.Generator().manual_seed(12)
    indices = torch.tensor([3, 0, 3, 7, 1, 1, 9, 3, 4])
    offsets = torch.tensor([0, 3, 3, 5])  # bag 1 is empty
    weights = torch.rand(indices.numel(), generator=gen, dtype=torch.float64)
    table = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def run(table: torch.Tensor) -> torch.Tensor:
        return kernels.weighted_bag_sum(indices, table, offsets, weights)

    assert_same_function(run, [table], "weighted_bag_sum", "WeightedBagSum", **TIGHT)
    (grad,) = torch.autograd.grad(run(table).sum(), table)
    assert grad[[2, 5, 6, 8, 10, 11]].abs().sum() == 0  # rows no bag reads get no gradient
    assert grad[3].tolist() == pytest.approx([float(weights[[0, 2, 7]].sum())] * 5)
    weights.requires_grad_()  # weights that learn: the plain embedding_bag, which gives them a gradient
    assert "WeightedBagSum" not in graph_ops(run(table))


# -- the whole model ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, used",
    [
        ({}, {"OpenSetContextBackward", "SharedQueryAttentionBackward"}),  # level 2: one CLS shared by every cell
        (
            dict(depth_signal=True, level2_layers=2, linear_path=True),
            {"OpenSetContextBackward", "HeadwiseProjectionBackward"},
        ),
    ],
)
def test_model_with_all_kernels_equals_the_plain_model(overrides: dict, used: set[str]) -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        n_types=4,
        peaks_per_type=10,
        embed_dim=16,
        level1_heads=4,
        level1_ff=24,
        level2_heads=2,
        level2_ff=20,
        head_hidden=8,
        dropout=0.0,
        **overrides,
    )
    model = HitAnno(config)
    if model.depth is not None:
        torch.nn.init.constant_(model.depth.weight, 0.3)
    gen = torch.Generator().manual_seed(6)
    states = torch.rand(6, 40, generator=gen) < 0.3
    rows, positions = states.nonzero(as_tuple=True)
    indptr = torch.zeros(7, dtype=torch.long)
    indptr[1:] = torch.bincount(rows, minlength=6).cumsum(0)
    labels = torch.arange(6) % 4
    results = {}
    for name in ("kernels", "plain"):
        with plain_kernels("all") if name == "plain" else plain_kernels():
            logits = model(indptr, positions).logits
        ops = graph_ops(logits)
        grads = torch.autograd.grad(F.cross_entropy(logits, labels), list(model.parameters()), allow_unused=True)
        results[name] = logits, grads, ops
    kernel_ops = {"OpenSetContextBackward", "HeadwiseProjectionBackward", "SharedQueryAttentionBackward"}
    assert not kernel_ops & results["plain"][2]
    assert kernel_ops & results["kernels"][2] == used
    torch.testing.assert_close(results["kernels"][0], results["plain"][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(results["kernels"][1], results["plain"][1], strict=True):
        assert (got is None) == (want is None)
        if want is not None:  # the key bias's gradient is 0 in exact arithmetic: an absolute floor
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
