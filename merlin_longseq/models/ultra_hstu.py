"""ULTRA-HSTU as a ranking model (arXiv 2602.16986): one request = one sequence, its candidates appended as
targets (one file for the architecture).

Per request r with nh history events and C candidates, the HSTU stack runs over
    [ x_1 .. x_nh | t_1 .. t_C ]      x_j = item_j + action_j (the ranking tokenizer), t_c = item_c (action masked)
with HSTU's pointwise attention (models/hstu.py):
    history row i: causal over the history (semi-local window / global prefix when configured);
    target row c:  every history token of its request and itself, never another candidate;
relative bias: positions min(i, nh) (every target sits right after the history), times: event timestamps,
the request time for the targets. Attention truncation: the last `truncated_layers` layers run on the
`truncated_len` most recent history tokens (and the targets). The targets' final states (after the stack's
LayerNorm) with their item embedding and product (and the user token) go through an MLP tower, one sigmoid
head per task.

Delta-query form. History rows never attend to targets, so the history's layer states, keys and values do not
depend on the candidates: `encode_user` runs the history alone through the stack (the HSTU attention kernel)
and keeps every layer's history keys / values (the user state: cache it to serve); `candidate_hidden` runs only
the candidate rows, each layer attending to the cached keys / values of its request plus its own key. Training
runs the same two halves, so request-level batching, cached and uncached scoring are one computation; a test
checks them against the HSTU encoder run over the whole [history | targets] sequences with num_targets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from merlin_longseq.backend import Backend
from merlin_longseq.extrapolation import BetaLengthSampler
from merlin_longseq.jagged import jagged_positions, jagged_to_padded, lengths_from_offsets
from merlin_longseq.models.base import NamedTasksConfig, RankingModel
from merlin_longseq.models.hstu import HSTUConfig, HSTULayer, _select_tokens
from merlin_longseq.models.tokenizer import HistoryTokenizer
from merlin_longseq.ops.hstu_attention import hstu_attention
from merlin_longseq.ops.pytorch.pt_hstu_attention import (gather_relative_bias, hstu_position_buckets,
                                                          hstu_time_buckets)
from merlin_longseq.request import check_candidates, check_history


@dataclass
class ULTRAHSTUConfig(NamedTasksConfig):
    num_items: int  # item ids 1..num_items (history and candidates share one table); 0 = padding
    num_actions: int = 3  # action ids 1..num_actions; 0 = unknown, and the candidates' masked action
    num_users: int = 0  # > 0 adds a user-id token to the tower input
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    max_seq_len: int = 4096  # N of the 1/N normaliser and the longest history accepted
    num_position_buckets: int = 64
    num_time_buckets: int = 32
    local_window: int | None = None  # semi-local attention of the history rows (K1)
    global_prefix: int = 0  # K2
    truncated_layers: int = 0  # N2: trailing layers on the truncated_len most recent history tokens
    truncated_len: int | None = None  # L'
    qk_activation: str = "silu"  # HSTUConfig.qk_activation: "linear" lets SiLU(q.k) vanish on unrelated events
    mixed_precision: bool = False  # bf16 autocast on the input's device (the attention kernel then runs in bf16)
    tasks: tuple[str, ...] = ("click",)
    mlp_dims: tuple[int, ...] = (64,)
    dropout: float = 0.0
    backend: str = "auto"
    length_sampler: BetaLengthSampler | None = None  # training-only recent-suffix sampling

    def __post_init__(self):
        if self.num_items < 1 or self.num_actions < 0 or self.num_users < 0:
            raise ValueError("need num_items >= 1, num_actions >= 0 and num_users >= 0")
        self._check_heads_and_sampler()
        Backend.parse(self.backend)
        _ = self.hstu  # HSTUConfig checks the layer settings (window, prefix, truncation)

    @property
    def hstu(self) -> HSTUConfig:
        """The HSTU layer settings of the stack."""
        return HSTUConfig(d_model=self.d_model, n_heads=self.n_heads, n_layers=self.n_layers,
                          max_seq_len=self.max_seq_len, dropout=self.dropout,
                          num_position_buckets=self.num_position_buckets, num_time_buckets=self.num_time_buckets,
                          local_window=self.local_window, global_prefix=self.global_prefix,
                          truncated_layers=self.truncated_layers, truncated_len=self.truncated_len,
                          qk_activation=self.qk_activation, backend=self.backend)


@dataclass
class ULTRAHSTUUserState:
    """Per layer, the history rows' keys / values (and timestamps, offsets) the candidates attend to."""

    keys: list[torch.Tensor]  # per layer [N_l, H, dqk]
    values: list[torch.Tensor]  # per layer [N_l, H, dv]
    timestamps: list[torch.Tensor]  # per layer [N_l]
    offsets: list[torch.Tensor]  # per layer [R + 1] (truncated layers keep the L' most recent events)
    request_time: torch.Tensor  # [R]
    user_tokens: torch.Tensor | None  # [R, d_model]

    @property
    def num_requests(self) -> int:
        return self.request_time.shape[0]


class ULTRAHSTUModel(RankingModel):
    """ULTRA-HSTU ranking over jagged requests; see the module docstring."""

    def __init__(self, cfg: ULTRAHSTUConfig):
        super().__init__()
        self.cfg = cfg
        self.hstu_cfg = cfg.hstu
        d = cfg.d_model
        self.item_embedding = nn.Embedding(cfg.num_items + 1, d, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=d ** -0.5)  # unit-RMS tokens entering the stack
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.tokenizer = HistoryTokenizer(d, cfg.num_actions)  # item + action: one token per event
        self.user_embedding = nn.Embedding(cfg.num_users + 1, d, padding_idx=0) if cfg.num_users else None
        self.layers = nn.ModuleList(HSTULayer(self.hstu_cfg) for _ in range(cfg.n_layers))
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.output_norm = nn.LayerNorm(d)
        self._build_tower((3 + bool(cfg.num_users)) * d, cfg.mlp_dims, cfg.dropout, cfg.num_tasks)

    def _task_linear(self) -> nn.Linear:
        return self.heads

    @property
    def limits(self):
        return dataclasses.replace(super().limits, max_history=self.cfg.max_seq_len)

    # ---- user side: once per request -------------------------------------------------------------------
    def encode_user(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time,
                    user_ids=None) -> ULTRAHSTUUserState:
        check_history(self.limits, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, user_ids)
        hist_item_ids, hist_actions, hist_timestamps, hist_offsets = self.sample_recent(
            hist_item_ids, hist_actions, hist_timestamps, hist_offsets)
        with self._autocast(hist_offsets.device):
            return self._encode(hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, user_ids)

    def _encode(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, user_ids):
        cfg, hcfg = self.cfg, self.hstu_cfg
        x = self.input_dropout(self.tokenizer(self.item_embedding(hist_item_ids), hist_actions, hist_timestamps,
                                              hist_offsets, request_time))
        timestamps, offsets = hist_timestamps, hist_offsets
        keys, values, times, all_offsets = [], [], [], []
        n_full = cfg.n_layers - cfg.truncated_layers
        for index, layer in enumerate(self.layers):
            if index == n_full and cfg.truncated_layers:
                # attention truncation: from here on only the L' most recent events (and the targets)
                seq_index, positions = jagged_positions(offsets)
                lengths = lengths_from_offsets(offsets)
                keep = positions >= (lengths - cfg.truncated_len).clamp(min=0)[seq_index]
                idx, offsets = _select_tokens(offsets, keep)
                x, timestamps = x[idx], timestamps[idx]
            u, q, k, v = layer.project(x)
            keys.append(k)
            values.append(v)
            times.append(timestamps)
            all_offsets.append(offsets)
            av = hstu_attention(q, k, v, offsets, hcfg.max_seq_len, hcfg.alpha, causal=True,
                                local_window=hcfg.local_window, global_prefix=hcfg.global_prefix,
                                timestamps=timestamps, pos_bias=layer.pos_bias, time_bias=layer.time_bias,
                                backend=hcfg.backend, check_inputs=False)
            x = layer.finish(x, av, u)
        user_tokens = self.user_embedding(user_ids) if self.user_embedding is not None else None
        return ULTRAHSTUUserState(keys, values, times, all_offsets, request_time, user_tokens)

    # ---- candidate side: the delta query ---------------------------------------------------------------
    def candidate_hidden(self, state: ULTRAHSTUUserState, cand_item_ids, cand_offsets) -> torch.Tensor:
        """Tower output [total_candidates, hidden_dim] of the candidates against a (cached) user state."""
        check_candidates(self.limits, cand_item_ids, cand_offsets, state.num_requests)
        with self._autocast(cand_item_ids.device):
            return self._candidate_hidden(state, cand_item_ids, cand_offsets).float()

    def _candidate_hidden(self, state, cand_item_ids, cand_offsets):
        target = self.item_embedding(cand_item_ids)  # action masked: the zero action adds nothing
        y = self.input_dropout(target)
        request_of, slot = jagged_positions(cand_offsets)
        width = int(lengths_from_offsets(cand_offsets).max()) if cand_item_ids.numel() else 0
        for layer, k, v, times, offsets in zip(self.layers, state.keys, state.values, state.timestamps,
                                               state.offsets):
            u, q, k_self, v_self = layer.project(y)
            av = self._target_attention(layer, q, k_self, v_self, k, v, times, offsets, state.request_time,
                                        request_of, slot, width)
            y = layer.finish(y, av, u)
        return self.tower_hidden(self.output_norm(y), target, state.user_tokens, request_of)

    def score_candidates(self, state: ULTRAHSTUUserState, cand_item_ids, cand_offsets) -> torch.Tensor:
        if self.heads is None:
            raise RuntimeError("this ULTRAHSTUModel was built headless (tasks=()); use candidate_hidden")
        return self.heads(self.candidate_hidden(state, cand_item_ids, cand_offsets))  # fp32 head on fp32 hidden

    def _target_attention(self, layer, q, k_self, v_self, keys, values, times, offsets, request_time, request_of,
                          slot, width):
        """Each candidate row: SiLU(alpha q.k + rab) v / N over its request's history keys and its own key."""
        hcfg = self.hstu_cfg
        requests = offsets.numel() - 1
        lengths = lengths_from_offsets(offsets)
        longest = int(lengths.max()) if lengths.numel() else 0
        # candidates padded per request [R, Cmax, H, d]: one score block per request, no per-candidate history copy
        qp = q.new_zeros(requests, max(width, 1), *q.shape[1:])
        qp[request_of, slot] = q
        kp = jagged_to_padded(keys, offsets, longest, check=False)  # [R, L, H, dqk]
        vp = jagged_to_padded(values, offsets, longest, check=False)
        scores = torch.einsum("rchd,rjhd->rhcj", qp, kp) * hcfg.alpha  # [R, H, Cmax, L]
        positions = torch.arange(longest, device=q.device)
        pos_buckets = time_buckets = None
        if layer.pos_bias is not None:  # every target sits at position nh (right after the history)
            pos_buckets = hstu_position_buckets(lengths[:, None] - positions[None, :], layer.pos_bias.shape[-1])
        if layer.time_bias is not None:
            tp = jagged_to_padded(times, offsets, longest, check=False)
            time_buckets = hstu_time_buckets(request_time[:, None].to(torch.int64) - tp.to(torch.int64),
                                             layer.time_bias.shape[-1])
        if pos_buckets is not None or time_buckets is not None:
            bias = gather_relative_bias(layer.pos_bias, pos_buckets, layer.time_bias, time_buckets)  # [H, R, L]
            scores = scores + bias.movedim(0, 1)[:, :, None, :].to(scores.dtype)  # [R, H, 1, L]
        real = positions[None, :] < lengths[:, None]  # [R, L]
        weights = F.silu(scores) * real[:, None, None, :].to(scores.dtype) / hcfg.max_seq_len
        history_part = torch.einsum("rhcj,rjhd->rchd", weights, vp)[request_of, slot]  # [C, H, dv]
        self_score = (q * k_self).sum(-1) * hcfg.alpha  # [C, H]: distance 0, time gap 0
        if layer.pos_bias is not None:
            self_score = self_score + layer.pos_bias[:, 0]
        if layer.time_bias is not None:
            self_score = self_score + layer.time_bias[:, 0]
        return history_part + (F.silu(self_score) / hcfg.max_seq_len)[..., None] * v_self


__all__ = ["ULTRAHSTUConfig", "ULTRAHSTUModel", "ULTRAHSTUUserState"]
