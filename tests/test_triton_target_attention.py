"""Triton target-to-history cross attention (kernels/triton_target_attention.py) against the PyTorch reference.

CPU: the Triton interpreter (TRITON_INTERPRET=1, set before triton is first imported), fp32, tiny jagged
shapes on both sides (empty histories, requests without targets, lengths 1, odd, not multiples of the tile),
with and without split-KV; forward and backward against the float64 reference.
GPU (@pytest.mark.gpu): bf16 under STYLE.md's rule |kernel - ref_fp32| <= 2 |ref_bf16 - ref_fp32| + floor, and
a long-history smoke test.
"""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    # before triton.jit decorates the kernels: on CPU they must become interpreted functions
    os.environ["TRITON_INTERPRET"] = "1"

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (the 'triton' extra)", allow_module_level=True)

import merlin_longseq.kernels.triton_target_attention as tk  # noqa: E402
from merlin_longseq.jagged import offsets_from_lengths  # noqa: E402
from merlin_longseq.ops.pytorch.pt_target_attention import pytorch_target_attention  # noqa: E402
from merlin_longseq.ops.target_attention import target_attention  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

ON_CPU = not torch.cuda.is_available()
if ON_CPU and not isinstance(tk._ta_combine_kernel, InterpretedFunction):
    pytest.skip("the kernel module was imported before TRITON_INTERPRET=1 was set; run this file on its own",
                allow_module_level=True)


def _make_case(target_lengths, history_lengths, heads=2, d=16, dv=16, strided=False, device="cpu",
               dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_t, n_h = sum(target_lengths), sum(history_lengths)
    q = torch.randn(n_t, heads, d, generator=gen)
    if strided:
        # k, v as views of one fused projection: token stride != heads * dim
        kv = torch.randn(n_h, heads, d + dv + 3, generator=gen)
        k, v = kv[..., :d], kv[..., d:d + dv]
    else:
        k, v = torch.randn(n_h, heads, d, generator=gen), torch.randn(n_h, heads, dv, generator=gen)
    q_off = offsets_from_lengths(torch.tensor(target_lengths, dtype=torch.int64)).to(device)
    kv_off = offsets_from_lengths(torch.tensor(history_lengths, dtype=torch.int64)).to(device)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)], q_off, kv_off


def _run(fn, qkv, q_off, kv_off, grad_out, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in qkv]
    out = fn(*leaves, q_off, kv_off, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]
    return out.detach(), grads


def _reference(qkv, q_off, kv_off, grad_out, scale, dtype=torch.float64):
    return _run(lambda q, k, v, a, b: pytorch_target_attention(q, k, v, a, b, scale),
                [x.to(dtype) for x in qkv], q_off, kv_off, grad_out.to(dtype))


# (id, target lengths, history lengths, case kwargs, interpreter tiles (BLOCK_M, BLOCK_N), forced splits)
CPU_CASES = [
    ("ragged", [3, 1, 0, 17], [5, 0, 9, 37], {}, (16, 16), None),
    ("split_kv", [3, 1, 0, 18], [40, 0, 9, 70], {}, (16, 16), 3),
    ("padded_dims_strided", [2, 5, 1], [1, 33, 19], dict(d=24, dv=8, strided=True), (16, 32), 2),
    ("no_history_anywhere", [2, 3], [0, 0], {}, (16, 16), None),
]


@pytest.mark.skipif(not ON_CPU, reason="interpreter cases run on CPU; the GPU has its own tests")
@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_matches_reference_forward_and_backward(case):
    _, t_lens, h_lens, case_kwargs, blocks, splits = case
    tk._set_interpret_blocks(*blocks)
    qkv, q_off, kv_off = _make_case(t_lens, h_lens, **case_kwargs)
    grad_out = torch.randn(qkv[0].shape[0], qkv[0].shape[1], qkv[2].shape[2])
    scale = 0.4
    out, grads = _run(tk.triton_target_attention, qkv, q_off, kv_off, grad_out, scale=scale, num_splits=splits)
    ref, ref_grads = _reference(qkv, q_off, kv_off, grad_out, scale)
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out] + grads, [ref] + ref_grads):
        tol = 1e-5 * float(want.abs().max()) + 1e-6 if want.numel() else 0.0
        err = float((got.double() - want).abs().max()) if want.numel() else 0.0
        assert torch.isfinite(got).all(), name
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e}"


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_dispatcher_backend_triton_runs_the_kernel():
    tk._set_interpret_blocks(16, 16)
    (q, k, v), q_off, kv_off = _make_case([2, 3], [7, 20])
    got = target_attention(q, k, v, q_off, kv_off, backend="triton")
    want = tk.triton_target_attention(q, k, v, q_off, kv_off)
    assert torch.equal(got, want)
    ref = target_attention(q, k, v, q_off, kv_off, backend="pytorch")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_custom_op_passes_opcheck():
    tk._set_interpret_blocks(16, 16)
    (q, k, v), q_off, kv_off = _make_case([2, 1], [5, 3])
    args = (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), q_off, kv_off, None, 0.25, 2,
            5, 0)
    torch.library.opcheck(torch.ops.merlin_longseq.target_attention_fwd.default, args)
    limits = torch.tensor([0, 4, 2])
    torch.library.opcheck(torch.ops.merlin_longseq.target_attention_fwd.default, args[:5] + (limits,) + args[6:])


def _limits(t_lens, h_lens, seed):
    # per target: 0 (sees nothing), 1, past the history end, or anything in between
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n_t, n_h in zip(t_lens, h_lens):
        out += torch.randint(0, n_h + 3, (n_t,), generator=gen).tolist()
    if out:
        out[0] = 0
    return torch.tensor(out, dtype=torch.int64)


def _run_lse(fn, qkv, q_off, kv_off, limits, grad_out, grad_lse, **kwargs):
    # the loss reads both outputs; rows that see no key have lse = -inf and take no lse gradient
    leaves = [x.detach().clone().requires_grad_(True) for x in qkv]
    out, lse = fn(*leaves, q_off, kv_off, key_limit=limits, return_lse=True, **kwargs)
    finite = torch.isfinite(lse)
    loss = (out * grad_out.to(out.dtype)).sum() + torch.where(finite, lse * grad_lse.to(lse.dtype), 0).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]
    return [out.detach(), lse.detach()] + grads


LIMIT_CASES = [
    ("limits", [3, 1, 0, 17], [5, 0, 9, 37], None),
    ("limits_split", [4, 1, 0, 18], [40, 0, 9, 70], 3),
]


@pytest.mark.skipif(not ON_CPU, reason="interpreter cases run on CPU; the GPU has its own tests")
@pytest.mark.parametrize("case", LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_key_limits_and_lse_gradient_match_reference(case):
    _, t_lens, h_lens, splits = case
    tk._set_interpret_blocks(16, 16)
    qkv, q_off, kv_off = _make_case(t_lens, h_lens)
    limits = _limits(t_lens, h_lens, 1)
    grad_out = torch.randn(qkv[0].shape[0], qkv[0].shape[1], qkv[2].shape[2])
    grad_lse = torch.randn(qkv[0].shape[0], qkv[0].shape[1])
    got = _run_lse(tk.triton_target_attention, qkv, q_off, kv_off, limits, grad_out, grad_lse, scale=0.4,
                   num_splits=splits)
    ref = _run_lse(lambda *a, **kw: pytorch_target_attention(*a[:5], 0.4, kw["key_limit"], True),
                   [x.double() for x in qkv], q_off, kv_off, limits, grad_out.double(), grad_lse.double())
    assert torch.equal(torch.isinf(got[1]), torch.isinf(ref[1]))  # exactly the rows that see no key
    assert bool((got[0][limits == 0] == 0).all())
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv"], got, ref):
        g, w = torch.nan_to_num(g.double(), neginf=0.0), torch.nan_to_num(w, neginf=0.0)
        tol = 1e-5 * float(w.abs().max()) + 1e-6 if w.numel() else 0.0
        err = float((g - w).abs().max()) if w.numel() else 0.0
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e}"


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_limit_at_or_past_the_history_is_no_limit():
    tk._set_interpret_blocks(16, 16)
    (q, k, v), q_off, kv_off = _make_case([3, 2], [20, 7])
    plain = tk.triton_target_attention(q, k, v, q_off, kv_off)
    limited = tk.triton_target_attention(q, k, v, q_off, kv_off, key_limit=torch.tensor([20, 25, 99, 7, 8]))
    torch.testing.assert_close(limited, plain, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------
def _gpu_lengths(seed, requests=6, max_targets=150, max_history=3000):
    gen = torch.Generator().manual_seed(seed)
    targets = [1, 0, 129] + torch.randint(1, max_targets, (requests - 3,), generator=gen).tolist()
    history = [0, 1, 777] + torch.randint(1, max_history, (requests - 3,), generator=gen).tolist()
    return targets, history


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4, None], ids=["one_chunk", "four_chunks", "heuristic"])
@pytest.mark.parametrize("dims", [(64, 64), (32, 48)], ids=["d64", "d32_dv48"])
def test_gpu_bf16_within_twice_the_reference_bf16_error(splits, dims):
    t_lens, h_lens = _gpu_lengths(1)
    qkv, q_off, kv_off = _make_case(t_lens, h_lens, heads=4, d=dims[0], dv=dims[1], device="cuda",
                                    dtype=torch.bfloat16)
    grad_out = torch.randn(qkv[0].shape[0], 4, dims[1], device="cuda").to(torch.bfloat16)
    scale = dims[0] ** -0.5
    out, grads = _run(tk.triton_target_attention, qkv, q_off, kv_off, grad_out, scale=scale, num_splits=splits)
    ref16, ref16_grads = _reference(qkv, q_off, kv_off, grad_out, scale, dtype=torch.bfloat16)
    ref32, ref32_grads = _reference(qkv, q_off, kv_off, grad_out, scale, dtype=torch.float32)
    for name, got, r16, r32 in zip(["out", "dq", "dk", "dv"], [out] + grads, [ref16] + ref16_grads,
                                   [ref32] + ref32_grads):
        got, r16 = got.float(), r16.float()
        floor = 5e-3 * float(r32.abs().max()) + 1e-6
        excess = (got - r32).abs() - (2 * (r16 - r32).abs() + floor)
        assert torch.isfinite(got).all(), name
        assert float(excess.max()) <= 0, f"{name}: {int((excess > 0).sum())} over, worst by {float(excess.max()):.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, None], ids=["one_chunk", "heuristic"])
def test_gpu_bf16_key_limits_and_lse_within_twice_the_reference_bf16_error(splits):
    t_lens, h_lens = _gpu_lengths(3)
    qkv, q_off, kv_off = _make_case(t_lens, h_lens, heads=4, d=64, dv=64, device="cuda", dtype=torch.bfloat16)
    limits = _limits(t_lens, h_lens, 2).cuda()
    grad_out = torch.randn(qkv[0].shape[0], 4, 64, device="cuda").to(torch.bfloat16)
    grad_lse = torch.randn(qkv[0].shape[0], 4, device="cuda")
    got = _run_lse(tk.triton_target_attention, qkv, q_off, kv_off, limits, grad_out, grad_lse, scale=0.125,
                   num_splits=splits)

    def ref(dtype):
        return _run_lse(lambda *a, **kw: pytorch_target_attention(*a[:5], 0.125, kw["key_limit"], True),
                        [x.to(dtype) for x in qkv], q_off, kv_off, limits, grad_out.to(dtype), grad_lse)

    ref16, ref32 = ref(torch.bfloat16), ref(torch.float32)
    for name, g, r16, r32 in zip(["out", "lse", "dq", "dk", "dv"], got, ref16, ref32):
        g, r16, r32 = (torch.nan_to_num(x.float(), neginf=0.0) for x in (g, r16, r32))
        floor = 5e-3 * float(r32.abs().max()) + 1e-6
        excess = (g - r32).abs() - (2 * (r16 - r32).abs() + floor)
        assert float(excess.max()) <= 0, f"{name}: {int((excess > 0).sum())} over, worst by {float(excess.max()):.3e}"


@pytest.mark.gpu
def test_gpu_fp32_close_to_float64():
    t_lens, h_lens = _gpu_lengths(2)
    qkv, q_off, kv_off = _make_case(t_lens, h_lens, heads=2, d=64, dv=64, device="cuda")
    grad_out = torch.randn(qkv[0].shape[0], 2, 64, device="cuda")
    out, grads = _run(tk.triton_target_attention, qkv, q_off, kv_off, grad_out, scale=0.125)
    ref, ref_grads = _reference(qkv, q_off, kv_off, grad_out, 0.125)
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out] + grads, [ref] + ref_grads):
        rel = float((got.double() - want).norm() / want.norm())
        assert rel < 1e-4, f"{name}: relative error {rel:.2e}"


@pytest.mark.gpu
def test_gpu_torch_compile_matches_eager():
    qkv, q_off, kv_off = _make_case([5, 64, 1], [100, 2000, 0], device="cuda", dtype=torch.bfloat16)
    q, k, v = (x.requires_grad_(True) for x in qkv)

    def f(q, k, v):
        return tk.triton_target_attention(q, k, v, q_off, kv_off, max_history_len=2000, max_targets=64)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.float().sum(), (q, k, v)),
                    torch.autograd.grad(eager.float().sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_32k_token_history_smoke():
    qkv, q_off, kv_off = _make_case([128, 3], [32 * 1024, 5000], heads=4, d=64, dv=64, device="cuda",
                                    dtype=torch.bfloat16)
    q, k, v = (x.requires_grad_(True) for x in qkv)
    out = tk.triton_target_attention(q, k, v, q_off, kv_off)
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    assert float(out.float().abs().max()) > 0
