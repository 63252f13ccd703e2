"""PyTorch reference for target-to-history cross attention on jagged requests (STCA, RLB layout).

For request r with targets q_offsets[r]:q_offsets[r+1] and history kv_offsets[r]:kv_offsets[r+1]:

    out_t = sum_j softmax_j(scale * q_t . k_j) v_j        (per head; j runs over request r's history only)

Only keys are masked (padding); targets never see each other or other requests. A request whose history is
empty has nothing to attend to: its targets get an all-zero output, and no gradient flows through them to q.

The reference pads both sides to the longest of the batch and materialises [R, H, T_max, L_max] scores: it
is the ground truth for a Triton kernel, not the fast path. K and V are read once per request, however
many targets the request has.
"""
from __future__ import annotations

import torch

from merlin_longseq.jagged import jagged_to_padded, lengths_from_offsets, padded_to_jagged


def pytorch_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [total_targets, H, D]; k [total_history, H, D]; v [total_history, H, Dv] -> [total_targets, H, Dv]."""
    target_lengths = lengths_from_offsets(q_offsets)
    history_lengths = lengths_from_offsets(kv_offsets)
    max_targets = int(target_lengths.max()) if target_lengths.numel() else 0
    max_history = int(history_lengths.max()) if history_lengths.numel() else 0
    qp = jagged_to_padded(q, q_offsets, max_targets)  # [R, T, H, D]
    kp = jagged_to_padded(k, kv_offsets, max_history)  # [R, L, H, D]
    vp = jagged_to_padded(v, kv_offsets, max_history)  # [R, L, H, Dv]
    scores = torch.einsum("rthd,rlhd->rhtl", qp, kp) * scale  # [R, H, T, L]
    key_is_real = torch.arange(max_history, device=q.device).view(1, -1) < history_lengths.view(-1, 1)  # [R, L]
    scores = scores.masked_fill(~key_is_real[:, None, None, :], float("-inf"))
    has_history = (history_lengths > 0)[:, None, None, None]  # [R, 1, 1, 1]
    # an all-masked row would give NaN (and NaN gradients); give it finite constant scores, then zero it
    scores = scores.masked_fill(~has_history, 0.0)
    weights = torch.softmax(scores, dim=-1) * has_history.to(scores.dtype)
    out = torch.einsum("rhtl,rlhd->rthd", weights, vp)  # [R, T, H, Dv]
    return padded_to_jagged(out, target_lengths)[0]
