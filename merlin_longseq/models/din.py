"""DIN-style target attention baseline (Zhou et al. 2018, "Deep Interest Network"), request level batching.

    h_j = item_emb(item_j) + action_emb(action_j)                  (one token per past event, as mean pooling)
    c   = item_emb(candidate)                                      (one item table for history and candidates)
    w_j = a([h_j, c, h_j - c, h_j * c])                            (the "activation unit": an MLP -> scalar)
    u_c = sum_j w_j h_j                                            (NO softmax: DIN keeps the interest intensity;
                                                                    an empty history gives zeros)
    out = MLP([u_c || c || u_c * c (|| user token)])              (one sigmoid head per task)

It is MeanPoolModel with the uniform 1/L weights replaced by learned, candidate-dependent, unnormalised ones:
same history tokens, same tower input layout, same interface (encode_user / candidate_hidden /
score_candidates / forward over jagged requests), so the jobs and the Transformers4Rec block take either.

Request level batching: the user side (the history tokens) is built once per request; each candidate is then
paired with the events of its OWN request only, so the activation unit sees sum_r C_r * L_r pairs, never a
candidates x whole-batch product. `target_weighted_pool` is that step on plain tensors (what the gradient
check exercises). Timestamps are accepted for interface parity and not used (DIN has no time feature).
The activation unit uses PReLU, as the paper's; the tower uses SiLU, as the mean-pooling tower it is
compared with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from merlin_longseq.jagged import JaggedInputError, lengths_from_offsets, offsets_from_lengths, validate_offsets
from merlin_longseq.models.pooling import MeanPoolConfig, MeanPoolModel, request_of_candidates
from merlin_longseq.request import check_candidates


@dataclass
class DINConfig(MeanPoolConfig):
    """MeanPoolConfig (tables, tower, tasks, length sampler) plus the activation unit's hidden widths."""

    attention_dims: tuple[int, ...] = (32, 16)

    def __post_init__(self):
        super().__post_init__()
        self.attention_dims = tuple(self.attention_dims)
        if any(size < 1 for size in self.attention_dims):
            raise ValueError(f"attention_dims must be positive, got {self.attention_dims}")


@dataclass
class DINUserState:
    tokens: torch.Tensor  # [total_history, d_model] history tokens h_j
    history_offsets: torch.Tensor  # [R + 1]
    user_tokens: torch.Tensor | None  # [R, d_model] or None

    @property
    def num_requests(self) -> int:
        return self.history_offsets.numel() - 1


def candidate_history_pairs(history_offsets: torch.Tensor, cand_offsets: torch.Tensor):
    """Every (candidate, event of the candidate's own request) pair -> (candidate index [P], event index [P]).

    P = sum_r C_r * L_r. Pairs come grouped by candidate, events in history order.
    """
    validate_offsets(history_offsets)
    validate_offsets(cand_offsets)
    if history_offsets.numel() != cand_offsets.numel():
        raise JaggedInputError(f"history_offsets describe {history_offsets.numel() - 1} requests but cand_offsets "
                               f"{cand_offsets.numel() - 1}")
    device = cand_offsets.device
    history_lengths = lengths_from_offsets(history_offsets)
    request_of = torch.repeat_interleave(torch.arange(history_lengths.numel(), device=device),
                                         lengths_from_offsets(cand_offsets))  # [T]
    pairs_per_candidate = history_lengths[request_of]  # [T]
    candidate = torch.repeat_interleave(torch.arange(request_of.numel(), device=device), pairs_per_candidate)
    # position of each pair inside its candidate's run, then shifted to the request's first event
    pair_offsets = offsets_from_lengths(pairs_per_candidate)
    position = torch.arange(candidate.numel(), device=device) - pair_offsets[:-1][candidate]
    event = history_offsets[:-1][request_of[candidate]] + position
    return candidate, event


def target_weighted_pool(tokens: torch.Tensor, history_offsets: torch.Tensor, queries: torch.Tensor,
                         cand_offsets: torch.Tensor,
                         score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_j score([h_j, c, h_j - c, h_j * c]) h_j for every candidate c over its own request's history.

    tokens [N, d] (jagged by history_offsets [R + 1]), queries [T, d] (jagged by cand_offsets [R + 1]),
    score: [P, 4d] -> [P, 1] (or [P]). Returns [T, d]; a candidate of an empty history gets zeros.
    """
    if tokens.dim() != 2 or queries.dim() != 2 or tokens.shape[1] != queries.shape[1]:
        raise JaggedInputError(f"tokens [N, d] and queries [T, d] must be 2-D with one width, got "
                               f"{tuple(tokens.shape)} and {tuple(queries.shape)}")
    for name, offsets, total in (("history_offsets", history_offsets, tokens.shape[0]),
                                 ("cand_offsets", cand_offsets, queries.shape[0])):
        try:
            validate_offsets(offsets, total=total)
        except JaggedInputError as err:
            raise JaggedInputError(f"{name}: {err}") from None
    candidate, event = candidate_history_pairs(history_offsets, cand_offsets)
    h, c = tokens[event], queries[candidate]  # [P, d] each
    weights = score(torch.cat([h, c, h - c, h * c], dim=-1)).reshape(-1, 1)  # [P, 1], unnormalised
    pooled = queries.new_zeros(queries.shape)
    return pooled.index_add(0, candidate, weights * h)  # [T, d]


class ActivationUnit(nn.Module):
    """DIN's local activation unit: [h, c, h - c, h * c] -> MLP (PReLU) -> one unnormalised weight."""

    def __init__(self, d_model: int, hidden: tuple[int, ...]):
        super().__init__()
        layers, width = [], 4 * d_model
        for size in hidden:
            layers += [nn.Linear(width, size), nn.PReLU(size)]
            width = size
        last = nn.Linear(width, 1)
        # the weights are not normalised, so the interest vector is a SUM over up to thousands of events: start
        # the weights small (and free of a shared offset) so that its scale does not grow with the history at init
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    def forward(self, pair_features):
        return self.mlp(pair_features)  # [P, 1]


class DINModel(MeanPoolModel):
    """DIN over jagged requests; see the module docstring for the equations. The tables, the input checks, the
    tower and the heads are MeanPoolModel's: only the pooling differs."""

    def __init__(self, cfg: DINConfig):
        super().__init__(cfg)
        self.attention = ActivationUnit(cfg.d_model, cfg.attention_dims)

    def encode_user(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time,
                    user_ids=None) -> DINUserState:
        """History tokens per request (computed once per request; every candidate reuses them)."""
        return DINUserState(*self.history_tokens(hist_item_ids, hist_actions, hist_timestamps, hist_offsets,
                                                 request_time, user_ids))

    def candidate_hidden(self, state: DINUserState, cand_item_ids, cand_offsets) -> torch.Tensor:
        """Tower output [total_candidates, hidden_dim]."""
        check_candidates(self.limits, cand_item_ids, cand_offsets, state.num_requests)
        target = self.item_embedding(cand_item_ids)  # c [T, d]
        interest = target_weighted_pool(state.tokens, state.history_offsets, target, cand_offsets,
                                        self.attention)  # u_c [T, d]
        return self.tower_hidden(interest, target, state.user_tokens,
                                 request_of_candidates(state.num_requests, cand_offsets))
