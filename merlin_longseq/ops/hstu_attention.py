"""HSTU pointwise attention: input checks once, then the explicit backend choice.

Semantics (mask, relative bias, targets) are documented in ops/pytorch/pt_hstu_attention.py.
"""
from __future__ import annotations

import torch

from merlin_longseq.backend import Backend, resolve_backend
from merlin_longseq.jagged import JaggedInputError, validate_offsets
from merlin_longseq.ops._triton import kernel_module
from merlin_longseq.ops.pytorch.pt_hstu_attention import pytorch_hstu_attention


def _check_inputs(q, k, v, offsets, max_seq_len, num_targets, local_window, global_prefix, timestamps,
                  pos_bias, time_bias) -> None:
    if q.dim() != 3 or k.shape != q.shape:
        raise JaggedInputError(f"q and k must both be [total, H, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise JaggedInputError(f"v must be [total, H, Dv] matching q's {tuple(q.shape[:2])}; got {tuple(v.shape)}")
    if max_seq_len < 1:
        raise JaggedInputError(f"max_seq_len must be >= 1, got {max_seq_len}")
    validate_offsets(offsets, total=q.shape[0], max_seq_len=max_seq_len)
    batch = offsets.numel() - 1
    if num_targets is not None:
        if num_targets.shape != (batch,):
            raise JaggedInputError(f"num_targets must be [B] = [{batch}], got {tuple(num_targets.shape)}")
        lengths = offsets[1:] - offsets[:-1]
        if batch and (bool((num_targets < 0).any()) or bool((num_targets > lengths).any())):
            raise JaggedInputError("num_targets must lie in [0, sequence length] for every sequence")
    if local_window is not None and local_window < 1:
        raise JaggedInputError(f"local_window must be >= 1 (or None for full attention), got {local_window}")
    if global_prefix < 0:
        raise JaggedInputError(f"global_prefix must be >= 0, got {global_prefix}")
    if timestamps is not None and timestamps.shape != (q.shape[0],):
        raise JaggedInputError(f"timestamps must be [total] = [{q.shape[0]}], got {tuple(timestamps.shape)}")
    heads = q.shape[1]
    for name, table in (("pos_bias", pos_bias), ("time_bias", time_bias)):
        if table is not None and (table.dim() != 2 or table.shape[0] not in (1, heads)):
            raise JaggedInputError(f"{name} must be [H or 1, buckets], got {tuple(table.shape)}")
    if time_bias is not None and timestamps is None:
        raise JaggedInputError("time_bias needs timestamps")


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    *,
    num_targets: torch.Tensor | None = None,
    causal: bool = True,
    local_window: int | None = None,
    global_prefix: int = 0,
    timestamps: torch.Tensor | None = None,
    pos_bias: torch.Tensor | None = None,
    time_bias: torch.Tensor | None = None,
    backend: Backend | str = Backend.AUTO,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Jagged HSTU attention; q, k [total, H, Dqk], v [total, H, Dv] -> [total, H, Dv]."""
    if check_inputs:
        _check_inputs(q, k, v, offsets, max_seq_len, num_targets, local_window, global_prefix, timestamps,
                      pos_bias, time_bias)
    chosen = resolve_backend(backend, q, k, v)
    if chosen is Backend.TRITON:
        module = kernel_module("hstu_attention", backend)
        if module is not None:
            return module.triton_hstu_attention(q, k, v, offsets, max_seq_len, alpha, num_targets=num_targets,
                                                causal=causal, local_window=local_window,
                                                global_prefix=global_prefix, timestamps=timestamps,
                                                pos_bias=pos_bias, time_bias=time_bias)
    return pytorch_hstu_attention(q, k, v, offsets, max_seq_len, alpha, num_targets=num_targets, causal=causal,
                                  local_window=local_window, global_prefix=global_prefix,
                                  timestamps=timestamps, pos_bias=pos_bias, time_bias=time_bias)
