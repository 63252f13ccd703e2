"""PyTorch reference for target-to-history cross attention on jagged requests (STCA, RLB layout).

For request r with targets q_offsets[r]:q_offsets[r+1] and history kv_offsets[r]:kv_offsets[r+1]:

    out_t = sum_j softmax_j(scale * q_t . k_j) v_j        (per head; j runs over request r's history only)

Only keys are masked (padding); targets never see each other or other requests. A request whose history is
empty has nothing to attend to: its targets get an all-zero output, and no gradient flows through them to q.

Optional key_limit [total_targets]: target t sees only the first key_limit[t] keys of its request's history (a
prefix: causal masks, keys padded to a common length); a target left with no key is treated like an empty
history. Optional log-sum-exp output: lse_t = log sum_j exp(scale * q_t . k_j) over the keys t sees (-inf when
none), so attentions over disjoint key sets can be merged exactly (LONGER's hybrid layer).

The reference pads both sides to the longest of the batch and materialises [R, H, T_max, L_max] scores: it
is the ground truth for a Triton kernel, not the fast path. K and V are read once per request, however
many targets the request has.
"""
from __future__ import annotations

from typing import Optional

import torch

from merlin_longseq.jagged import jagged_to_padded, lengths_from_offsets, padded_to_jagged


def pytorch_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    scale: float,
    key_limit: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """q [total_targets, H, D]; k [total_history, H, D]; v [total_history, H, Dv] -> [total_targets, H, Dv]
    (and lse [total_targets, H] float32 when return_lse)."""
    target_lengths = lengths_from_offsets(q_offsets)
    history_lengths = lengths_from_offsets(kv_offsets)
    max_targets = int(target_lengths.max()) if target_lengths.numel() else 0
    max_history = int(history_lengths.max()) if history_lengths.numel() else 0
    qp = jagged_to_padded(q, q_offsets, max_targets, check=False)  # [R, T, H, D]
    kp = jagged_to_padded(k, kv_offsets, max_history, check=False)  # [R, L, H, D]
    vp = jagged_to_padded(v, kv_offsets, max_history, check=False)  # [R, L, H, Dv]
    scores = torch.einsum("rthd,rlhd->rhtl", qp, kp) * scale  # [R, H, T, L]
    key_pos = torch.arange(max_history, device=q.device)
    visible = (key_pos.view(1, 1, -1) < history_lengths.view(-1, 1, 1)).expand(-1, max_targets, -1)  # [R, T, L]
    if key_limit is not None:
        limits = jagged_to_padded(key_limit.to(torch.int64), q_offsets, max_targets, check=False)  # [R, T]
        visible = visible & (key_pos.view(1, 1, -1) < limits.unsqueeze(-1))
    visible = visible[:, None]  # [R, 1, T, L]
    has_key = visible.any(-1, keepdim=True)  # [R, 1, T, 1]
    # an all-masked row would give NaN (and NaN gradients); give it finite constant scores, then zero it
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    weights = torch.softmax(scores, dim=-1) * has_key.to(scores.dtype)
    out = padded_to_jagged(torch.einsum("rhtl,rlhd->rthd", weights, vp), target_lengths)[0]  # [total, H, Dv]
    if not return_lse:
        return out
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1, keepdim=True)
    lse = torch.where(has_key, lse, torch.full_like(lse, float("-inf")))[..., 0]  # [R, H, T]
    return out, padded_to_jagged(lse.transpose(1, 2), target_lengths)[0]
