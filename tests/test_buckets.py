import random

import torch

from merlin_longseq.buckets import bit_length, log2_buckets
from merlin_longseq.ops.pytorch.pt_hstu_attention import hstu_time_buckets


def _values():
    rng = random.Random(0)
    edges = [v for s in range(1, 63) for v in (2**s - 1, 2**s, 2**s + 1)]
    # 2^53 + 1 and up: float64 no longer holds every integer, where a float log2 / frexp alone rounds up
    return [-5, 0, 1, 2**63 - 1] + edges + list(range(5000)) + [rng.randrange(2**63) for _ in range(20000)]


def test_bit_length_equals_python_int_bit_length_for_every_int64():
    values = _values()
    assert bit_length(torch.tensor(values)).tolist() == [max(v, 0).bit_length() for v in values]


def test_log2_buckets_clamp_to_the_last_bucket():
    values = torch.tensor([-5, 0, 1, 2, 3, 4, 7, 8, 10**12])
    assert log2_buckets(values, 24).tolist() == [0, 0, 1, 2, 2, 3, 3, 4, 23]


def test_hstu_time_buckets_are_floor_log2_of_one_plus_gap():
    gaps = [v for v in _values() if v < 2**62] + [-7, -8]
    want = [min((abs(g) + 1).bit_length() - 1, 39) for g in gaps]
    assert hstu_time_buckets(torch.tensor(gaps), 40).tolist() == want


def test_hstu_time_buckets_are_the_capped_bit_length_of_one_plus_the_gap():
    """hstu_time_buckets (one bucketize) = bit_length(1 + |gap|) - 1 capped, at every power-of-two edge and for
    gaps up to the int64 range, any bucket count."""
    powers = 1 << torch.arange(0, 62)
    gaps = torch.cat([torch.arange(-300, 300), powers, powers - 1, powers + 1, -powers, -(powers - 1),
                      torch.tensor([2 ** 63 - 1, -(2 ** 63 - 1)]),
                      torch.randint(-2 ** 62, 2 ** 62, (20_000,), generator=torch.Generator().manual_seed(0))])
    for num_buckets in (1, 2, 3, 32, 62, 63, 64, 100):
        expected = (bit_length(gaps.abs().clamp(max=1 << 62) + 1) - 1).clamp(max=num_buckets - 1)
        assert torch.equal(hstu_time_buckets(gaps, num_buckets), expected), num_buckets
