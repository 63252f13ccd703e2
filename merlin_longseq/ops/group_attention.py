"""Group attention (LONGER's InnerTransformer inside K-token groups): input checks once, then the explicit backend
choice.

Semantics (a slot sees the valid slots of its own group and itself) are documented in
ops/pytorch/pt_group_attention.py.
"""
from __future__ import annotations

import math

import torch

from merlin_longseq.backend import Backend, resolve_backend
from merlin_longseq.ops._triton import kernel_module
from merlin_longseq.ops.pytorch.pt_group_attention import pytorch_group_attention


def _check_inputs(q, k, v, slot_valid, scale) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [G, K, H, Dh] (groups, slots, heads, head dim), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if slot_valid.dtype != torch.bool:
        raise ValueError(f"slot_valid must be a bool tensor, got {slot_valid.dtype}")
    if slot_valid.shape != q.shape[:2]:
        raise ValueError(f"slot_valid must be [G, K] = {list(q.shape[:2])}, got {list(slot_valid.shape)}")
    devices = {t.device for t in (q, k, v, slot_valid)}
    if len(devices) > 1:
        raise ValueError(f"q, k, v and slot_valid must be on one device, got {sorted(map(str, devices))}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite, got {scale}")


def group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_valid: torch.Tensor,
    scale: float | None = None,
    *,
    backend: Backend | str = Backend.AUTO,
    variant: str | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Softmax attention inside each group of K slots: slot i of group g attends to slot j of the same group
    iff slot_valid[g, j] or i == j (per head).

    Args:
        q, k, v: [G, K, H, Dh], any strides (the Triton kernel wants a contiguous last dim and copies otherwise).
        slot_valid: [G, K] bool, False for an empty slot (never a key of another slot).
        scale: score scale; 1 / sqrt(Dh) by default.
        backend: auto / triton / pytorch (see merlin_longseq.backend). auto runs Triton on CUDA tensors when
            the kernel takes the input (K <= 64, Dh <= 256, fp32 / bf16 / fp16), the PyTorch reference
            otherwise; triton raises where it cannot run.
        variant: the Triton kernel's variant ("dot" / "bcast", kernels/triton_group_attention.py); None = its
            default. Ignored by the PyTorch reference.
        check_inputs: False skips the checks (a caller that built the inputs itself).
    Returns:
        [G, K, H, Dh] in q's dtype; an empty slot's row attends to itself only (finite, no special case).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.dim() == 4 and q.shape[-1] else 1.0
    if check_inputs:
        _check_inputs(q, k, v, slot_valid, scale)
    chosen = resolve_backend(backend, q, k, v, slot_valid)
    if chosen is Backend.TRITON:
        module = kernel_module("group_attention", backend)
        if module is not None:
            chosen_variant = module._default_variant() if variant is None else variant
            if chosen_variant not in module.VARIANTS:  # a typo is an error under auto too
                raise ValueError(f"variant must be one of {module.VARIANTS}, got {chosen_variant!r}")
            try:  # inputs the kernel does not take: auto falls back, an explicit triton raises
                module.check_supported(q, chosen_variant)
            except ValueError:
                if Backend.parse(backend) is Backend.TRITON:
                    raise
            else:
                return module.triton_group_attention(q, k, v, slot_valid, scale=scale, variant=chosen_variant)
    return pytorch_group_attention(q, k, v, slot_valid, scale)
