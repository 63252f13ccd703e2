"""Triton HSTU attention (kernels/triton_hstu_attention.py) against the PyTorch reference.

CPU: the Triton interpreter (TRITON_INTERPRET=1, set before triton is first imported), fp32, tiny jagged
shapes covering every mask option, both bias tables and both bias-gradient paths; forward and backward.
GPU (@pytest.mark.gpu): bf16 under STYLE.md's rule |kernel - ref_fp32| <= 2 |ref_bf16 - ref_fp32| + floor,
fp32, torch.compile, and a 32K-token smoke test.
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

import merlin_longseq.kernels.triton_hstu_attention as tk  # noqa: E402
from merlin_longseq.jagged import offsets_from_lengths  # noqa: E402
from merlin_longseq.ops.hstu_attention import hstu_attention  # noqa: E402
from merlin_longseq.ops.pytorch.pt_hstu_attention import pytorch_hstu_attention  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

ON_CPU = not torch.cuda.is_available()
if ON_CPU and not isinstance(tk._hstu_fwd_kernel.fn, InterpretedFunction):
    pytest.skip("the kernel module was imported before TRITON_INTERPRET=1 was set; run this file on its own",
                allow_module_level=True)

ALPHA = 0.3
# gaps straddling powers of two, where a float32 log2 would round into the wrong time bucket
EDGE_GAPS = [0, 1, 2, 3, 7, 8, 2**24 - 2, 2**24 - 1, 2**24, 2**31 - 1, 2**40 - 1, 2**40]


def _timestamps(total, gen):
    pick = torch.randint(0, len(EDGE_GAPS), (total,), generator=gen)
    gaps = torch.tensor(EDGE_GAPS)[pick] + torch.randint(0, 3, (total,), generator=gen) * (pick < 6)
    return torch.cumsum(gaps, 0)


def _make_case(lengths, heads=2, dqk=16, dv=16, targets=False, num_pos=0, num_time=0, strided=False,
               device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    offsets = offsets_from_lengths(lengths_t)
    total = int(offsets[-1])
    if strided:
        # q, k, v as views of one fused projection: token stride != heads * dim
        qkv = torch.randn(total, heads, 2 * dqk + dv + 3, generator=gen)
        q, k, v = qkv[..., :dqk], qkv[..., dqk:2 * dqk], qkv[..., 2 * dqk:2 * dqk + dv]
    else:
        q, k, v = (torch.randn(total, heads, d, generator=gen) for d in (dqk, dqk, dv))
    num_targets = None
    if targets:
        num_targets = torch.minimum(torch.randint(0, 5, (len(lengths),), generator=gen), lengths_t)
    timestamps = _timestamps(total, gen) if num_time else None
    pos_bias = torch.randn(heads, num_pos, generator=gen) if num_pos else None
    time_bias = torch.randn(1, num_time, generator=gen) if num_time else None  # shared table (H = 1)
    to = lambda x: x.to(device) if x is not None else None  # noqa: E731
    tensors = dict(q=q, k=k, v=v, pos_bias=pos_bias, time_bias=time_bias)
    tensors = {name: (to(x.to(dtype) if name in "qkv" else x)) for name, x in tensors.items()}
    return tensors, dict(offsets=to(offsets), max_seq_len=max(max(lengths), 1), num_targets=to(num_targets),
                         timestamps=to(timestamps))


def _run(fn, tensors, meta, grad_out, options):
    """out and the gradients of every tensor in `tensors` (None where absent)."""
    leaves = {name: x.detach().clone().requires_grad_(True) for name, x in tensors.items() if x is not None}
    out = fn(leaves["q"], leaves["k"], leaves["v"], meta["offsets"], meta["max_seq_len"], ALPHA,
             num_targets=meta["num_targets"], timestamps=meta["timestamps"], pos_bias=leaves.get("pos_bias"),
             time_bias=leaves.get("time_bias"), **options)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return out.detach(), dict(zip(leaves, grads))


def _ref64(tensors, meta, grad_out, options):
    as64 = {name: x.double() if x is not None else None for name, x in tensors.items()}
    return _run(pytorch_hstu_attention, as64, meta, grad_out.double(), options)


# (id, lengths, case kwargs, mask options, interpreter tiles (BLOCK_M, BLOCK_N))
CPU_CASES = [
    ("causal", [0, 1, 17, 37], {}, {}, (16, 16)),
    ("noncausal_padded_dims", [5, 1, 23], dict(dqk=24, dv=32), dict(causal=False), (32, 16)),
    ("targets_strided", [5, 1, 17, 40], dict(targets=True, strided=True), {}, (16, 32)),
    ("semilocal_targets", [5, 33, 17, 70], dict(targets=True), dict(local_window=40, global_prefix=5), (16, 16)),
    ("semilocal_narrow", [50, 3], {}, dict(local_window=5, global_prefix=3), (16, 32)),
    ("semilocal_noncausal", [33, 0, 50], {}, dict(causal=False, local_window=20, global_prefix=17), (16, 16)),
    # 40 position buckets: tiles span many -> one atomic per element; time buckets: per-bucket sums
    ("bias_targets", [5, 33, 17, 50], dict(targets=True, num_pos=40, num_time=8), {}, (16, 16)),
    # 3 position buckets -> per-bucket sums; 64 time buckets with gaps up to 2^40
    ("bias_semilocal_noncausal", [31, 2, 45], dict(num_pos=3, num_time=64, targets=True),
     dict(causal=False, local_window=24, global_prefix=2), (16, 16)),
]


@pytest.mark.skipif(not ON_CPU, reason="interpreter cases run on CPU; the GPU has its own tests")
@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_matches_reference_forward_and_backward(case):
    _, lengths, case_kwargs, options, blocks = case
    tk._set_interpret_blocks(*blocks)
    tensors, meta = _make_case(lengths, **case_kwargs)
    grad_out = torch.randn(tensors["q"].shape[0], tensors["q"].shape[1], tensors["v"].shape[2])
    out, grads = _run(tk.triton_hstu_attention, tensors, meta, grad_out, options)
    ref, ref_grads = _ref64(tensors, meta, grad_out, options)
    for name, got, want in [("out", out, ref)] + [(n, grads[n], ref_grads[n]) for n in ref_grads]:
        tol = 1e-5 * float(want.abs().max()) + 1e-7
        err = float((got.double() - want).abs().max()) if want.numel() else 0.0
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e}"


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_empty_batch_and_zero_length_sequences():
    tk._set_interpret_blocks(16, 16)
    for lengths in ([0, 0], []):
        offsets = offsets_from_lengths(torch.tensor(lengths, dtype=torch.int64))
        q = torch.randn(0, 2, 16, requires_grad=True)
        out = tk.triton_hstu_attention(q, q, q, offsets, 4, ALPHA)
        assert out.shape == (0, 2, 16)
        out.sum().backward()
        assert q.grad.shape == q.shape


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_dispatcher_backend_triton_runs_the_kernel():
    tk._set_interpret_blocks(16, 16)
    tensors, meta = _make_case([9, 20], targets=True)
    args = (tensors["q"], tensors["k"], tensors["v"], meta["offsets"], meta["max_seq_len"], ALPHA)
    got = hstu_attention(*args, num_targets=meta["num_targets"], backend="triton")
    want = tk.triton_hstu_attention(*args, num_targets=meta["num_targets"])
    assert torch.equal(got, want)


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_custom_ops_pass_opcheck_and_compile():
    tk._set_interpret_blocks(16, 16)
    tensors, meta = _make_case([3, 11], num_pos=5)
    q, k, v, pos = (tensors[n].requires_grad_(True) for n in ("q", "k", "v", "pos_bias"))
    op_args = (q, k, v, meta["offsets"], None, None, pos, None, meta["max_seq_len"], ALPHA, True, 0, 0)
    torch.library.opcheck(torch.ops.merlin_longseq.hstu_attention_fwd.default, op_args)

    def f(q, k, v, pos):
        return tk.triton_hstu_attention(q, k, v, meta["offsets"], meta["max_seq_len"], ALPHA, pos_bias=pos)

    eager = f(q, k, v, pos)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, pos)
    assert torch.allclose(compiled, eager)
    g_eager = torch.autograd.grad(eager.sum(), (q, k, v, pos))
    g_compiled = torch.autograd.grad(compiled.sum(), (q, k, v, pos))
    for a, b in zip(g_compiled, g_eager):
        assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------
GPU_CASES = [
    ("causal", dict(), {}),
    ("semilocal_targets", dict(targets=True), dict(local_window=128, global_prefix=32)),
    ("noncausal_d128_dv32", dict(dqk=128, dv=32), dict(causal=False)),
    ("bias_pos_targets", dict(targets=True, num_pos=64), {}),
    # time buckets with gaps straddling powers of two: the case where CUDA's float64 log2 once misled the
    # reference (buckets.py), which made this kernel look wrong on the GPU
    ("bias_time_targets", dict(targets=True, num_pos=64, num_time=32), {}),
]


def _gpu_lengths(seed):
    gen = torch.Generator().manual_seed(seed)
    return [0, 1, 777] + torch.randint(1, 1200, (3,), generator=gen).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[(c.values[0] if hasattr(c, "values") else c)[0] for c in GPU_CASES])
def test_gpu_bf16_within_twice_the_reference_bf16_error(case):
    case_kwargs, options = dict(case[1]), case[2]
    tensors, meta = _make_case(_gpu_lengths(1), heads=2, dqk=case_kwargs.pop("dqk", 64),
                               dv=case_kwargs.pop("dv", 64), device="cuda", dtype=torch.bfloat16, **case_kwargs)
    tensors = {n: x.to(torch.bfloat16) if x is not None else None for n, x in tensors.items()}
    grad_out = torch.randn(tensors["q"].shape[0], tensors["q"].shape[1], tensors["v"].shape[2], device="cuda")
    grad_out = grad_out.to(torch.bfloat16)
    out, grads = _run(tk.triton_hstu_attention, tensors, meta, grad_out, options)
    ref16, ref16_grads = _run(pytorch_hstu_attention, tensors, meta, grad_out, options)
    as32 = {n: x.float() if x is not None else None for n, x in tensors.items()}
    ref32, ref32_grads = _run(pytorch_hstu_attention, as32, meta, grad_out.float(), options)
    for name, got, r16, r32 in [("out", out, ref16, ref32)] + [
            (n, grads[n], ref16_grads[n], ref32_grads[n]) for n in ref32_grads]:
        got, r16 = got.float(), r16.float()
        floor = 5e-3 * float(r32.abs().max()) + 1e-6
        excess = (got - r32).abs() - (2 * (r16 - r32).abs() + floor)
        assert torch.isfinite(got).all(), name
        assert float(excess.max()) <= 0, f"{name}: {int((excess > 0).sum())} elements over, worst by {float(excess.max()):.3e}"


@pytest.mark.gpu
def test_gpu_fp32_close_to_float64():
    tensors, meta = _make_case(_gpu_lengths(2), targets=True, device="cuda")
    options = dict(local_window=64, global_prefix=16)
    grad_out = torch.randn(tensors["q"].shape[0], tensors["q"].shape[1], tensors["v"].shape[2], device="cuda")
    out, grads = _run(tk.triton_hstu_attention, tensors, meta, grad_out, options)
    ref, ref_grads = _ref64(tensors, meta, grad_out, options)
    for name, got, want in [("out", out, ref)] + [(n, grads[n], ref_grads[n]) for n in ref_grads]:
        rel = float((got.double() - want).norm() / want.norm())
        assert rel < 1e-4, f"{name}: relative error {rel:.2e}"


@pytest.mark.gpu
def test_gpu_torch_compile_matches_eager():
    tensors, meta = _make_case([100, 300, 5], device="cuda", dtype=torch.bfloat16, targets=True)
    q, k, v = (tensors[n].requires_grad_(True) for n in "qkv")

    def f(q, k, v):
        return tk.triton_hstu_attention(q, k, v, meta["offsets"], meta["max_seq_len"], ALPHA,
                                        num_targets=meta["num_targets"])

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.float().sum(), (q, k, v)),
                    torch.autograd.grad(eager.float().sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_32k_token_smoke():
    length = 32 * 1024
    tensors, meta = _make_case([length], heads=2, dqk=64, dv=64, device="cuda", dtype=torch.bfloat16)
    q, k, v = (tensors[n].requires_grad_(True) for n in "qkv")
    out = tk.triton_hstu_attention(q, k, v, meta["offsets"], length, 1.0 / 8)
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    assert float(out.float().abs().max()) > 0
