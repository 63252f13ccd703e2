"""STCA history projection (LayerNorm(x + SwiGLU(x)) -> K, V): input checks once, then the explicit backend
choice.

Semantics are documented in ops/pytorch/pt_history_projection.py. The op is row-wise (no offsets): x holds
every request's history tokens back to back.
"""
from __future__ import annotations

import torch

from merlin_longseq.backend import Backend, BackendUnavailableError, resolve_backend
from merlin_longseq.jagged import JaggedInputError
from merlin_longseq.ops._triton import kernel_module
from merlin_longseq.ops.pytorch.pt_history_projection import pytorch_history_projection

def _check_inputs(x, w_gate_up, w_down, ln_weight, ln_bias, w_kv, num_heads, eps) -> None:
    if x.dim() != 2:
        raise JaggedInputError(f"x must be [total_history, d], got shape {tuple(x.shape)}")
    d = x.shape[1]
    if d < 1:
        raise JaggedInputError("x must have at least one feature column (d >= 1)")
    if w_gate_up.dim() != 2 or w_gate_up.shape[1] != d or w_gate_up.shape[0] < 2 or w_gate_up.shape[0] % 2:
        raise ValueError(f"w_gate_up must be [2h, d] = [2h, {d}] with h >= 1 (gate rows, then up rows), got "
                         f"{tuple(w_gate_up.shape)}")
    hidden = w_gate_up.shape[0] // 2
    if tuple(w_down.shape) != (d, hidden):
        raise ValueError(f"w_down must be [d, h] = [{d}, {hidden}] (h from w_gate_up), got {tuple(w_down.shape)}")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if tuple(t.shape) != (d,):
            raise ValueError(f"{name} must be [d] = [{d}], got {tuple(t.shape)}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if w_kv.dim() != 2 or w_kv.shape[1] != d or w_kv.shape[0] < 2 * num_heads or w_kv.shape[0] % (2 * num_heads):
        raise ValueError(f"w_kv must be [2 * num_heads * head_dim, d] = [2 * {num_heads} * Dh, {d}] (K rows, then "
                         f"V rows), got {tuple(w_kv.shape)}")
    tensors = dict(x=x, w_gate_up=w_gate_up, w_down=w_down, ln_weight=ln_weight, ln_bias=ln_bias, w_kv=w_kv)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1 or not x.is_floating_point():
        raise ValueError("x and all weights must share one floating dtype, got "
                         + ", ".join(f"{k}={t.dtype}" for k, t in tensors.items()))
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError("x and all weights must be on one device, got "
                         + ", ".join(f"{k}={t.device}" for k, t in tensors.items()))
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def history_projection(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w_kv: torch.Tensor,
    *,
    num_heads: int,
    residual: bool = True,
    eps: float = 1e-5,
    backend: Backend | str = Backend.AUTO,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [total_history, H, Dh] of LayerNorm(x + SwiGLU(x)) (residual) or LayerNorm(SwiGLU(x)).

    Args:
        x: [total_history, d] history tokens (all requests back to back; the op is row-wise).
        w_gate_up: [2h, d] SwiGLU gate rows then up rows (nn.Linear(d, 2h, bias=False).weight).
        w_down: [d, h] SwiGLU down projection. ln_weight, ln_bias: [d] LayerNorm affine parameters.
        w_kv: [2 H Dh, d], K rows then V rows (nn.Linear(d, 2 H Dh, bias=False).weight).
        num_heads: H. residual: add x before the LayerNorm. eps: the LayerNorm's eps.
        backend: auto / triton / pytorch (see merlin_longseq.backend). auto takes the fused kernel on CUDA
            for d <= 256 (the kernel's MAX_D) when no gradient is needed, and the reference otherwise (its
            cuBLAS backward is faster than the kernel's recomputing one); triton always takes the kernel and
            raises where it cannot run.
    Returns:
        (K, V), each [total_history, H, Dh]: contiguous from the kernel, views of one product from the
        reference.
    """
    if check_inputs:
        _check_inputs(x, w_gate_up, w_down, ln_weight, ln_bias, w_kv, num_heads, eps)
    chosen = resolve_backend(backend, x, w_gate_up, w_down, ln_weight, ln_bias, w_kv)
    training = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, w_gate_up, w_down, ln_weight, ln_bias, w_kv))
    if chosen is Backend.TRITON and training and Backend.parse(backend) is Backend.AUTO:
        # the kernel's backward recomputes the activations chunk by chunk: on the H100 (d = 64, 655K rows) the
        # layer's forward+backward took 12.0 ms with it and 4.6 ms with cuBLAS autograd; auto keeps the fused
        # kernel for inference (user-side encoding, serving), where it is 6x faster, and trains on PyTorch
        chosen = Backend.PYTORCH
    if chosen is Backend.TRITON:
        module = kernel_module("history_projection", backend)
        if module is not None and x.shape[-1] <= module.MAX_D:
            if torch.is_autocast_enabled(x.device.type):
                # autocast does not reach a Triton kernel: cast as it would for the Linear layers, so the
                # kernel runs its bf16 / fp16 path (the LayerNorm is fp32 inside the kernel either way)
                low = torch.get_autocast_dtype(x.device.type)
                x, w_gate_up, w_down, ln_weight, ln_bias, w_kv = (
                    t.to(low) for t in (x, w_gate_up, w_down, ln_weight, ln_bias, w_kv))
            return module.triton_history_projection(x, w_gate_up, w_down, ln_weight, ln_bias, w_kv,
                                                    residual=residual, eps=eps, num_heads=num_heads)
        if module is not None and Backend.parse(backend) is Backend.TRITON:
            raise BackendUnavailableError(
                f"the Triton history_projection kernel supports d <= {module.MAX_D}, got d = {x.shape[-1]}; "
                "use backend='pytorch' (or 'auto')")
    return pytorch_history_projection(x, w_gate_up, w_down, ln_weight, ln_bias, w_kv, residual=residual, eps=eps,
                                      num_heads=num_heads)
