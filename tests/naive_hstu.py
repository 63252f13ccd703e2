"""Naive HSTU pointwise attention, written from the documented semantics only.

One Python loop per sequence, per row and per column; every mask rule is an explicit `if`, every bias
bucket is computed with Python math. Slow on purpose: it is the test oracle for the reference and the
kernels. Results are built from torch ops on slices, so autograd gives gradients to compare.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive_may_attend(i: int, j: int, num_history: int, causal: bool, local_window: int | None,
                     global_prefix: int) -> bool:
    """May row i attend to column j of a sequence whose first num_history tokens are history?"""
    if i >= num_history:
        # a target sees all history and itself, never another target
        return j < num_history or j == i
    if j >= num_history:
        return False
    if causal and j > i:
        return False
    if local_window is not None:
        inside_window = abs(i - j) < local_window
        inside_prefix = j < global_prefix
        if not (inside_window or inside_prefix):
            return False
    return True


def naive_position_bucket(i: int, j: int, num_history: int, num_buckets: int) -> int:
    # every target stands at the position right after the history
    position_i = min(i, num_history)
    position_j = min(j, num_history)
    return min(abs(position_i - position_j), num_buckets - 1)


def naive_time_bucket(time_i: int, time_j: int, num_buckets: int) -> int:
    gap = abs(time_i - time_j)
    return min(int(math.floor(math.log2(1 + gap))), num_buckets - 1)


def naive_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    num_targets: torch.Tensor | None = None,
    causal: bool = True,
    local_window: int | None = None,
    global_prefix: int = 0,
    timestamps: torch.Tensor | None = None,
    pos_bias: torch.Tensor | None = None,
    time_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k [total, H, Dqk]; v [total, H, Dv]; offsets [B + 1] -> [total, H, Dv]."""
    heads, value_dim = v.shape[1], v.shape[2]
    bounds = [int(o) for o in offsets.tolist()]
    target_counts = [0] * (len(bounds) - 1) if num_targets is None else [int(n) for n in num_targets.tolist()]
    times = [int(t) for t in timestamps.tolist()] if timestamps is not None else None
    zero_row = v.new_zeros(heads, value_dim)
    rows = []
    for seq in range(len(bounds) - 1):
        start, end = bounds[seq], bounds[seq + 1]
        length = end - start
        num_history = length - target_counts[seq]
        for i in range(length):
            row = zero_row
            for j in range(length):
                if not naive_may_attend(i, j, num_history, causal, local_window, global_prefix):
                    continue
                score = alpha * (q[start + i] * k[start + j]).sum(dim=-1)  # [H]
                if pos_bias is not None:
                    bucket = naive_position_bucket(i, j, num_history, pos_bias.shape[1])
                    score = score + pos_bias[:, bucket]  # [H] or [1], broadcast over heads
                if time_bias is not None:
                    bucket = naive_time_bucket(times[start + i], times[start + j], time_bias.shape[1])
                    score = score + time_bias[:, bucket]
                weight = F.silu(score) / max_seq_len  # [H]
                row = row + weight.unsqueeze(-1) * v[start + j]
            rows.append(row)
    if not rows:
        return v * 0  # no tokens at all: an empty result that stays in the autograd graph
    return torch.stack(rows)
