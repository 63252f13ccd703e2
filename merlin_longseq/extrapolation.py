"""Length-extrapolative training: train on short recent windows, serve the full history.

Per training sample a fraction is drawn from Beta(alpha, beta) and the sample keeps only the MOST RECENT
round(fraction * max_train_len) events of its history (at least `min_len`, never more than it has). The
defaults alpha=0.5, beta=1.5 give a small-alpha Beta with mean 0.25: most samples are short, a few long, so a
model trained with max_train_len=1024 sees 256 events on average and still meets long windows. At inference
nothing is cut.

Where the windows are drawn (all three use BetaLengthSampler):
  - NVTabular: RequestGrouping(length_sampler=...) / build_request_workflow(length_sampler=...) writes the
    training split already windowed (one draw per request, fixed across epochs).
  - Transformers4Rec batches: RecentHistoryWindow, a step on padded request batches
    (`request_dataloader(..., transform=RecentHistoryWindow(sampler))`, a merlin Loader.map step after the
    padding, so tr.Trainer and tr.Model.fit get it too; or called in a loop): a fresh draw per request and
    epoch, for any request block. With max_len instead of a sampler it caps histories (evaluation at a set
    length).
  - Inside a model: STCAConfig / LONGERConfig / MeanPoolConfig(length_sampler=...), active in train() mode.
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


def keep_recent_padded(padded: dict, lengths: torch.Tensor, new_lengths: torch.Tensor) -> dict:
    """Right-padded history columns {name: [B, L]} (real events first, most recent last) -> the most recent
    new_lengths[b] events of every row, left-aligned and re-padded with 0 to width max(new_lengths) (>= 1)."""
    if not padded:
        return {}
    first = next(iter(padded.values()))
    if lengths.shape != (first.shape[0],) or new_lengths.shape != lengths.shape:
        raise ValueError(f"lengths and new_lengths must be [B] = [{first.shape[0]}], got {tuple(lengths.shape)} "
                         f"and {tuple(new_lengths.shape)}")
    if bool((new_lengths < 0).any()) or bool((new_lengths > lengths).any()) or bool((lengths > first.shape[1]).any()):
        raise ValueError("need 0 <= new_lengths <= lengths <= padded width")
    width = max(1, int(new_lengths.max()) if new_lengths.numel() else 1)
    steps = torch.arange(width, device=first.device)
    source = ((lengths - new_lengths).unsqueeze(1) + steps).clamp(max=max(first.shape[1] - 1, 0))  # [B, width]
    keep = steps < new_lengths.unsqueeze(1)
    out = {}
    for name, values in padded.items():
        if values.shape != first.shape:
            raise ValueError(f"history column {name!r} has shape {tuple(values.shape)}, expected {tuple(first.shape)}")
        if values.shape[1] == 0:
            out[name] = values.new_zeros(values.shape[0], width)
            continue
        out[name] = torch.where(keep, values.gather(1, source), torch.zeros((), dtype=values.dtype,
                                                                             device=values.device))
    return out


_HISTORY_PREFIX = "hist_"  # RequestGrouping's output names: hist_item_id, hist_timestamp, hist_<event feature>


class RecentHistoryWindow:
    """A request-batch transform (merlin Loader map step, or call it yourself on (inputs, targets)).

    Cuts every history list column of a padded request batch (request_dataloader's output) to its most
    recent suffix: a fresh BetaLengthSampler draw per request and call (training-time length extrapolation on
    the Transformers4Rec side; the NVTabular side is RequestGrouping(length_sampler=...)), or a fixed cap
    `max_len` (e.g. to evaluate one model at several history lengths). Append it AFTER the padding step:

        loader = request_dataloader(path, 64, ["click"], shuffle=True,
                                    transform=RecentHistoryWindow(BetaLengthSampler(max_train_len=1024), seed=0))

    (training loaders only: evaluation reads full histories, or a fixed cap with max_len).

    The history length of a row is read from `length_column` (item id 0 = padding). columns=None (default)
    cuts every `hist_*` column of the batch (the request contract names every history list hist_<field>),
    so an event log without actions (no hist_action) or with more event features needs no setting; a list
    of names makes each of them required.
    """

    def __init__(self, sampler: BetaLengthSampler | None = None, *, max_len: int | None = None,
                 columns=None, length_column: str = "hist_item_id", seed: int | None = 0):
        import numpy as np

        if (sampler is None) == (max_len is None):
            raise ValueError("give exactly one of sampler (random windows) and max_len (a fixed cap)")
        if sampler is not None and not isinstance(sampler, BetaLengthSampler):
            raise TypeError("sampler must be a BetaLengthSampler")
        if max_len is not None and int(max_len) < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        if columns is not None and length_column not in columns:
            raise ValueError(f"length_column {length_column!r} must be one of the history columns {list(columns)}")
        self.sampler, self.max_len = sampler, None if max_len is None else int(max_len)
        self.columns, self.length_column = None if columns is None else list(columns), length_column
        self.rng = np.random.default_rng(seed)

    def history_columns(self, inputs: dict) -> list:
        """The columns this step cuts in `inputs`."""
        if self.columns is not None:
            return self.columns
        found = [name for name in inputs if name.startswith(_HISTORY_PREFIX)]
        return found if self.length_column in found else [self.length_column, *found]

    def __call__(self, inputs: dict, targets=None):
        from merlin_longseq.jagged import lengths_from_padding

        columns = self.history_columns(inputs)
        missing = [c for c in columns if c not in inputs]
        if missing:
            raise KeyError(f"RecentHistoryWindow: the batch lacks the history columns {missing}; got {sorted(inputs)}")
        for name in columns:
            if inputs[name].dim() != 2:
                raise ValueError(f"{name} must be a padded [batch, length] column (put this step after the "
                                 f"padding step), got shape {tuple(inputs[name].shape)}")
        lengths = lengths_from_padding(inputs[self.length_column]).to(torch.int64)
        if self.sampler is not None:
            new_lengths = torch.from_numpy(self.sampler.sample_numpy(lengths.cpu().numpy(), self.rng))
            new_lengths = new_lengths.to(lengths.device)
        else:
            new_lengths = lengths.clamp(max=self.max_len)
        cut = keep_recent_padded({c: inputs[c] for c in columns}, lengths, new_lengths)
        return {**inputs, **cut}, targets
