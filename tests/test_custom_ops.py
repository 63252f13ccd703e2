"""The kernels' torch.library registration (CPU: Triton interpreter, fake tensors) and the TorchScript-traceable
PyTorch reference path.

- the forward and backward ops of all four kernels exist under torch.ops.merlin_longseq;
- torch.library.opcheck passes (schema, fake/meta implementation, autograd registration);
- torch.compile(fullgraph=True) of a small STCA-style step through the dispatcher (backend='triton') matches
  eager in output and gradients: the op traces without a graph break;
- the dispatchers with backend='pytorch' trace with torch.jit.trace and the trace reproduces the eager output;
- the lean launch path (kernels/_common.py): eager calls skip the custom op, and a repeated shape bucket
  launches with the kept config instead of going through the autotuner.
"""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (see the kernel test files)

from merlin_longseq.jagged import offsets_from_lengths  # noqa: E402
from merlin_longseq.ops.hstu_attention import hstu_attention  # noqa: E402
from merlin_longseq.ops.target_attention import target_attention  # noqa: E402

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton extra")
ON_CPU = not torch.cuda.is_available()
DEVICE = "cpu" if ON_CPU else "cuda"


def _kernels():
    import merlin_longseq.kernels.triton_group_attention as gk
    import merlin_longseq.kernels.triton_history_projection as pk
    import merlin_longseq.kernels.triton_hstu_attention as hk
    import merlin_longseq.kernels.triton_target_attention as tk
    from triton.runtime.interpreter import InterpretedFunction
    if ON_CPU and not isinstance(tk._ta_combine_kernel, InterpretedFunction):
        pytest.skip("kernels imported before TRITON_INTERPRET=1 was set; run this file on its own")
    if ON_CPU:
        hk._set_interpret_blocks(16, 16)
        tk._set_interpret_blocks(16, 16)
        gk._set_interpret_rows(16)
        pk._set_interpret_blocks(16, 16, 16)
    return hk, tk


@needs_triton
def test_ops_are_registered():
    _kernels()
    for op in ("hstu_attention", "target_attention", "group_attention", "history_projection"):
        for name in (f"{op}_fwd", f"{op}_bwd"):
            assert hasattr(torch.ops.merlin_longseq, name), name


@needs_triton
def test_opcheck_both_forward_ops():
    _kernels()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(13, 2, 16, generator=gen).to(DEVICE).requires_grad_(True) for _ in range(3))
    offsets = offsets_from_lengths(torch.tensor([4, 9])).to(DEVICE)
    torch.library.opcheck(torch.ops.merlin_longseq.hstu_attention_fwd.default,
                          (q, k, v, offsets, None, None, None, None, 9, 0.3, True, 0, 0))
    qt = torch.randn(3, 2, 16, generator=gen).to(DEVICE).requires_grad_(True)
    q_off = offsets_from_lengths(torch.tensor([1, 2])).to(DEVICE)
    kv_off = offsets_from_lengths(torch.tensor([5, 8])).to(DEVICE)
    # num_splits=2: the split-KV path, combine kernel and dQ atomics; then with per-target key limits
    torch.library.opcheck(torch.ops.merlin_longseq.target_attention_fwd.default,
                          (qt, k, v, q_off, kv_off, None, 0.25, 2, 8, 2))
    torch.library.opcheck(torch.ops.merlin_longseq.target_attention_fwd.default,
                          (qt, k, v, q_off, kv_off, torch.tensor([3, 0, 8]).to(DEVICE), 0.25, 2, 8, 2))


@needs_triton
def test_torch_compile_of_a_stca_style_step_matches_eager():
    _kernels()
    gen = torch.Generator().manual_seed(1)
    proj = torch.nn.Linear(16, 2 * 2 * 8).to(DEVICE)
    history = torch.randn(21, 16, generator=gen).to(DEVICE)
    targets = torch.randn(4, 2, 8, generator=gen).to(DEVICE).requires_grad_(True)
    q_off = offsets_from_lengths(torch.tensor([3, 1])).to(DEVICE)
    kv_off = offsets_from_lengths(torch.tensor([17, 4])).to(DEVICE)

    def step(targets):
        k, v = proj(history).view(21, 2, 2, 8).unbind(1)  # [total, H, D] each
        out = target_attention(targets, k, v, q_off, kv_off, max_history_len=17, max_targets=3,
                               backend="triton", check_inputs=False)
        return out.square().sum()

    eager = step(targets)
    g_eager = torch.autograd.grad(eager, [targets] + list(proj.parameters()))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(targets)
    g_compiled = torch.autograd.grad(compiled, [targets] + list(proj.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pytorch_reference_paths_trace_with_torchscript():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(10, 2, 8, generator=gen) for _ in range(3))
    offsets = offsets_from_lengths(torch.tensor([3, 7]))

    def hstu(q, k, v):
        return hstu_attention(q, k, v, offsets, 7, 0.5, backend="pytorch", check_inputs=False)

    def cross(q, k, v):
        return target_attention(q[:4], k, v, offsets_from_lengths(torch.tensor([1, 3])), offsets,
                                backend="pytorch", check_inputs=False)

    for fn in (hstu, cross):
        traced = torch.jit.trace(fn, (q, k, v), check_trace=False)
        q2, k2, v2 = (torch.randn(10, 2, 8, generator=gen) for _ in range(3))  # same shapes, new values
        torch.testing.assert_close(traced(q2, k2, v2), fn(q2, k2, v2))


def _calls(gen, grad):
    """(kernel module, its autotuned forward kernel, a forward call returning a tuple, the tile-reset hook) for
    each of the four kernels, at tiny shapes."""
    import merlin_longseq.kernels.triton_group_attention as gk
    import merlin_longseq.kernels.triton_history_projection as pk
    hk, tk = _kernels()

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_(grad)

    q, k, v = leaf(13, 2, 16), leaf(13, 2, 16), leaf(13, 2, 16)
    offsets = offsets_from_lengths(torch.tensor([4, 9])).to(DEVICE)
    qt = leaf(3, 2, 16)
    q_off = offsets_from_lengths(torch.tensor([1, 2])).to(DEVICE)
    qg, kg, vg = leaf(5, 3, 2, 8), leaf(5, 3, 2, 8), leaf(5, 3, 2, 8)
    valid = (torch.rand(5, 3, generator=gen) < 0.6).to(DEVICE)
    x = leaf(7, 16)
    weights = [leaf(*shape) for shape in ((32, 16), (16, 16), (16,), (16,), (16, 16))]
    return [
        (hk, hk._hstu_fwd_kernel, lambda: (hk.triton_hstu_attention(q, k, v, offsets, 9, 0.3),),
         lambda: hk._set_interpret_blocks(16, 16)),
        (tk, tk._ta_fwd_kernel,
         lambda: tk.triton_target_attention(qt, k, v, q_off, offsets, max_history_len=9, max_targets=2,
                                            return_lse=True),
         lambda: tk._set_interpret_blocks(16, 16)),
        (gk, gk._ga_fwd_kernel, lambda: (gk.triton_group_attention(qg, kg, vg, valid),),
         lambda: gk._set_interpret_rows(16)),
        (pk, pk._hp_fwd_kernel,
         lambda: pk.triton_history_projection(x, *weights, residual=True, eps=1e-5, num_heads=2),
         lambda: pk._set_interpret_blocks(16, 16, 16)),
    ]


def _refuse(*args, **kwargs):
    raise AssertionError("this path must not be taken")


@needs_triton
@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_eager_calls_launch_without_the_custom_op(grad, monkeypatch):
    for module, _, call, _ in _calls(torch.Generator().manual_seed(3), grad):
        monkeypatch.setattr(module._OP, "fwd_op", _refuse)
        out = call()[0]
        if grad:  # the eager autograd.Function (same backward), not the op's registered autograd
            assert type(out.grad_fn).__name__ == module._OP.function.__name__ + "Backward", module.__name__
        else:
            assert out.grad_fn is None, module.__name__


@needs_triton
@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_a_repeated_bucket_skips_the_autotuner(monkeypatch):
    for module, kernel, call, reset_tiles in _calls(torch.Generator().manual_seed(4), False):
        first = call()  # the bucket's first call goes through the autotuner
        monkeypatch.setattr(kernel, "run", _refuse)  # the autotuner's entry point
        for a, b in zip(first, call()):
            assert torch.equal(a, b), module.__name__
        reset_tiles()  # new interpreter tiles drop the kept choices: the autotuner is asked again
        with pytest.raises(AssertionError, match="must not be taken"):
            call()
        monkeypatch.undo()
