"""HSTU attention (dispatcher + PyTorch reference) against the naive oracle in naive_hstu.py."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from merlin_longseq.backend import Backend, BackendUnavailableError
from merlin_longseq.jagged import JaggedInputError
from merlin_longseq.ops.hstu_attention import hstu_attention

from naive_hstu import naive_hstu_attention

MAX_SEQ_LEN = 12
ALPHA = 0.6


@dataclass
class AttentionCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    offsets: torch.Tensor
    num_targets: torch.Tensor | None
    timestamps: torch.Tensor
    pos_bias: torch.Tensor | None
    time_bias: torch.Tensor | None

    def tensors_with_grad(self) -> dict[str, torch.Tensor]:
        named = {"q": self.q, "k": self.k, "v": self.v, "pos_bias": self.pos_bias, "time_bias": self.time_bias}
        return {name: t for name, t in named.items() if t is not None}


def random_timestamps(lengths: list[int], generator: torch.Generator) -> torch.Tensor:
    """Sorted per sequence; gaps mix 0, small and large values so many log2 buckets are hit."""
    pieces = []
    for length in lengths:
        choices = torch.tensor([0, 1, 2, 3, 7, 20, 150, 5000])
        gaps = choices[torch.randint(len(choices), (length,), generator=generator)]
        start = torch.randint(0, 10_000, (1,), generator=generator)
        pieces.append(start + torch.cumsum(gaps, 0))
    return torch.cat(pieces).to(torch.int64) if pieces else torch.zeros(0, dtype=torch.int64)


def random_num_targets(lengths: list[int], mode: str, generator: torch.Generator) -> torch.Tensor | None:
    if mode == "none":
        return None
    if mode == "all":
        return torch.tensor(lengths, dtype=torch.int64)
    # "some": a random count in [0, length], at least one target where the sequence has tokens
    counts = [int(torch.randint(min(1, n), n + 1, (1,), generator=generator)) for n in lengths]
    return torch.tensor(counts, dtype=torch.int64)


def make_case(lengths, *, seed, dtype=torch.float64, heads=2, qk_dim=3, v_dim=4, targets="none",
              pos_heads=None, time_heads=None, pos_buckets=5, time_buckets=6) -> AttentionCase:
    """pos_heads / time_heads: None (no table), 1 (shared table) or `heads` (per-head table)."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)
    return AttentionCase(
        q=leaf(total, heads, qk_dim),
        k=leaf(total, heads, qk_dim),
        v=leaf(total, heads, v_dim),
        offsets=offsets,
        num_targets=random_num_targets(lengths, targets, generator),
        timestamps=random_timestamps(lengths, generator),
        pos_bias=leaf(pos_heads, pos_buckets) if pos_heads else None,
        time_bias=leaf(time_heads, time_buckets) if time_heads else None,
    )


def run_both(case: AttentionCase, backend="pytorch", **options):
    kwargs = dict(num_targets=case.num_targets, pos_bias=case.pos_bias, time_bias=case.time_bias,
                  timestamps=case.timestamps if case.time_bias is not None else None, **options)
    got = hstu_attention(case.q, case.k, case.v, case.offsets, MAX_SEQ_LEN, ALPHA, backend=backend, **kwargs)
    expected = naive_hstu_attention(case.q, case.k, case.v, case.offsets, MAX_SEQ_LEN, ALPHA, **kwargs)
    return got, expected


def gradients(output: torch.Tensor, upstream: torch.Tensor, inputs: dict[str, torch.Tensor]):
    names = list(inputs)
    grads = torch.autograd.grad(output, [inputs[n] for n in names], upstream, allow_unused=True,
                                retain_graph=True)
    # an input the graph never used (e.g. a bias table over an empty batch) has a zero gradient
    return {n: torch.zeros_like(inputs[n]) if g is None else g for n, g in zip(names, grads)}


def assert_matches_naive(case: AttentionCase, **options):
    got, expected = run_both(case, **options)
    tol = dict(rtol=1e-10, atol=1e-12) if case.q.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert got.shape == case.v.shape
    torch.testing.assert_close(got, expected, **tol)
    upstream = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(99))
    inputs = case.tensors_with_grad()
    got_grads = gradients(got, upstream, inputs)
    expected_grads = gradients(expected, upstream, inputs)
    for name in inputs:
        torch.testing.assert_close(got_grads[name], expected_grads[name], **tol, msg=lambda m: f"d{name}: {m}")


RAGGED = [5, 0, 1, 7, 3]
WINDOWS = [None, (1, 0), (1, 2), (3, 0), (2, 2), (4, 1)]  # (local_window K1, global_prefix K2)


@pytest.mark.parametrize("targets", ["none", "some", "all"])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_mask_options_match_naive(causal, window, targets):
    seed = 1000 + 100 * causal + 10 * WINDOWS.index(window) + ["none", "some", "all"].index(targets)
    case = make_case(RAGGED, seed=seed, targets=targets, pos_heads=2, time_heads=2)
    local_window, global_prefix = window if window else (None, 0)
    assert_matches_naive(case, causal=causal, local_window=local_window, global_prefix=global_prefix)


BIAS_KINDS = {
    "no_bias": (None, None),
    "pos_per_head": (2, None),
    "pos_shared": (1, None),
    "time_per_head": (None, 2),
    "time_shared": (None, 1),
    "pos_head_time_shared": (2, 1),
    "pos_shared_time_head": (1, 2),
}


@pytest.mark.parametrize("buckets", [(3, 3), (16, 14)], ids=["clamped_buckets", "wide_buckets"])
@pytest.mark.parametrize("targets", ["none", "some", "all"])
@pytest.mark.parametrize("bias_kind", list(BIAS_KINDS))
def test_relative_bias_matches_naive(bias_kind, targets, buckets):
    pos_heads, time_heads = BIAS_KINDS[bias_kind]
    seed = 2000 + 10 * list(BIAS_KINDS).index(bias_kind) + ["none", "some", "all"].index(targets) + buckets[0]
    case = make_case([6, 2, 9, 0, 4], seed=seed, targets=targets, pos_heads=pos_heads, time_heads=time_heads,
                     pos_buckets=buckets[0], time_buckets=buckets[1])
    assert_matches_naive(case, causal=True)


BATCHES = {
    "ragged": [5, 0, 1, 7, 3],
    "all_empty": [0, 0, 0],
    "single": [9],
    "single_token": [1],
    "odd_lengths": [3, 11, 5, 0],
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_batch_shapes_and_dtypes_match_naive(batch, dtype):
    seed = 3000 + 7 * list(BATCHES).index(batch) + (dtype == torch.float32)
    case = make_case(BATCHES[batch], seed=seed, dtype=dtype, targets="some", pos_heads=2, time_heads=1)
    assert_matches_naive(case, causal=True, local_window=3, global_prefix=1)
    assert_matches_naive(case, causal=False)


def test_head_dims_may_differ_between_qk_and_v():
    case = make_case([4, 6], seed=7, heads=3, qk_dim=2, v_dim=5, targets="some", pos_heads=3, time_heads=3)
    assert_matches_naive(case, causal=True)


def test_empty_batch_output_stays_in_the_graph():
    case = make_case([0, 0], seed=8)
    out = hstu_attention(case.q, case.k, case.v, case.offsets, MAX_SEQ_LEN, ALPHA, backend="pytorch")
    assert out.shape == (0, 2, 4)
    assert out.requires_grad
    out.sum().backward()  # must not raise: a loss over an empty batch is legal


def test_no_batch_at_all():
    case = make_case([], seed=9)
    out = hstu_attention(case.q, case.k, case.v, case.offsets, MAX_SEQ_LEN, ALPHA, backend="pytorch")
    assert out.shape == (0, 2, 4)


def test_normaliser_is_max_seq_len_not_batch_length():
    case = make_case([4, 3], seed=10)
    small = hstu_attention(case.q, case.k, case.v, case.offsets, 4, ALPHA, backend="pytorch")
    large = hstu_attention(case.q, case.k, case.v, case.offsets, 8, ALPHA, backend="pytorch")
    torch.testing.assert_close(large * 2, small)


# ---------------------------------------------------------------- backends


def test_auto_equals_pytorch_on_cpu():
    case = make_case(RAGGED, seed=11, targets="some", pos_heads=2, time_heads=2)
    kwargs = dict(num_targets=case.num_targets, timestamps=case.timestamps, pos_bias=case.pos_bias,
                  time_bias=case.time_bias)
    outputs = [hstu_attention(case.q, case.k, case.v, case.offsets, MAX_SEQ_LEN, ALPHA, backend=b, **kwargs)
               for b in ("auto", Backend.AUTO, "pytorch", Backend.PYTORCH, "PyTorch")]
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = make_case([3, 2], seed=12)
    for backend in ("triton", Backend.TRITON):
        with pytest.raises(BackendUnavailableError, match="[Tt]riton"):
            hstu_attention(case.q, case.k, case.v, case.offsets, MAX_SEQ_LEN, ALPHA, backend=backend)


def test_triton_on_cpu_with_interpreter_off_explicitly_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = make_case([3], seed=13)
    with pytest.raises(BackendUnavailableError):
        hstu_attention(case.q, case.k, case.v, case.offsets, MAX_SEQ_LEN, ALPHA, backend="triton")


def test_triton_without_an_installed_kernel_raises(monkeypatch):
    pytest.importorskip("triton")
    from merlin_longseq.ops import _triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check, to the kernel lookup
    monkeypatch.setitem(_triton._MODULES, "hstu_attention", None)  # the lookup's answer without kernels/
    case = make_case([3], seed=15)
    with pytest.raises(BackendUnavailableError, match="no Triton kernel for hstu_attention is installed"):
        hstu_attention(case.q, case.k, case.v, case.offsets, MAX_SEQ_LEN, ALPHA, backend="triton")


def test_unknown_backend_name_raises_value_error():
    case = make_case([3], seed=14)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        hstu_attention(case.q, case.k, case.v, case.offsets, MAX_SEQ_LEN, ALPHA, backend="cuda")


# ---------------------------------------------------------------- bad input


@pytest.fixture
def good():
    return make_case([3, 4], seed=15, targets="some", pos_heads=2, time_heads=2)


def call(case: AttentionCase, **changes):
    args = dict(q=case.q, k=case.k, v=case.v, offsets=case.offsets, max_seq_len=MAX_SEQ_LEN, alpha=ALPHA,
                num_targets=case.num_targets, timestamps=case.timestamps, pos_bias=case.pos_bias,
                time_bias=case.time_bias, backend="pytorch")
    args.update(changes)
    return hstu_attention(**args)


def test_good_input_passes(good):
    assert call(good).shape == good.v.shape


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: dict(k=c.k[:, :, :2]), "q and k must both be"),
        (lambda c: dict(k=c.k[:-1]), "q and k must both be"),
        (lambda c: dict(q=c.q[:, 0], k=c.k[:, 0]), "q and k must both be"),
        (lambda c: dict(v=c.v[:, :, 0]), "v must be"),
        (lambda c: dict(v=c.v[:, :1]), "v must be"),
        (lambda c: dict(offsets=torch.tensor([0, 5, 3, 7])), "non-decreasing"),
        (lambda c: dict(offsets=torch.tensor([1, 3, 7])), r"offsets\[0\] must be 0"),
        (lambda c: dict(offsets=torch.tensor([0, 3, 6])), r"offsets\[-1\] = 6 but the values hold 7"),
        (lambda c: dict(offsets=torch.tensor([0, 3, 7], dtype=torch.float32)), "must be int64"),
        (lambda c: dict(offsets=torch.tensor([[0, 3, 7]])), r"offsets must be 1-D"),
        (lambda c: dict(max_seq_len=3), "length 4 exceeds max_seq_len = 3"),
        (lambda c: dict(max_seq_len=0), "max_seq_len must be >= 1"),
        (lambda c: dict(num_targets=torch.tensor([1])), r"num_targets must be \[B\] = \[2\]"),
        (lambda c: dict(num_targets=torch.tensor([[1, 1]])), r"num_targets must be \[B\]"),
        (lambda c: dict(num_targets=torch.tensor([1, 5])), r"num_targets must lie in \[0, sequence length\]"),
        (lambda c: dict(num_targets=torch.tensor([-1, 0])), r"num_targets must lie in"),
        (lambda c: dict(timestamps=None), "time_bias needs timestamps"),
        (lambda c: dict(timestamps=c.timestamps[:-1]), r"timestamps must be \[total\] = \[7\]"),
        (lambda c: dict(pos_bias=c.pos_bias[0]), r"pos_bias must be \[H or 1, buckets\]"),
        (lambda c: dict(pos_bias=torch.zeros(3, 5)), r"pos_bias must be \[H or 1, buckets\]"),
        (lambda c: dict(time_bias=torch.zeros(2, 4, 1)), r"time_bias must be \[H or 1, buckets\]"),
        (lambda c: dict(local_window=0), "local_window must be >= 1"),
        (lambda c: dict(global_prefix=-1), "global_prefix must be >= 0"),
    ],
)
def test_bad_input_raises_clear_error(good, change, message):
    with pytest.raises(JaggedInputError, match=message):
        call(good, **change(good))


def test_reference_splits_long_batches_without_changing_the_result(monkeypatch):
    """Past the padded-block budget the reference runs groups of sequences; the output must not change."""
    from merlin_longseq.ops.pytorch import pt_hstu_attention as ref

    torch.manual_seed(0)
    lengths = [5, 30, 0, 17, 28]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    n = sum(lengths)
    q, k, v = (torch.randn(n, 2, 8) for _ in range(3))
    timestamps = torch.randint(0, 1000, (n,)).sort().values
    options = dict(timestamps=timestamps, pos_bias=torch.randn(2, 16), time_bias=torch.randn(2, 8),
                   local_window=9, global_prefix=2, num_targets=torch.tensor([1, 3, 0, 0, 2]))
    whole = ref.pytorch_hstu_attention(q, k, v, offsets, 40, 0.3, **options)
    monkeypatch.setattr(ref, "_PADDED_SCORES_BUDGET", 2 * 30 * 30)  # one sequence per group
    torch.testing.assert_close(ref.pytorch_hstu_attention(q, k, v, offsets, 40, 0.3, **options), whole)
    monkeypatch.undo()
    # ragged: sum L^2 = 1,998 < half of 5 x 30^2, so past the minimum length it runs sequence by sequence
    monkeypatch.setattr(ref, "_RAGGED_MIN_LEN", 8)
    calls, inner = [], ref.pytorch_hstu_attention
    monkeypatch.setattr(ref, "pytorch_hstu_attention", lambda *a, **kw: calls.append(1) or inner(*a, **kw))
    torch.testing.assert_close(ref.pytorch_hstu_attention(q, k, v, offsets, 40, 0.3, **options), whole)
    assert len(calls) == 1 + len(lengths)  # the call, then one per sequence


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("window, prefix, with_bias", [(9, 2, True), (1, 0, False), (4, 12, True), (16, 0, True)])
def test_reference_semi_local_blocks_equal_the_padded_block(monkeypatch, dtype, window, prefix, with_bias):
    """Causal semi-local attention without targets runs in query blocks over the keys each block can see
    (O(L (K1 + K2))); outputs and gradients equal the padded [S, S] block's, on lengths 0, 1 and non-multiples
    of the block."""
    from merlin_longseq.ops.pytorch import pt_hstu_attention as ref

    torch.manual_seed(0)
    lengths = [37, 0, 1, 64, 23]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    n = sum(lengths)
    q, k, v = (torch.randn(n, 2, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    pos = torch.randn(2, 16, dtype=dtype, requires_grad=True)
    time = torch.randn(2, 8, dtype=dtype, requires_grad=True)
    options = dict(local_window=window, global_prefix=prefix)
    params = [q, k, v]
    if with_bias:
        options.update(timestamps=torch.randint(0, 1000, (n,)).sort().values, pos_bias=pos, time_bias=time)
        params += [pos, time]

    def run():
        out = ref.pytorch_hstu_attention(q, k, v, offsets, 80, 0.3, **options)
        return out, torch.autograd.grad((out * out).sum(), params)

    monkeypatch.setattr(ref, "_BAND_BLOCK", 8)  # blocks of 8 rows; the path applies past 2 (K1 + K2 + 8) events
    calls, inner = [], ref._semi_local_sequence
    monkeypatch.setattr(ref, "_semi_local_sequence", lambda *a: calls.append(1) or inner(*a))
    applies = max(lengths) > 2 * (window + prefix + 8)
    blocked, blocked_grads = run()
    assert len(calls) == (len(lengths) if applies else 0)
    monkeypatch.setattr(ref, "_BAND_BLOCK", 10 ** 9)  # the padded block
    padded, padded_grads = run()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(blocked, padded, **tol)
    for a, b in zip(blocked_grads, padded_grads):
        torch.testing.assert_close(a, b, **tol)
