"""Exact log2 buckets of integer gaps, identical on every device.

float64 log2 is not exact at powers of two on CUDA (an H100 run put gap 7 = log2(8) into bucket 2 instead of 3),
so a model trained on the GPU and served on the CPU would bucket some events differently. These functions use
only frexp and integer shifts: the same answer everywhere, for every int64.
"""
from __future__ import annotations

import torch


def bit_length(values: torch.Tensor) -> torch.Tensor:
    """Number of bits of each value (0 -> 0, 1 -> 1, 2..3 -> 2, 4..7 -> 3, ...); values <= 0 give 0. int64."""
    x = values.to(torch.int64).clamp(min=0)
    # frexp: x = m * 2^e with m in [0.5, 1), so e is the bit length while the float64 holds x exactly; above
    # 2^53 the conversion may round x up to the next power of two, one bit too many, which the shift detects
    bits = torch.frexp(x.to(torch.float64)).exponent.to(torch.int64)
    too_many = torch.bitwise_right_shift(x, (bits - 1).clamp(min=0)) == 0
    return torch.where(x > 0, bits - too_many.to(torch.int64), torch.zeros_like(bits))


def log2_buckets(values: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """bit_length(values) clamped to the last of num_buckets buckets: the history-token buckets of STCA and
    LONGER (time to the request, recency rank, counts)."""
    return bit_length(values).clamp(max=num_buckets - 1)
