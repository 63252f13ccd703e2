"""PyTorch reference for HSTU pointwise attention on jagged sequences.

    out_i = sum_j mask(i, j) * SiLU(alpha * q_i . k_j + rab(i, j)) / max_seq_len * v_j

Mask, for a sequence of n tokens whose last `nt` are targets (nh = n - nt history tokens):
  history row i < nh: j < nh, j <= i when causal, and with semi-local attention
                      (|i - j| < local_window) or (j < global_prefix)
                      (the window is two-sided when not causal);
  target row i >= nh: every history token j < nh, and itself (targets never see each other).
Relative attention bias (optional, per head):
  rab(i, j) = pos_bias[h, min(|p_i - p_j|, P - 1)] + time_bias[h, min(floor(log2(1 + |t_i - t_j|)), T - 1)]
with p_i = min(i, nh): all targets sit at the position right after the history, so a target's score never
depends on where it stands among the candidates.

The reference pads to the longest sequence of the batch and materialises [B, H, S, S]: it is the
ground truth for the Triton kernel, not the fast path.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from merlin_longseq.jagged import jagged_to_padded, lengths_from_offsets, padded_to_jagged


# elements of the padded [B, H, S, S] score block above which the reference splits the batch (about 256 MiB fp32)
_PADDED_SCORES_BUDGET = 1 << 26
# longest sequence from which a ragged batch runs sequence by sequence (below it the loop costs more than padding)
_RAGGED_MIN_LEN = 256


def hstu_position_buckets(distance: torch.Tensor, num_buckets: int) -> torch.Tensor:
    return distance.abs().clamp(max=num_buckets - 1)


def hstu_time_buckets(gap: torch.Tensor, num_buckets: int) -> torch.Tensor:
    # log2 buckets floor(log2(1 + |g|)), capped: 0 for gap 0, 1 for 1..2, 2 for 3..6, 3 for 7..14, ...
    # Bucket >= k exactly when |g| >= 2^k - 1, so one bucketize against those integer bounds gives the same
    # answer as bit_length(1 + |g|) - 1 (buckets.py: float64 log2 is not exact on CUDA) in one pass, about 6x
    # faster on the [S, S] gaps of a long sequence than the frexp route
    bounds = torch.tensor(_time_bounds(num_buckets), dtype=torch.int64, device=gap.device)
    return torch.bucketize(gap.to(torch.int64).abs().clamp(min=0), bounds, right=True)


@functools.lru_cache(maxsize=None)
def _time_bounds(num_buckets: int) -> tuple:
    return tuple((1 << k) - 1 for k in range(1, min(num_buckets, 63)))


def hstu_attention_mask(
    lengths: torch.Tensor,
    max_len: int,
    num_targets: torch.Tensor | None,
    causal: bool,
    local_window: int | None,
    global_prefix: int,
) -> torch.Tensor:
    """[B, S, S] bool: True where row i may attend to column j."""
    device = lengths.device
    idx = torch.arange(max_len, device=device)
    row = idx.view(1, -1, 1)
    col = idx.view(1, 1, -1)
    n = lengths.view(-1, 1, 1)
    nt = num_targets.view(-1, 1, 1).to(torch.int64) if num_targets is not None else torch.zeros_like(n)
    nh = n - nt
    history_row = row < nh
    history_col = col < nh
    allowed = history_row & history_col
    if causal:
        allowed = allowed & (col <= row)
    if local_window is not None:
        near = (row - col).abs() < local_window
        allowed = allowed & (near | (col < global_prefix))
    target_row = (row >= nh) & (row < n)
    allowed = allowed | (target_row & (history_col | (col == row)))
    return allowed


def hstu_relative_bias(
    lengths: torch.Tensor,
    max_len: int,
    num_targets: torch.Tensor | None,
    padded_timestamps: torch.Tensor | None,
    pos_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """[B, H or 1, S, S] float bias, or None when no bias is configured."""
    if pos_bias is None and (time_bias is None or padded_timestamps is None):
        return None
    device = lengths.device
    pos_buckets = time_buckets = None
    if pos_bias is not None:
        nt = num_targets.to(torch.int64) if num_targets is not None else torch.zeros_like(lengths)
        nh = (lengths - nt).view(-1, 1)
        pos = torch.minimum(torch.arange(max_len, device=device).view(1, -1), nh)  # [B, S]
        pos_buckets = hstu_position_buckets(pos.unsqueeze(2) - pos.unsqueeze(1), pos_bias.shape[-1])
    if time_bias is not None and padded_timestamps is not None:
        ts = padded_timestamps.to(torch.int64)
        time_buckets = hstu_time_buckets(ts.unsqueeze(2) - ts.unsqueeze(1), time_bias.shape[-1])
    return gather_relative_bias(pos_bias, pos_buckets, time_bias, time_buckets).movedim(0, 1)  # [B, H, S, S]


def gather_relative_bias(pos_bias, pos_buckets, time_bias, time_buckets) -> torch.Tensor:
    """[H, *buckets.shape] bias of position and / or time buckets (a None pair is left out; at least one given).
    Both: one gather from the [H, P * T] table of sums instead of two gathers and an add (the same fp32 sums,
    pos_bias[p] + time_bias[t])."""
    if pos_buckets is not None and time_buckets is not None:
        table = (pos_bias[:, :, None] + time_bias[:, None, :]).flatten(1)
        return table[:, pos_buckets * time_bias.shape[-1] + time_buckets]
    if pos_buckets is not None:
        return pos_bias[:, pos_buckets]
    return time_bias[:, time_buckets]


def pytorch_hstu_attention(
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
    lengths = lengths_from_offsets(offsets)
    batch_max = int(lengths.max()) if lengths.numel() else 0
    if q.shape[0] == 0 or batch_max == 0:
        return v * 0  # empty, but still in the autograd graph so a loss over it can backpropagate
    batch = lengths.numel()
    if _banded(causal, local_window, global_prefix, num_targets, batch_max):
        # semi-local attention without targets: each row sees at most K1 + K2 keys, so the sequence runs in
        # query blocks over their own keys, O(L (K1 + K2)) instead of the padded O(L^2)
        outs = []
        for b in range(batch):
            lo, hi = int(offsets[b]), int(offsets[b + 1])
            outs.append(_semi_local_sequence(
                q[lo:hi], k[lo:hi], v[lo:hi], max_seq_len, alpha, int(local_window), int(global_prefix),
                None if timestamps is None else timestamps[lo:hi], pos_bias, time_bias))
        return torch.cat(outs)
    padded = batch * batch_max * batch_max
    # ragged long sequences (length-extrapolation windows: a few long, most short): the padded block does
    # mostly wasted work, so each sequence runs alone once padding would more than double the score entries
    ragged = batch > 1 and batch_max >= _RAGGED_MIN_LEN and 2 * int((lengths * lengths).sum()) < padded
    if batch > 1 and (ragged or padded * q.shape[1] > _PADDED_SCORES_BUDGET):
        # long sequences: the padded [B, H, S, S] block would take gigabytes; the same computation per group
        # of sequences keeps it bounded (each sequence's output depends on that sequence only)
        per_group = 1 if ragged else max(1, _PADDED_SCORES_BUDGET // (q.shape[1] * batch_max * batch_max))
        outs = []
        for start in range(0, batch, per_group):
            stop = min(batch, start + per_group)
            lo, hi = int(offsets[start]), int(offsets[stop])
            part = lambda t: None if t is None else t[lo:hi]  # noqa: E731
            outs.append(pytorch_hstu_attention(
                q[lo:hi], k[lo:hi], v[lo:hi], offsets[start:stop + 1] - lo, max_seq_len, alpha,
                num_targets=None if num_targets is None else num_targets[start:stop], causal=causal,
                local_window=local_window, global_prefix=global_prefix, timestamps=part(timestamps),
                pos_bias=pos_bias, time_bias=time_bias))
        return torch.cat(outs)
    qp = jagged_to_padded(q, offsets, batch_max, check=False)  # [B, S, H, D]
    kp = jagged_to_padded(k, offsets, batch_max, check=False)
    vp = jagged_to_padded(v, offsets, batch_max, check=False)
    scores = torch.einsum("bihd,bjhd->bhij", qp, kp) * alpha
    tsp = jagged_to_padded(timestamps, offsets, batch_max, check=False) if timestamps is not None else None
    bias = hstu_relative_bias(lengths, batch_max, num_targets, tsp, pos_bias, time_bias)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    mask = hstu_attention_mask(lengths, batch_max, num_targets, causal, local_window, global_prefix)
    weights = F.silu(scores) * mask.unsqueeze(1).to(scores.dtype) / max_seq_len
    out = torch.einsum("bhij,bjhd->bihd", weights, vp)
    return padded_to_jagged(out, lengths)[0]


# query rows per block of the semi-local path
_BAND_BLOCK = 128


def _banded(causal, local_window, global_prefix, num_targets, batch_max) -> bool:
    """The semi-local path applies (causal window, no targets) and saves work over the padded block."""
    if not causal or local_window is None or num_targets is not None:
        return False
    return batch_max > 2 * (int(local_window) + int(global_prefix) + _BAND_BLOCK)


def _semi_local_sequence(q, k, v, max_seq_len, alpha, window, prefix, timestamps, pos_bias, time_bias):
    """One sequence [L, H, D] under causal semi-local attention (row i sees j <= i with i - j < window or
    j < prefix), in blocks of query rows over the keys they can see: the first `prefix` keys and the band."""
    length = q.shape[0]
    outs = [v[:0] * 0]  # an empty sequence still joins the autograd graph
    for start in range(0, length, _BAND_BLOCK):
        stop = min(length, start + _BAND_BLOCK)
        band = min(max(prefix, start - window + 1), stop)  # the band starts after the prefix
        cols = torch.cat([torch.arange(min(prefix, stop), device=q.device),
                          torch.arange(band, stop, device=q.device)])
        rows = torch.arange(start, stop, device=q.device)
        scores = torch.einsum("ihd,jhd->hij", q[start:stop], k[cols]) * alpha  # [H, rows, cols]
        distance = rows[:, None] - cols[None, :]
        pos_buckets = None if pos_bias is None else hstu_position_buckets(distance, pos_bias.shape[-1])
        time_buckets = None
        if time_bias is not None and timestamps is not None:
            ts = timestamps.to(torch.int64)
            time_buckets = hstu_time_buckets(ts[rows][:, None] - ts[cols][None, :], time_bias.shape[-1])
        if pos_buckets is not None or time_buckets is not None:
            bias = gather_relative_bias(pos_bias, pos_buckets, time_bias, time_buckets)
            scores = scores + bias.to(scores.dtype)
        allowed = (distance >= 0) & ((distance < window) | (cols[None, :] < prefix))
        weights = F.silu(scores) * allowed.to(scores.dtype) / max_seq_len
        outs.append(torch.einsum("hij,jhd->ihd", weights, v[cols]))
    return torch.cat(outs)
