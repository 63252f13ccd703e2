"""PyTorch reference for group attention: LONGER's InnerTransformer attention inside K-token groups.

The history is cut into G groups of K adjacent events (models/longer.py, group_history); each group is a tiny
bidirectional attention of its own. For group g, head h, query slot i:

    out[g, i, h] = sum_j softmax_j(scale * q[g, i, h] . k[g, j, h]) v[g, j, h]
                   over the keys j with slot_valid[g, j] or j == i

An empty slot (slot_valid False) is never a key of another slot, but its own row still sees itself (the
diagonal), so every row has at least one key: no NaN, and no special case for an all-empty group. Groups never
see each other.

The reference materialises the [G, H, K, K] scores in the input dtype (what plain PyTorch gives a user): the
ground truth for the Triton kernel, and the "same dtype" reference of the bf16 tolerance rule. It has no
data-dependent Python control flow, so torch.jit.trace records it as is.
"""
from __future__ import annotations

import torch


def pytorch_group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q, k, v [G, K, H, Dh]; slot_valid [G, K] bool -> out [G, K, H, Dh] (q's dtype)."""
    slots = q.shape[1]
    scores = torch.einsum("gihd,gjhd->ghij", q, k) * scale  # [G, H, K, K]
    diagonal = torch.eye(slots, dtype=torch.bool, device=q.device)  # [K, K]
    may_attend = slot_valid[:, None, None, :] | diagonal  # [G, 1, K(query), K(key)]
    scores = scores.masked_fill(~may_attend, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # every row keeps its diagonal: finite
    return torch.einsum("ghij,gjhd->gihd", weights, v)  # [G, K, H, Dh]
