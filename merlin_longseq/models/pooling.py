"""Mean-pooling ranking baseline: what a model gets from the history without attention.

    x_j  = item_emb(item_j) + action_emb(action_j)             (one token per past event)
    u    = mean_j x_j                                           (zeros for an empty history)
    out  = MLP([u || x_t || u * x_t (|| user token)])           (x_t = item_emb(target), one table)

The user side (u) is computed once per request (request level batching), like STCA, and the interface is
STCAModel's (encode_user / candidate_hidden / score_candidates / forward over jagged requests), so the two
models are interchangeable in the jobs and the Transformers4Rec block. The mean weighs every event equally:
it blurs which items the user met, which is what the attention models are measured against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from merlin_longseq.extrapolation import BetaLengthSampler
from merlin_longseq.jagged import lengths_from_offsets
from merlin_longseq.models.tokenizer import HistoryTokenizer
from merlin_longseq.models.base import NamedTasksConfig, RankingModel, request_of_candidates
from merlin_longseq.request import check_candidates, check_history


@dataclass
class MeanPoolConfig(NamedTasksConfig):
    num_items: int  # item ids 1..num_items (history and candidates share one table); 0 = padding
    num_actions: int = 3  # action ids 1..num_actions; 0 = unknown
    num_users: int = 0  # > 0 adds a user-id token (ids 1..num_users, 0 = unknown)
    d_model: int = 32
    tasks: tuple[str, ...] = ("click",)  # one sigmoid head each; () = headless (external heads, e.g. T4R)
    mlp_dims: tuple[int, ...] = (64, 32)
    dropout: float = 0.0
    length_sampler: BetaLengthSampler | None = None  # training-only recent-suffix sampling, as STCA

    def __post_init__(self):
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.num_actions < 0 or self.num_users < 0:
            raise ValueError("num_actions and num_users must be >= 0")
        if self.d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {self.d_model}")
        self._check_heads_and_sampler()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")



@dataclass
class MeanPoolUserState:
    pooled: torch.Tensor  # [R, d_model]
    user_tokens: torch.Tensor | None  # [R, d_model] or None

    @property
    def num_requests(self) -> int:
        return self.pooled.shape[0]


class MeanPoolModel(RankingModel):
    def __init__(self, cfg: MeanPoolConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_embedding = nn.Embedding(cfg.num_items + 1, d, padding_idx=0)
        # item + action only (no time or recency buckets): the plain baseline; actions start random as before
        self.tokenizer = HistoryTokenizer(d, cfg.num_actions, zero_init=False)
        self.user_embedding = nn.Embedding(cfg.num_users + 1, d, padding_idx=0) if cfg.num_users else None
        self._build_tower((3 + bool(cfg.num_users)) * d, cfg.mlp_dims, cfg.dropout, cfg.num_tasks)

    def _task_linear(self) -> nn.Linear:
        return self.heads

    # ---- pieces shared with the pooling variants (DIN): checked history tokens and the tower

    def history_tokens(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time,
                       user_ids=None):
        """Checked inputs -> (event tokens [N, d], hist_offsets (after the training-time length sampler),
        user tokens [R, d] or None). Timestamps are accepted for interface parity and not used."""
        check_history(self.limits, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, user_ids)
        hist_item_ids, hist_actions, hist_timestamps, hist_offsets = self.sample_recent(
            hist_item_ids, hist_actions, hist_timestamps, hist_offsets)
        tokens = self.tokenizer(self.item_embedding(hist_item_ids), hist_actions, hist_timestamps, hist_offsets,
                                request_time)  # [N, d]
        user_tokens = self.user_embedding(user_ids) if self.user_embedding is not None else None
        return tokens, hist_offsets, user_tokens

    # ---- the model

    def encode_user(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time,
                    user_ids=None) -> MeanPoolUserState:
        """Mean history token per request."""
        tokens, hist_offsets, user_tokens = self.history_tokens(hist_item_ids, hist_actions, hist_timestamps,
                                                                hist_offsets, request_time, user_ids)
        lengths = lengths_from_offsets(hist_offsets)
        requests = lengths.shape[0]
        owner = torch.repeat_interleave(torch.arange(requests, device=tokens.device), lengths)
        sums = torch.zeros(requests, tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
        sums = sums.index_add(0, owner, tokens)
        pooled = sums / lengths.clamp(min=1).unsqueeze(1).to(tokens.dtype)  # empty history -> zeros
        return MeanPoolUserState(pooled, user_tokens)

    def candidate_hidden(self, state: MeanPoolUserState, cand_item_ids, cand_offsets) -> torch.Tensor:
        """Tower output [total_candidates, hidden_dim]."""
        check_candidates(self.limits, cand_item_ids, cand_offsets, state.num_requests)
        request_of = request_of_candidates(state.num_requests, cand_offsets)
        return self.tower_hidden(state.pooled[request_of], self.item_embedding(cand_item_ids), state.user_tokens,
                                 request_of)

    def score_candidates(self, state, cand_item_ids, cand_offsets) -> torch.Tensor:
        if self.heads is None:
            raise RuntimeError(f"this {type(self).__name__} was built headless (tasks=()); use candidate_hidden")
        return self.heads(self.candidate_hidden(state, cand_item_ids, cand_offsets))


