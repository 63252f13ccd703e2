"""Length-extrapolative training: train on short recent windows, serve the full history.

Per training sample a fraction is drawn from Beta(alpha, beta) and the sample keeps only the MOST RECENT
round(fraction * max_train_len) events of its history (at least `min_len`, never more than it has). The
defaults alpha=0.5, beta=1.5 give a small-alpha Beta with mean 0.25: most samples are short, a few long, so a
model trained with max_train_len=1024 sees 256 events on average and still meets long windows. At inference
nothing is cut.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from merlin_longseq.jagged import jagged_positions, lengths_from_offsets, offsets_from_lengths


@dataclass(frozen=True)
class BetaLengthSampler:
    max_train_len: int = 1024
    alpha: float = 0.5
    beta: float = 1.5
    min_len: int = 1

    def __post_init__(self):
        if self.max_train_len < 1 or self.min_len < 0 or self.min_len > self.max_train_len:
            raise ValueError("need 0 <= min_len <= max_train_len and max_train_len >= 1")
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError("Beta parameters alpha and beta must be positive")

    @property
    def mean_length(self) -> float:
        return self.max_train_len * self.alpha / (self.alpha + self.beta)

    def sample(self, lengths: torch.Tensor) -> torch.Tensor:
        """New lengths [B] (int64) for a training batch: a Beta draw per sample (torch's global RNG)."""
        fraction = torch.distributions.Beta(float(self.alpha), float(self.beta)).sample(lengths.shape)
        return self._window(fraction.to(lengths.device), lengths.to(torch.int64))

    def sample_numpy(self, lengths, rng):
        """Same draw for ETL code: lengths np.ndarray, rng a numpy Generator -> np.ndarray int64."""
        import numpy as np

        lengths = np.asarray(lengths, dtype=np.int64)
        fraction = torch.from_numpy(rng.beta(self.alpha, self.beta, size=lengths.shape))
        return self._window(fraction, torch.from_numpy(lengths)).numpy()

    def _window(self, fraction: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        window = torch.round(fraction * self.max_train_len).to(torch.int64).clamp(min=self.min_len)
        return torch.minimum(window, lengths)


def keep_recent(offsets: torch.Tensor, new_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [kept] of the most recent new_lengths[b] tokens of every sequence, and the new offsets."""
    lengths = lengths_from_offsets(offsets)
    if new_lengths.shape != lengths.shape or bool((new_lengths > lengths).any()) or bool((new_lengths < 0).any()):
        raise ValueError("new_lengths must be [B] with 0 <= new_lengths <= lengths")
    seq_index, positions = jagged_positions(offsets)
    keep = positions >= (lengths - new_lengths)[seq_index]
    return torch.nonzero(keep).squeeze(1), offsets_from_lengths(new_lengths)
