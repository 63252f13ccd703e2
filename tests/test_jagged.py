"""Jagged utilities: padded <-> jagged, lengths, offsets, positions, and their error messages."""
from __future__ import annotations

import pytest
import torch

from merlin_longseq.jagged import (
    JaggedInputError,
    jagged_positions,
    jagged_to_padded,
    lengths_from_offsets,
    lengths_from_padding,
    offsets_from_lengths,
    padded_to_jagged,
    padding_mask,
    validate_offsets,
)


def random_lengths(batch: int, max_len: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (batch,), generator=generator)
    lengths[0] = 0  # always include an empty sequence
    return lengths


def right_padded(lengths: torch.Tensor, max_len: int, trailing: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random values, exactly zero on padding positions (built with an explicit loop)."""
    generator = torch.Generator().manual_seed(seed)
    padded = torch.zeros(lengths.numel(), max_len, *trailing, dtype=torch.float64)
    for b, length in enumerate(lengths.tolist()):
        padded[b, :length] = torch.randn(length, *trailing, generator=generator, dtype=torch.float64)
    return padded


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("trailing", [(), (3,), (2, 4)], ids=["scalar", "vector", "matrix"])
def test_padded_jagged_round_trip(seed, trailing):
    max_len = 7
    lengths = random_lengths(6, max_len, seed)
    padded = right_padded(lengths, max_len, trailing, seed)
    values, offsets = padded_to_jagged(padded, lengths)

    assert values.shape == (int(lengths.sum()), *trailing)
    assert offsets.dtype == torch.int64
    expected_values = torch.cat([padded[b, :n] for b, n in enumerate(lengths.tolist())])
    assert torch.equal(values, expected_values)
    expected_offsets = [0]
    for n in lengths.tolist():
        expected_offsets.append(expected_offsets[-1] + n)
    assert offsets.tolist() == expected_offsets

    assert torch.equal(jagged_to_padded(values, offsets, max_len), padded)
    # default max_len is the longest sequence of the batch
    longest = int(lengths.max())
    assert torch.equal(jagged_to_padded(values, offsets), padded[:, :longest])


def test_jagged_to_padded_padding_value_and_wider_max_len():
    values = torch.tensor([1.0, 2.0, 3.0])
    offsets = torch.tensor([0, 2, 2, 3])
    padded = jagged_to_padded(values, offsets, max_len=4, padding_value=-1.0)
    assert padded.tolist() == [[1.0, 2.0, -1.0, -1.0], [-1.0] * 4, [3.0, -1.0, -1.0, -1.0]]


def test_round_trip_all_empty_and_no_batch():
    values, offsets = padded_to_jagged(torch.zeros(3, 4, 2), torch.zeros(3, dtype=torch.int64))
    assert values.shape == (0, 2) and offsets.tolist() == [0, 0, 0, 0]
    assert jagged_to_padded(values, offsets).shape == (3, 0, 2)
    values, offsets = padded_to_jagged(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert values.shape == (0,) and offsets.tolist() == [0]
    assert jagged_to_padded(values, offsets).shape == (0, 0)


def test_round_trip_keeps_gradients():
    padded = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 5, 0])
    values, offsets = padded_to_jagged(padded, lengths)
    jagged_to_padded(values, offsets, 5).sum().backward()
    expected = torch.zeros(3, 5, 2, dtype=torch.float64)
    expected[0, :2] = 1
    expected[1, :5] = 1
    assert torch.equal(padded.grad, expected)


def test_lengths_from_bool_mask():
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    lengths = lengths_from_padding(mask)
    assert lengths.tolist() == [2, 0, 3]
    assert lengths.dtype == torch.int64


def test_lengths_from_ids_and_padding_idx():
    ids = torch.tensor([[5, 9, 0, 0], [3, 3, 3, 3], [0, 0, 0, 0]])
    assert lengths_from_padding(ids).tolist() == [2, 4, 0]
    ids_with_minus_one = torch.tensor([[0, 4, -1], [-1, -1, -1]])
    assert lengths_from_padding(ids_with_minus_one, padding_idx=-1).tolist() == [2, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lengths_from_padding_agrees_with_padding_mask(seed):
    lengths = random_lengths(8, 6, seed)
    assert torch.equal(lengths_from_padding(padding_mask(lengths, 6)), lengths)
    ids = torch.randint(1, 50, (8, 6), generator=torch.Generator().manual_seed(seed))
    ids = ids * padding_mask(lengths, 6)
    assert torch.equal(lengths_from_padding(ids), lengths)


@pytest.mark.parametrize(
    "mask_or_ids",
    [
        torch.tensor([[False, True, True]]),  # left padding
        torch.tensor([[True, False, True]]),  # a hole
        torch.tensor([[True, True, False], [False, False, True]]),  # one bad row among good ones
        torch.tensor([[0, 0, 7, 8]]),  # left-padded ids
        torch.tensor([[7, 0, 8, 0]]),  # ids with a hole
    ],
)
def test_left_padding_and_holes_raise(mask_or_ids):
    with pytest.raises(JaggedInputError, match="padding must be on the right"):
        lengths_from_padding(mask_or_ids)


def test_lengths_from_padding_needs_2d():
    with pytest.raises(JaggedInputError, match=r"expected a \[B, S\] mask"):
        lengths_from_padding(torch.tensor([True, False]))


def test_offsets_from_lengths():
    offsets = offsets_from_lengths(torch.tensor([3, 0, 1, 4], dtype=torch.int32))
    assert offsets.dtype == torch.int64
    assert offsets.tolist() == [0, 3, 3, 4, 8]
    assert offsets_from_lengths(torch.zeros(0, dtype=torch.int64)).tolist() == [0]
    assert lengths_from_offsets(offsets).tolist() == [3, 0, 1, 4]
    with pytest.raises(JaggedInputError, match=r"lengths must be 1-D"):
        offsets_from_lengths(torch.tensor([[1, 2]]))


def test_jagged_positions():
    seq_index, positions = jagged_positions(torch.tensor([0, 3, 3, 4, 6]))
    assert seq_index.tolist() == [0, 0, 0, 2, 3, 3]
    assert positions.tolist() == [0, 1, 2, 0, 0, 1]
    seq_index, positions = jagged_positions(torch.tensor([0, 0]))
    assert seq_index.numel() == 0 and positions.numel() == 0


@pytest.mark.parametrize("seed", [5, 6])
def test_jagged_positions_random(seed):
    lengths = random_lengths(7, 5, seed)
    seq_index, positions = jagged_positions(offsets_from_lengths(lengths))
    expected_seq, expected_pos = [], []
    for b, n in enumerate(lengths.tolist()):
        expected_seq += [b] * n
        expected_pos += list(range(n))
    assert seq_index.tolist() == expected_seq
    assert positions.tolist() == expected_pos


def test_validate_offsets_accepts_good_offsets():
    validate_offsets(torch.tensor([0, 2, 2, 5]), total=5, max_seq_len=3)
    validate_offsets(torch.tensor([0, 2, 5], dtype=torch.int32))
    validate_offsets(torch.tensor([0]), total=0, max_seq_len=1)


@pytest.mark.parametrize(
    "offsets, kwargs, message",
    [
        (torch.tensor([[0, 1]]), {}, r"offsets must be 1-D \[B \+ 1\]"),
        (torch.zeros(0, dtype=torch.int64), {}, r"offsets must be 1-D \[B \+ 1\]"),
        (torch.tensor([0.0, 1.0]), {}, "offsets must be int64"),
        (torch.tensor([2, 3]), {}, r"offsets\[0\] must be 0, got 2"),
        (torch.tensor([0, 3, 2, 4]), {}, r"non-decreasing; offsets\[2\] < offsets\[1\]"),
        (torch.tensor([0, 3, 4]), {"total": 5}, r"offsets\[-1\] = 4 but the values hold 5 tokens"),
        (torch.tensor([0, 3, 4]), {"max_seq_len": 2}, "length 3 exceeds max_seq_len = 2"),
    ],
)
def test_validate_offsets_rejects(offsets, kwargs, message):
    with pytest.raises(JaggedInputError, match=message):
        validate_offsets(offsets, **kwargs)


def test_jagged_input_error_is_a_value_error():
    assert issubclass(JaggedInputError, ValueError)


@pytest.mark.parametrize(
    "padded, lengths, message",
    [
        (torch.zeros(4), torch.tensor([1]), r"padded must be \[B, S, \.\.\.\]"),
        (torch.zeros(2, 3), torch.tensor([1, 2, 3]), r"lengths must be \[B\] = \[2\]"),
        (torch.zeros(2, 3), torch.tensor([[1, 2]]), r"lengths must be \[B\] = \[2\]"),
        (torch.zeros(2, 3), torch.tensor([1, 4]), r"lengths must lie in \[0, 3\]"),
        (torch.zeros(2, 3), torch.tensor([-1, 2]), r"lengths must lie in \[0, 3\]"),
    ],
)
def test_padded_to_jagged_rejects(padded, lengths, message):
    with pytest.raises(JaggedInputError, match=message):
        padded_to_jagged(padded, lengths)


def test_jagged_to_padded_rejects():
    values = torch.zeros(5, 2)
    with pytest.raises(JaggedInputError, match=r"offsets\[-1\] = 4 but the values hold 5"):
        jagged_to_padded(values, torch.tensor([0, 4]))
    with pytest.raises(JaggedInputError, match="length 5 does not fit max_len = 3"):
        jagged_to_padded(values, torch.tensor([0, 5]), max_len=3)


def test_jagged_to_padded_unchecked_reads_nothing_back(monkeypatch):
    """check=False with a known max_len: no value goes back to the host (each read is a device sync on a GPU)."""
    values, offsets = torch.arange(10.0).unsqueeze(1), torch.tensor([0, 3, 3, 10])
    checked = jagged_to_padded(values, offsets, 8)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor value was read back to the host")

    for name in ("__int__", "__bool__", "item", "tolist", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    unchecked = jagged_to_padded(values, offsets, 8, check=False)
    monkeypatch.undo()
    assert torch.equal(unchecked, checked)
    with pytest.raises(AssertionError, match="read back"):  # the checked path does read (what check=False saves)
        for name in ("__int__", "__bool__", "item", "tolist", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        jagged_to_padded(values, offsets, 8)
