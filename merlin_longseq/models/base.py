"""What every ranking model shares (the registry's ranking protocol): the request limits its config implies,
its task head, the training-time recent-window sampling and forward = score(encode(history), candidates).

A ranking model subclasses RankingModel, implements encode_user / candidate_hidden / score_candidates and
`_task_linear` (the Linear giving its task logits, None when built headless).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from merlin_longseq.extrapolation import BetaLengthSampler, keep_recent
from merlin_longseq.jagged import lengths_from_offsets
from merlin_longseq.request import RequestLimits


def request_of_candidates(num_requests: int, cand_offsets: torch.Tensor) -> torch.Tensor:
    """The request index of every candidate [C]."""
    return torch.repeat_interleave(torch.arange(num_requests, device=cand_offsets.device),
                                   lengths_from_offsets(cand_offsets))


class NamedTasksConfig:
    """The config half of the protocol for architectures whose heads are named tasks (`tasks`, a tuple)."""

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def uses_users(self) -> bool:
        return self.num_users > 0

    def _check_heads_and_sampler(self) -> None:
        """The __post_init__ part these configs share: task names, tower widths, the training-time sampler."""
        self.tasks, self.mlp_dims = tuple(self.tasks), tuple(self.mlp_dims)
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"task names must be unique, got {self.tasks}")
        if any(size < 1 for size in self.mlp_dims):
            raise ValueError(f"mlp_dims must be positive, got {self.mlp_dims}")
        if self.length_sampler is not None and not isinstance(self.length_sampler, BetaLengthSampler):
            raise TypeError("length_sampler must be a BetaLengthSampler or None")

    def headless(self):
        """A copy with no task heads (the T4R tasks are the heads)."""
        return dataclasses.replace(self, tasks=())

    def with_tasks(self, names):
        return dataclasses.replace(self, tasks=tuple(names))


class RankingModel(nn.Module):
    cfg = None  # the architecture's config (set by the subclass)

    @property
    def limits(self) -> RequestLimits:
        """What a request must satisfy for this model (ids within its tables, user ids when it reads them)."""
        return RequestLimits.of(self.cfg)

    @property
    def task_head(self) -> nn.Linear:
        """The Linear(hidden_dim, num_tasks) giving the task logits (row t = task t)."""
        if self.cfg.num_tasks == 0:
            raise RuntimeError(f"this {type(self).__name__} was built headless: it has no task head")
        return self._task_linear()

    def _task_linear(self) -> nn.Linear:
        raise NotImplementedError

    def _autocast(self, device: torch.device):
        """bf16 autocast on `device` when the config asks for mixed_precision (one rule for every architecture)."""
        if not getattr(self.cfg, "mixed_precision", False):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def _build_tower(self, width: int, mlp_dims, dropout: float, num_tasks: int) -> None:
        """The MLP tower (Linear, SiLU, Dropout per hidden size) over `width` inputs and one logit per task
        (self.tower, self.hidden_dim, self.heads; heads None when headless), as tower_hidden reads them."""
        layers = []
        for size in mlp_dims:
            layers += [nn.Linear(width, size), nn.SiLU(), nn.Dropout(dropout)]
            width = size
        self.tower = nn.Sequential(*layers)
        self.hidden_dim = width
        self.heads = nn.Linear(width, num_tasks) if num_tasks else None  # row t = task t's head

    def tower_hidden(self, summary, target, user_tokens, request_of, product: bool = True):
        """self.tower(MLP) over [summary || target (|| summary * target) (|| user token)] per candidate."""
        features = [summary, target]
        if product:
            features.append(summary * target)
        if user_tokens is not None:
            features.append(user_tokens[request_of])
        return self.tower(torch.cat(features, dim=-1))

    def sample_recent(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets):
        """Training only, with a length sampler: each history cut to a Beta-drawn most recent window (length
        extrapolation); otherwise the inputs unchanged."""
        sampler = getattr(self.cfg, "length_sampler", None)
        if not self.training or sampler is None:
            return hist_item_ids, hist_actions, hist_timestamps, hist_offsets
        kept, hist_offsets = keep_recent(hist_offsets, sampler.sample(lengths_from_offsets(hist_offsets)))
        pick = lambda t: None if t is None else t[kept]  # noqa: E731
        return pick(hist_item_ids), pick(hist_actions), pick(hist_timestamps), hist_offsets

    def forward(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, cand_item_ids,
                cand_offsets, user_ids=None) -> torch.Tensor:
        """Request level batching: logits [total_candidates, num_tasks], candidates in request order."""
        state = self.encode_user(hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, user_ids)
        return self.score_candidates(state, cand_item_ids, cand_offsets)


__all__ = ["NamedTasksConfig", "RankingModel", "request_of_candidates"]
