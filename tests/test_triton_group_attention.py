"""Triton group attention (kernels/triton_group_attention.py) against the PyTorch reference.

CPU: the Triton interpreter (TRITON_INTERPRET=1, set before triton is first imported), fp32, both variants
("dot" and "bcast"), forward and backward against the float64 reference's autograd: G = 0, 1 and odd G not a
multiple of the groups per program; K = 1, 3, 4, 8; H = 1, 2; Dh = 8, 24, 32; all-empty groups; q, k, v as
strided views of Linear outputs. Also the dispatcher, the custom op's opcheck and the kernel's shape limits.
GPU (@pytest.mark.gpu): bf16 / fp16 under STYLE.md's rule |kernel - ref_fp32| <= 2 |ref_same_dtype - ref_fp32|
+ floor, fp32 against float64, torch.compile == eager, and a 1M-group smoke test.
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

import merlin_longseq.kernels.triton_group_attention as tk  # noqa: E402
from merlin_longseq.ops.group_attention import group_attention  # noqa: E402
from merlin_longseq.ops.pytorch.pt_group_attention import pytorch_group_attention  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

ON_CPU = not torch.cuda.is_available()
if ON_CPU and not isinstance(tk._ga_fwd_kernel.fn, InterpretedFunction):
    pytest.skip("the kernel module was imported before TRITON_INTERPRET=1 was set; run this file on its own",
                allow_module_level=True)

VARIANTS = ["dot", "bcast"]


def make_case(groups, slots, heads, dim, strided=False, empty_groups=(), device="cpu", dtype=torch.float32,
              seed=0):
    """q, k, v [G, K, H, Dh] and slot_valid [G, K]. strided: as in SelfAttentionBlock, q is a Linear's output
    and k, v the two halves of another one's (token stride 2 H Dh); here with 3 spare columns as well. Drawn on
    `device` in `dtype` first and sliced after (a .to() of a view would hand back a contiguous copy)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    width = heads * dim
    if strided:
        q = randn(groups, slots, width + 3)[..., :width]
        kv = randn(groups, slots, 2 * width + 3)
        k, v = kv[..., :width], kv[..., width:2 * width]
    else:
        q, k, v = (randn(groups, slots, width) for _ in range(3))
    q, k, v = (x.unflatten(-1, (heads, dim)) for x in (q, k, v))
    slot_valid = torch.rand(groups, slots, generator=gen, device=device) < 0.6
    for g in empty_groups:
        slot_valid[g] = False
    return (q, k, v), slot_valid


def run(fn, qkv, slot_valid, grad_out, **kwargs):
    leaves = [x.detach().requires_grad_(True) for x in qkv]  # keeps the views' strides
    out = fn(*leaves, slot_valid, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), list(grads)


def reference(qkv, slot_valid, grad_out, scale, dtype=torch.float64):
    return run(lambda q, k, v, s: pytorch_group_attention(q, k, v, s, scale), [x.to(dtype) for x in qkv],
               slot_valid, grad_out.to(dtype))


# (id, G, K, H, Dh, case kwargs, interpreter rows per program)
CPU_CASES = [
    ("G0", 0, 4, 1, 8, {}, 16),
    ("G1_K4", 1, 4, 1, 32, {}, 16),
    ("odd_G_K4_strided", 13, 4, 1, 32, dict(strided=True, empty_groups=(0, 12)), 16),
    ("K1", 7, 1, 2, 8, {}, 16),
    ("K3_Dh24_H2", 11, 3, 2, 24, dict(empty_groups=(5,)), 16),
    ("K8_H2_strided", 9, 8, 2, 8, dict(strided=True, empty_groups=(2,)), 16),
    ("K8_Dh24", 5, 8, 1, 24, {}, 32),
]


@pytest.mark.skipif(not ON_CPU, reason="interpreter cases run on CPU; the GPU has its own tests")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_matches_reference_forward_and_backward(case, variant):
    _, groups, slots, heads, dim, case_kwargs, rows = case
    tk._set_interpret_rows(rows)
    qkv, slot_valid = make_case(groups, slots, heads, dim, **case_kwargs)
    grad_out = torch.randn(groups, slots, heads, dim)
    if case_kwargs.get("strided"):
        assert not qkv[0].is_contiguous() and not qkv[1].is_contiguous()
    scale = 0.3
    out, grads = run(tk.triton_group_attention, qkv, slot_valid, grad_out, scale=scale, variant=variant)
    ref, ref_grads = reference(qkv, slot_valid, grad_out, scale)
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out] + grads, [ref] + ref_grads):
        assert got.shape == want.shape and got.is_contiguous(), name
        if not want.numel():
            continue
        assert torch.isfinite(got).all(), name
        err = float((got.double() - want).abs().max())
        tol = 1e-5 * float(want.abs().max()) + 1e-6
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e}"


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
@pytest.mark.parametrize("variant", VARIANTS)
def test_dispatcher_backend_triton_runs_the_kernel(variant):
    tk._set_interpret_rows(16)
    (q, k, v), slot_valid = make_case(6, 4, 2, 8)
    got = group_attention(q, k, v, slot_valid, backend="triton", variant=variant)
    assert torch.equal(got, tk.triton_group_attention(q, k, v, slot_valid, variant=variant))
    torch.testing.assert_close(got, group_attention(q, k, v, slot_valid, backend="pytorch"), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_default_variant_comes_from_the_environment(monkeypatch):
    tk._set_interpret_rows(16)
    # the module reads MERLIN_LONGSEQ_GA_VARIANT once, at import, into _DEFAULT_VARIANT
    monkeypatch.setattr(tk, "_DEFAULT_VARIANT", "nope")
    (q, k, v), slot_valid = make_case(3, 4, 1, 8)
    with pytest.raises(ValueError, match="MERLIN_LONGSEQ_GA_VARIANT"):
        tk.triton_group_attention(q, k, v, slot_valid)
    monkeypatch.setattr(tk, "_DEFAULT_VARIANT", "bcast")
    torch.testing.assert_close(tk.triton_group_attention(q, k, v, slot_valid),
                               pytorch_group_attention(q, k, v, slot_valid, 8 ** -0.5), rtol=1e-5, atol=1e-6)
    (q, k, v), slot_valid = make_case(2, 16, 1, 64)  # too large for bcast: proves bcast was the default
    with pytest.raises(ValueError, match="variant 'bcast'"):
        tk.triton_group_attention(q, k, v, slot_valid)


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_unsupported_inputs_raise_under_triton_and_fall_back_under_auto():
    (q, k, v), slot_valid = make_case(2, 65, 1, 8)
    with pytest.raises(ValueError, match="K = 1..64"):
        group_attention(q, k, v, slot_valid, backend="triton")
    (q, k, v), slot_valid = make_case(2, 4, 1, 257)
    with pytest.raises(ValueError, match="head dims 1..256"):
        group_attention(q, k, v, slot_valid, backend="triton")
    (q, k, v), slot_valid = make_case(2, 16, 1, 64)
    with pytest.raises(ValueError, match="variant 'bcast'"):
        group_attention(q, k, v, slot_valid, backend="triton", variant="bcast")
    with pytest.raises(ValueError, match="variant must be one of"):
        group_attention(q, k, v, slot_valid, backend="triton", variant="wmma")
    (q64, k64, v64), valid64 = make_case(2, 4, 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        group_attention(q64, k64, v64, valid64, backend="triton")
    # auto on CPU tensors is the reference whatever the shape
    torch.testing.assert_close(group_attention(q, k, v, slot_valid),
                               pytorch_group_attention(q, k, v, slot_valid, 64 ** -0.5))


def test_rejections_are_checked_again_on_every_call():
    # the checks' verdict is kept for accepted shapes only: the same bad input raises each time
    (q, k, v), slot_valid = make_case(2, 65, 1, 8)
    for _ in range(2):
        with pytest.raises(ValueError, match="K = 1..64"):
            tk.triton_group_attention(q, k, v, slot_valid)
        with pytest.raises(ValueError, match="variant must be one of"):
            tk.check_supported(q, "wmma")


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_custom_op_passes_opcheck():
    tk._set_interpret_rows(16)
    (q, k, v), slot_valid = make_case(5, 3, 2, 8, strided=True)
    args = (q.detach().requires_grad_(True), k.detach().requires_grad_(True), v.detach().requires_grad_(True),
            slot_valid, 0.35, "dot")
    torch.library.opcheck(torch.ops.merlin_longseq.group_attention_fwd.default, args)


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------
# (K, H, Dh): LONGER's default (K=4, one head of 32), two heads, K=8 with a padded head dim, odd K, K=1, K=32
GPU_SHAPES = [(4, 1, 32), (4, 2, 16), (8, 2, 24), (3, 1, 32), (1, 1, 32), (32, 1, 32)]


def _gpu_variants(slots, dim):
    kp, dp = tk._padded_dims(slots, dim, "bcast")
    return VARIANTS if kp * kp * dp <= tk._BCAST_BUDGET else ["dot"]


GPU_CASES = [(v, s, torch.bfloat16) for s in GPU_SHAPES for v in _gpu_variants(s[0], s[2])]
GPU_CASES += [(v, (4, 1, 32), torch.float16) for v in VARIANTS]


@pytest.mark.gpu
@pytest.mark.parametrize("variant,shape,dtype", GPU_CASES,
                         ids=[f"{v}_K{s[0]}_H{s[1]}_Dh{s[2]}_{str(d)[6:]}" for v, s, d in GPU_CASES])
def test_gpu_low_precision_within_twice_the_reference_error(variant, shape, dtype):
    slots, heads, dim = shape
    qkv, slot_valid = make_case(4099, slots, heads, dim, strided=True, empty_groups=(0, 4098), device="cuda",
                                dtype=dtype)
    grad_out = torch.randn(4099, slots, heads, dim, device="cuda").to(dtype)
    scale = dim ** -0.5
    out, grads = run(tk.triton_group_attention, qkv, slot_valid, grad_out, scale=scale, variant=variant)
    ref16, ref16_grads = reference(qkv, slot_valid, grad_out, scale, dtype=dtype)
    ref32, ref32_grads = reference(qkv, slot_valid, grad_out, scale, dtype=torch.float32)
    for name, got, r16, r32 in zip(["out", "dq", "dk", "dv"], [out] + grads, [ref16] + ref16_grads,
                                   [ref32] + ref32_grads):
        got, r16 = got.float(), r16.float()
        floor = 5e-3 * float(r32.abs().max()) + 1e-6
        excess = (got - r32).abs() - (2 * (r16 - r32).abs() + floor)
        assert torch.isfinite(got).all(), name
        assert float(excess.max()) <= 0, f"{name}: {int((excess > 0).sum())} over, worst by {float(excess.max()):.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_fp32_close_to_float64(variant):
    qkv, slot_valid = make_case(3001, 4, 2, 16, strided=True, empty_groups=(7,), device="cuda")
    grad_out = torch.randn(3001, 4, 2, 16, device="cuda")
    out, grads = run(tk.triton_group_attention, qkv, slot_valid, grad_out, scale=0.25, variant=variant)
    ref, ref_grads = reference(qkv, slot_valid, grad_out, 0.25)
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out] + grads, [ref] + ref_grads):
        rel = float((got.double() - want).norm() / want.norm())
        assert rel < 1e-4, f"{name}: relative error {rel:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_torch_compile_matches_eager(variant):
    qkv, slot_valid = make_case(777, 4, 1, 32, strided=True, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x.detach().requires_grad_(True) for x in qkv)

    def f(q, k, v):
        return tk.triton_group_attention(q, k, v, slot_valid, variant=variant).float().square().sum(-1)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), (q, k, v)), torch.autograd.grad(eager.sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_one_million_groups_smoke(variant):
    """G = 2^20 groups of K = 4 (LONGER at 128 requests x 32K events): runs, finite, and the first and last
    groups match the reference (groups are independent, so a slice is checked on its own)."""
    groups = 1 << 20
    qkv, slot_valid = make_case(groups, 4, 1, 32, strided=True, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x.detach().requires_grad_(True) for x in qkv)
    out = tk.triton_group_attention(q, k, v, slot_valid, variant=variant)
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    with torch.no_grad():
        for part in (slice(0, 2048), slice(groups - 2048, groups)):
            ref = pytorch_group_attention(*(x[part].float() for x in (q, k, v)), slot_valid[part], 32 ** -0.5)
            torch.testing.assert_close(out[part].float(), ref, rtol=2e-2, atol=2e-2)
