"""Target-to-history cross attention (STCA under request level batching): input checks once, then the
explicit backend choice.

Semantics (key-padding mask only, zeros for an empty history) are documented in
ops/pytorch/pt_target_attention.py.
"""
from __future__ import annotations

import torch

from merlin_longseq.backend import Backend, resolve_backend
from merlin_longseq.jagged import JaggedInputError, lengths_from_offsets, validate_offsets
from merlin_longseq.ops._triton import kernel_module
from merlin_longseq.ops.pytorch.pt_target_attention import pytorch_target_attention


def _check_inputs(q, k, v, q_offsets, kv_offsets, scale, max_history_len, max_targets, key_limit) -> None:
    if q.dim() != 3:
        raise JaggedInputError(f"q must be [total_targets, H, D], got shape {tuple(q.shape)}")
    if k.dim() != 3 or k.shape[1:] != q.shape[1:]:
        raise JaggedInputError(
            f"k must be [total_history, H, D] with q's (H, D) = {tuple(q.shape[1:])}, got {tuple(k.shape)}"
        )
    if v.dim() != 3 or v.shape[:2] != k.shape[:2]:
        raise JaggedInputError(
            f"v must be [total_history, H, Dv] matching k's {tuple(k.shape[:2])}, got {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise JaggedInputError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    devices = {t.device for t in (q, k, v, q_offsets, kv_offsets)}
    if len(devices) > 1:
        raise JaggedInputError(f"q, k, v and both offsets must be on one device, got {sorted(map(str, devices))}")
    try:
        validate_offsets(q_offsets, total=q.shape[0], max_seq_len=max_targets)
    except JaggedInputError as err:
        raise JaggedInputError(f"q_offsets: {err}") from None
    try:
        validate_offsets(kv_offsets, total=k.shape[0], max_seq_len=max_history_len)
    except JaggedInputError as err:
        raise JaggedInputError(f"kv_offsets: {err}") from None
    if q_offsets.numel() != kv_offsets.numel():
        raise JaggedInputError(
            f"q_offsets and kv_offsets must describe the same requests: {q_offsets.numel() - 1} vs "
            f"{kv_offsets.numel() - 1}"
        )
    if not scale > 0:
        raise JaggedInputError(f"scale must be positive, got {scale}")
    if key_limit is not None:
        if key_limit.shape != (q.shape[0],) or key_limit.is_floating_point() or key_limit.dtype == torch.bool:
            raise JaggedInputError(
                f"key_limit must be an integer tensor [total_targets] = [{q.shape[0]}], got "
                f"{key_limit.dtype} {tuple(key_limit.shape)}")
        if key_limit.device != q.device:
            raise JaggedInputError(f"key_limit must be on {q.device}, got {key_limit.device}")
        if key_limit.numel() and int(key_limit.min()) < 0:
            raise JaggedInputError("key_limit must be >= 0")


def target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    *,
    scale: float | None = None,
    max_history_len: int | None = None,
    max_targets: int | None = None,
    backend: Backend | str = Backend.AUTO,
    check_inputs: bool = True,
    key_limit: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Each request's targets attend (softmax, per head) to that request's history only.

    Args:
        q: [total_targets, H, D] target queries, requests back to back (q_offsets [R + 1] int64).
        k, v: [total_history, H, D] and [total_history, H, Dv], requests back to back (kv_offsets [R + 1]).
        scale: score scale; 1 / sqrt(D) by default.
        max_history_len: longest history in the batch, as a Python int (a kernel sizes its grid with it);
            computed from kv_offsets when None, checked when given.
        max_targets: most targets of one request, as a Python int (the kernel's grid); computed from q_offsets
            when None. Passing both lets torch.compile trace the Triton path without a device sync.
        backend: auto / triton / pytorch (see merlin_longseq.backend).
        key_limit: optional [total_targets] integers: target t sees only the first key_limit[t] keys of its
            request's history (causal / prefix masks; keys padded to a common length).
        return_lse: also return the log-sum-exp of each row's scores [total_targets, H] (at least float32, natural log,
            -inf for a row with no visible key); differentiable.
    Returns:
        [total_targets, H, Dv] (and the lse when asked); targets that see no key get zeros.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.dim() == 3 and q.shape[-1] else 1.0
    if check_inputs:
        _check_inputs(q, k, v, q_offsets, kv_offsets, scale, max_history_len, max_targets, key_limit)
    chosen = resolve_backend(backend, q, k, v)
    if chosen is Backend.TRITON:
        module = kernel_module("target_attention", backend)
        if module is not None:
            if max_history_len is None:
                lengths = lengths_from_offsets(kv_offsets)
                max_history_len = int(lengths.max()) if lengths.numel() else 0
            if max_targets is None:
                t_lengths = lengths_from_offsets(q_offsets)
                max_targets = int(t_lengths.max()) if t_lengths.numel() else 0
            return module.triton_target_attention(q, k, v, q_offsets, kv_offsets, scale=scale,
                                                  max_history_len=max_history_len, max_targets=max_targets,
                                                  key_limit=key_limit, return_lse=return_lse)
    return pytorch_target_attention(q, k, v, q_offsets, kv_offsets, scale, key_limit, return_lse)
