"""Jagged (ragged) sequence utilities.

One convention everywhere: values [total_tokens, ...] holding every sequence back to back, and
offsets [B + 1] int64 with offsets[0] == 0 and offsets[b + 1] - offsets[b] == length of sequence b.
Padded tensors are right-padded: sequence b occupies positions [0, length_b) of row b.
"""
from __future__ import annotations

import torch


class JaggedInputError(ValueError):
    """Bad jagged or padded input (shapes, offsets, lengths)."""


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    if lengths.dim() != 1:
        raise JaggedInputError(f"lengths must be 1-D [B], got shape {tuple(lengths.shape)}")
    lengths = lengths.to(torch.int64)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, dim=0, out=offsets[1:])
    return offsets


def lengths_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]


def validate_offsets(offsets: torch.Tensor, total: int | None = None, max_seq_len: int | None = None) -> None:
    """Check the offsets convention; raise JaggedInputError with what is wrong."""
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise JaggedInputError(f"offsets must be 1-D [B + 1], got shape {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise JaggedInputError(f"offsets must be int64 (or int32), got {offsets.dtype}")
    if int(offsets[0]) != 0:
        raise JaggedInputError(f"offsets[0] must be 0, got {int(offsets[0])}")
    lengths = lengths_from_offsets(offsets)
    if lengths.numel() and bool((lengths < 0).any()):
        bad = int(torch.nonzero(lengths < 0)[0, 0])
        raise JaggedInputError(f"offsets must be non-decreasing; offsets[{bad + 1}] < offsets[{bad}]")
    if total is not None and int(offsets[-1]) != total:
        raise JaggedInputError(f"offsets[-1] = {int(offsets[-1])} but the values hold {total} tokens")
    if max_seq_len is not None and lengths.numel() and int(lengths.max()) > max_seq_len:
        raise JaggedInputError(
            f"a sequence of length {int(lengths.max())} exceeds max_seq_len = {max_seq_len}"
        )


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, max_len] bool, True on real tokens."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def lengths_from_padding(mask_or_ids: torch.Tensor, padding_idx: int = 0) -> torch.Tensor:
    """Lengths [B] from a [B, S] bool mask (True = token) or item ids (padding_idx = padding).

    Only right padding is accepted: a hole or left padding raises instead of being silently misread.
    """
    if mask_or_ids.dim() != 2:
        raise JaggedInputError(f"expected a [B, S] mask or id tensor, got shape {tuple(mask_or_ids.shape)}")
    mask = mask_or_ids if mask_or_ids.dtype == torch.bool else mask_or_ids != padding_idx
    lengths = mask.sum(dim=1)
    if not torch.equal(mask, padding_mask(lengths, mask.shape[1])):
        raise JaggedInputError("padding must be on the right (tokens first, then padding, no holes)")
    return lengths.to(torch.int64)


def padded_to_jagged(padded: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, ...] right-padded -> (values [sum(lengths), ...], offsets [B + 1])."""
    if padded.dim() < 2:
        raise JaggedInputError(f"padded must be [B, S, ...], got shape {tuple(padded.shape)}")
    batch, max_len = padded.shape[:2]
    if lengths.shape != (batch,):
        raise JaggedInputError(f"lengths must be [B] = [{batch}], got shape {tuple(lengths.shape)}")
    if batch and (int(lengths.min()) < 0 or int(lengths.max()) > max_len):
        raise JaggedInputError(f"lengths must lie in [0, {max_len}], got {lengths.tolist()}")
    mask = padding_mask(lengths.to(padded.device), max_len)
    return padded[mask], offsets_from_lengths(lengths.to(padded.device))


def jagged_to_padded(
    values: torch.Tensor, offsets: torch.Tensor, max_len: int | None = None, padding_value: float = 0.0,
    check: bool = True,
) -> torch.Tensor:
    """(values [total, ...], offsets [B + 1]) -> [B, max_len, ...] right-padded (max_len: longest by default).

    check=False trusts offsets the caller built (and a max_len it knows to fit): with max_len given, no value is
    read back to the host, so no device sync (each check is one; a served request paid dozens)."""
    lengths = lengths_from_offsets(offsets)
    if check:
        validate_offsets(offsets, total=values.shape[0])
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    elif check:
        longest = int(lengths.max()) if lengths.numel() else 0
        if longest > max_len:
            raise JaggedInputError(f"a sequence of length {longest} does not fit max_len = {max_len}")
    mask = padding_mask(lengths, max_len)
    out = values.new_full((lengths.numel(), max_len, *values.shape[1:]), padding_value)
    out[mask] = values
    return out


def jagged_positions(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token: (sequence index [total], position inside its sequence [total])."""
    lengths = lengths_from_offsets(offsets)
    seq_index = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)
    positions = torch.arange(seq_index.numel(), device=offsets.device) - offsets[:-1][seq_index]
    return seq_index, positions
