"""Triton fused STCA history projection (kernels/triton_history_projection.py) against the PyTorch reference.

CPU: the Triton interpreter (TRITON_INTERPRET=1, set before triton is first imported), fp32, tiny shapes:
N = 0, 1, odd N, d / h / K-V widths that are not powers of two nor multiples of the tile, residual on and off,
a backward that runs in several row blocks; forward and all six gradients against the float64 reference's
autograd. Also: the dispatcher's triton backend, opcheck, torch.compile (aot_eager) against eager.
GPU (@pytest.mark.gpu): bf16 / fp16 under STYLE.md's rule |kernel - ref_fp32| <= 2 |ref_same_dtype - ref_fp32|
+ floor at the STCA shapes, fp32 close to float64, torch.compile against eager, a 1M-row smoke test.
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

import merlin_longseq.kernels.triton_history_projection as tk  # noqa: E402
from merlin_longseq.ops.history_projection import history_projection  # noqa: E402
from merlin_longseq.ops.pytorch.pt_history_projection import pytorch_history_projection  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

ON_CPU = not torch.cuda.is_available()
if ON_CPU and not isinstance(tk._hp_fwd_kernel.fn, InterpretedFunction):
    pytest.skip("the kernel module was imported before TRITON_INTERPRET=1 was set; run this file on its own",
                allow_module_level=True)

NAMES = ["k", "v", "dx", "dw_gate_up", "dw_down", "dln_weight", "dln_bias", "dw_kv"]


def _make_case(n, d, hidden, heads, head_dim, device="cpu", dtype=torch.float32, seed=0):
    """x and the five weights (random, none zero), rounded to dtype."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, d, generator=gen),
               torch.randn(2 * hidden, d, generator=gen) / d ** 0.5,
               torch.randn(d, hidden, generator=gen) / hidden ** 0.5,
               1 + 0.2 * torch.randn(d, generator=gen),
               0.2 * torch.randn(d, generator=gen),
               torch.randn(2 * heads * head_dim, d, generator=gen) / d ** 0.5]
    return [t.to(device=device, dtype=dtype) for t in tensors]


def _run(fn, inputs, grads_out, **kwargs):
    """Outputs (k, v) and the gradients of all six inputs for upstream gradients grads_out."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    k, v = fn(*leaves, **kwargs)
    grads = torch.autograd.grad((k, v), leaves, [g.to(k.dtype) for g in grads_out])
    return [k.detach(), v.detach()] + list(grads)


def _reference(inputs, grads_out, dtype=torch.float64, **kwargs):
    return _run(pytorch_history_projection, [t.to(dtype) for t in inputs], [g.to(dtype) for g in grads_out],
                **kwargs)


# (id, N, d, h, H, Dh, residual, interpreter tiles (BLOCK_M, BLOCK_H, BLOCK_O), backward rows per block)
CPU_CASES = [
    ("odd_rows_padded_widths", 37, 24, 40, 2, 12, True, (16, 16, 16), None),
    ("residual_off_even_tiles", 33, 16, 32, 1, 16, False, (16, 16, 16), None),
    ("one_row", 1, 20, 24, 2, 8, True, (16, 32, 16), None),
    ("no_rows", 0, 16, 16, 2, 8, True, (16, 16, 16), None),
    ("backward_in_row_blocks", 45, 16, 24, 3, 8, False, (32, 16, 32), 16),
]


@pytest.mark.skipif(not ON_CPU, reason="interpreter cases run on CPU; the GPU has its own tests")
@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_matches_reference_forward_and_backward(case, monkeypatch):
    _, n, d, hidden, heads, head_dim, residual, blocks, bwd_rows = case
    tk._set_interpret_blocks(*blocks)
    if bwd_rows:
        monkeypatch.setattr(tk, "_BWD_CHUNK", bwd_rows)
    inputs = _make_case(n, d, hidden, heads, head_dim, seed=n)
    grads_out = [torch.randn(n, heads, head_dim), torch.randn(n, heads, head_dim)]
    kwargs = dict(residual=residual, eps=1e-5, num_heads=heads)
    got = _run(tk.triton_history_projection, inputs, grads_out, **kwargs)
    want = _reference(inputs, grads_out, **kwargs)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        if w.numel():
            err = float((g.double() - w).abs().max())
            tol = 2e-5 * float(w.abs().max()) + 1e-6
            assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e}"
        elif name.startswith("dw") or name.startswith("dln"):
            assert not g.abs().any(), name  # no rows: zero weight gradients


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_outputs_are_written_everywhere_and_contiguous():
    # a wrong row/column mask would leave parts of torch.empty outputs unwritten: compare every element
    tk._set_interpret_blocks(16, 16, 16)
    inputs = _make_case(19, 20, 24, 2, 7, seed=3)
    k, v = tk.triton_history_projection(*inputs, residual=True, eps=1e-5, num_heads=2)
    want_k, want_v = pytorch_history_projection(*inputs, residual=True, eps=1e-5, num_heads=2)
    assert k.is_contiguous() and v.is_contiguous()
    torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_dispatcher_backend_triton_runs_the_kernel():
    tk._set_interpret_blocks(16, 16, 16)
    inputs = _make_case(21, 16, 32, 2, 8, seed=1)
    got = history_projection(*inputs, num_heads=2, backend="triton")
    want = tk.triton_history_projection(*inputs, residual=True, eps=1e-5, num_heads=2)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    ref = history_projection(*inputs, num_heads=2, backend="pytorch")
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_custom_op_passes_opcheck():
    tk._set_interpret_blocks(16, 16, 16)
    inputs = [t.requires_grad_(True) for t in _make_case(5, 16, 16, 2, 8, seed=2)]
    torch.library.opcheck(torch.ops.merlin_longseq.history_projection_fwd.default, (*inputs, True, 1e-5, 2))


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_torch_compile_matches_eager_on_cpu():
    tk._set_interpret_blocks(16, 16, 16)
    inputs = _make_case(17, 16, 24, 2, 8, seed=4)
    grads_out = [torch.randn(17, 2, 8), torch.randn(17, 2, 8)]

    def fn(*args, **kwargs):
        k, v = tk.triton_history_projection(*args, **kwargs)
        return k * 2, v + 1  # ops around the custom op, traced by dynamo

    eager = _run(fn, inputs, grads_out, residual=True, eps=1e-5, num_heads=2)
    compiled = _run(torch.compile(fn, backend="aot_eager", fullgraph=True), inputs, grads_out, residual=True,
                    eps=1e-5, num_heads=2)
    for name, a, b in zip(NAMES, compiled, eager):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------
GPU_SHAPES = [(64, 128, 2, 32), (256, 512, 4, 64), (96, 200, 3, 24)]  # (d, h, H, Dh): STCA default, wide, odd


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "bare"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=["d64", "d256", "d96_odd"])
def test_gpu_half_within_twice_the_reference_error(shape, residual, dtype):
    d, hidden, heads, head_dim = shape
    n = 5003  # not a multiple of any tile
    inputs = _make_case(n, d, hidden, heads, head_dim, device="cuda", dtype=dtype, seed=d)
    gen = torch.Generator(device="cuda").manual_seed(1)
    grads_out = [torch.randn(n, heads, head_dim, device="cuda", generator=gen).to(dtype) for _ in range(2)]
    kwargs = dict(residual=residual, eps=1e-5, num_heads=heads)
    got = _run(tk.triton_history_projection, inputs, grads_out, **kwargs)
    ref16 = _reference(inputs, grads_out, dtype=dtype, **kwargs)
    ref32 = _reference(inputs, grads_out, dtype=torch.float32, **kwargs)
    for name, g, r16, r32 in zip(NAMES, got, ref16, ref32):
        assert g.dtype == dtype, name
        g, r16 = g.float(), r16.float()
        floor = 5e-3 * float(r32.abs().max()) + 1e-6
        excess = (g - r32).abs() - (2 * (r16 - r32).abs() + floor)
        assert torch.isfinite(g).all(), name
        assert float(excess.max()) <= 0, f"{name}: {int((excess > 0).sum())} over, worst by {float(excess.max()):.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES[:2], ids=["d64", "d256"])
def test_gpu_fp32_close_to_float64(shape):
    d, hidden, heads, head_dim = shape
    n = 3001
    inputs = _make_case(n, d, hidden, heads, head_dim, device="cuda", seed=7)
    grads_out = [torch.randn(n, heads, head_dim, device="cuda") for _ in range(2)]
    kwargs = dict(residual=True, eps=1e-5, num_heads=heads)
    got = _run(tk.triton_history_projection, inputs, grads_out, **kwargs)
    want = _reference(inputs, grads_out, **kwargs)
    for name, g, w in zip(NAMES, got, want):
        rel = float((g.double() - w).norm() / w.norm())
        assert rel < 1e-4, f"{name}: relative error {rel:.2e}"


@pytest.mark.gpu
def test_gpu_torch_compile_matches_eager():
    inputs = [t.requires_grad_(True) for t in _make_case(4099, 64, 128, 2, 32, device="cuda",
                                                         dtype=torch.bfloat16)]

    def f(*args):
        k, v = tk.triton_history_projection(*args, residual=True, eps=1e-5, num_heads=2)
        return (k.float() * v.float()).sum(-1)

    eager = f(*inputs)
    compiled = torch.compile(f, fullgraph=True)(*inputs)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), inputs), torch.autograd.grad(eager.sum(), inputs)):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_one_million_rows_smoke():
    inputs = [t.requires_grad_(True) for t in _make_case(1 << 20, 64, 128, 2, 32, device="cuda",
                                                         dtype=torch.bfloat16)]
    k, v = tk.triton_history_projection(*inputs, residual=True, eps=1e-5, num_heads=2)
    (k.float().square().mean() + v.float().mean()).backward()
    torch.cuda.synchronize()
    for t in (k, v, *(x.grad for x in inputs)):
        assert torch.isfinite(t).all()
    # the last rows (the final program) are real outputs, not leftovers of torch.empty
    with torch.no_grad():
        want_k, want_v = pytorch_history_projection(*(x[-300:] if i == 0 else x for i, x in enumerate(inputs)),
                                                    residual=True, eps=1e-5, num_heads=2)
    torch.testing.assert_close(k[-300:].float(), want_k.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(v[-300:].float(), want_v.float(), rtol=0.05, atol=0.05)
