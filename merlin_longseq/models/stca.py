"""STCA: Stacked Target-to-History Cross Attention (arXiv 2511.06077), one file for the architecture.

History token (one per past event, most recent LAST):
    x_j = item_emb(item_j) + action_emb(action_j) + time_emb(log2 bucket of request_time - t_j)
          + recency_emb(log2 bucket of rank_j)                    (rank_j = 0 for the most recent event)
  No absolute position table: both buckets are logarithmic and clamp into their last bucket, so a history
  longer than any seen in training maps onto known buckets. The action, time and recency tables start at
  zero: a bucket that training never reached adds nothing rather than noise.
Layer i = 1..M, user side (once per request, shared by all its targets: request level batching, RLB):
    X~(i) = LN(SwiGLU_i(X))        K(i) = X~(i) W_K(i)        V(i) = X~(i) W_V(i)
Query side (per target x_t = item_emb(target)):
    q(1) = LN(SwiGLU_q(x_t))
    o(i) = W_O(i) concat_h softmax(q(i) W_Q(i)_h K(i)_h^T / sqrt(d_h)) V(i)_h     (key padding only)
    q(i+1) = W_f(i) [x_t || o(1) || ... || o(i)]                                   (q(M+1): fused query)
Output: MLP tower (the paper uses RankMixer) over [fused query || target token || fused * target ||
user tokens], one sigmoid head per task (`forward` returns logits [total_candidates, num_tasks]).

Our choices where the paper is silent, each a config flag. Measured with tests/test_stca.py's learning setup
(generate_impressions, 100 items, 900 training requests, 4 epochs), held-out AUC click / like: all three
on 0.63 / 0.74; all off 0.56 / 0.64, no better than per-item click rates (0.56 / 0.63); residual_ffn alone
off 0.57 / 0.64; aligned_init off 0.61 / 0.71; target_product off 0.57 / 0.65.
  - residual_ffn: SwiGLU(X) is read as X + SwiGLU(X) with a zero-initialised down projection, so the
    re-projection starts as LN(X); the bare LN(SwiGLU(X)) trains far slower on small data.
  - aligned_init: W_K(i) starts equal to W_Q(i); with residual_ffn (and the zero-initialised action, time
    and recency tables) a target's first-layer query starts out matching its own past occurrences.
  - target_product: fused * target joins the tower input, a cheap explicit cross (RankMixer's job).
  - SwiGLU has no biases: with biases every re-projected token shares one dominant direction at init.

Inputs are jagged per request: history values [total_history] with hist_offsets [R + 1], candidates
[total_candidates] with cand_offsets [R + 1], request_time [R], user_ids [R] (optional).

Serving: `encode_user` returns the per-layer K/V (an STCAUserState) and `score_candidates` scores any
candidate set against it, so the user side can be cached. `forward_per_target` runs the same module on the
naive layout (each target with its own copy of the history): the baseline RLB is measured against.
Length extrapolation: `length_sampler` (training only) keeps the most recent Beta-drawn suffix per request.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from merlin_longseq.backend import Backend
from merlin_longseq.extrapolation import BetaLengthSampler
from merlin_longseq.jagged import lengths_from_offsets
from merlin_longseq.models.tokenizer import HistoryTokenizer
from merlin_longseq.ops.history_projection import history_projection
from merlin_longseq.ops.target_attention import target_attention
from merlin_longseq.models.base import NamedTasksConfig, RankingModel, request_of_candidates
from merlin_longseq.request import RequestBatch, check_candidates, check_history


@dataclass
class STCAConfig(NamedTasksConfig):
    num_items: int  # item ids 1..num_items (history and candidates share one table); 0 = padding
    num_actions: int = 3  # action ids 1..num_actions; 0 = unknown
    num_users: int = 0  # > 0 adds a user-id token (ids 1..num_users, 0 = unknown)
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2  # M
    head_dim: int | None = None  # d_h; d_model // n_heads by default
    ffn_mult: float = 2.0  # SwiGLU hidden width = ffn_mult * d_model
    num_time_buckets: int = 40  # log2 buckets of seconds before the request (40: beyond 30 years)
    num_rank_buckets: int = 24  # log2 buckets of recency rank (24: 16M events)
    tasks: tuple[str, ...] = ("click",)  # one sigmoid head each; () = headless (external heads, e.g. T4R)
    mlp_dims: tuple[int, ...] = (128, 64)
    residual_ffn: bool = True  # LN(X + SwiGLU(X)) (and for q(1)); False: the paper's bare LN(SwiGLU(X))
    aligned_init: bool = True  # W_K(i) starts equal to W_Q(i)
    target_product: bool = True  # fused query * target joins the tower input
    dropout: float = 0.0  # in the MLP tower
    backend: str = "auto"
    length_sampler: BetaLengthSampler | None = None  # training-only recent-suffix sampling

    def __post_init__(self):
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.num_actions < 0 or self.num_users < 0:
            raise ValueError("num_actions and num_users must be >= 0")
        if self.d_model < 1 or self.n_heads < 1 or self.n_layers < 1:
            raise ValueError("d_model, n_heads and n_layers must be positive")
        if self.num_time_buckets < 1 or self.num_rank_buckets < 1:
            raise ValueError("num_time_buckets and num_rank_buckets must be >= 1")
        self.head_dim = self.head_dim or max(1, self.d_model // self.n_heads)
        self._check_heads_and_sampler()
        Backend.parse(self.backend)



@dataclass
class STCAUserState:
    """Everything the candidates need from the user side; cacheable per request."""

    keys: list[torch.Tensor]  # per layer [total_history, H, d_h]
    values: list[torch.Tensor]  # per layer [total_history, H, d_h]
    history_offsets: torch.Tensor  # [R + 1]
    user_tokens: torch.Tensor | None  # [R, d_model] (user-id embedding) or None

    @property
    def num_requests(self) -> int:
        return self.history_offsets.numel() - 1


def traceable_target_attention(q, k, v, q_offsets, kv_offsets) -> torch.Tensor:
    """target_attention's semantics (softmax over the own request's history, zeros for an empty history)
    with no Python-int sizes, so a torch.jit.trace of it stays valid for any lengths: every target scores
    every event of the batch ([T, H, N], masked to its own request). One request per call costs the same as
    the padded reference; for many requests per call it is R times larger."""
    target_request = torch.repeat_interleave(torch.arange(q_offsets.numel() - 1, device=q.device),
                                             lengths_from_offsets(q_offsets))  # [T]
    event_request = torch.repeat_interleave(torch.arange(kv_offsets.numel() - 1, device=q.device),
                                            lengths_from_offsets(kv_offsets))  # [N]
    own = (target_request[:, None] == event_request[None, :])[:, None, :]  # [T, 1, N]
    scores = torch.einsum("thd,nhd->thn", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~own, float("-inf"))
    has_history = own.any(dim=-1, keepdim=True)  # [T, 1, 1]
    # an all-masked row would give NaN: finite constant scores, then zero weights (as the reference)
    weights = torch.softmax(scores.masked_fill(~has_history, 0.0), dim=-1) * has_history.to(scores.dtype)
    return torch.einsum("thn,nhd->thd", weights, v)


class SwiGLU(nn.Module):
    """down(SiLU(gate x) * up x), no biases (biases put one shared direction into every output);
    with residual=True it returns x + SwiGLU(x) and starts as the identity (down initialised to zero)."""

    def __init__(self, d_model: int, d_hidden: int, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.gate_up = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)
        if residual:
            nn.init.zeros_(self.down.weight)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        out = self.down(F.silu(gate) * up)
        return x + out if self.residual else out


class STCALayer(nn.Module):
    """One stacked cross-attention layer: its own re-projection of the history and its own query path."""

    def __init__(self, cfg: STCAConfig, layer_index: int):
        super().__init__()
        self.cfg = cfg
        d, inner = cfg.d_model, cfg.n_heads * cfg.head_dim
        self.history_ffn = SwiGLU(d, int(cfg.ffn_mult * d), cfg.residual_ffn)
        self.history_norm = nn.LayerNorm(d)
        self.kv_proj = nn.Linear(d, 2 * inner, bias=False)  # W_K || W_V
        self.q_proj = nn.Linear(d, inner, bias=False)  # W_Q
        self.out_proj = nn.Linear(inner, d)  # W_O
        self.fuse = nn.Linear((layer_index + 2) * d, d)  # W_f(i) over [x_t || o_1 .. o_i]
        if cfg.aligned_init:
            with torch.no_grad():
                self.kv_proj.weight[:inner].copy_(self.q_proj.weight)  # W_K := W_Q

    def keys_values(self, history_tokens):
        """[total_history, d] -> K, V [total_history, H, d_h]: LN(SwiGLU) and W_K || W_V (one fused kernel on
        the Triton path: no [N, ffn] intermediate in memory)."""
        cfg, ffn, norm = self.cfg, self.history_ffn, self.history_norm
        # tracing (TorchScript export) keeps the plain reference ops in the graph, as attend() does
        backend = "pytorch" if torch.jit.is_tracing() else cfg.backend
        return history_projection(history_tokens, ffn.gate_up.weight, ffn.down.weight, norm.weight, norm.bias,
                                  self.kv_proj.weight, num_heads=cfg.n_heads, residual=cfg.residual_ffn,
                                  eps=norm.eps, backend=backend)

    def attend(self, query, keys, values, cand_offsets, history_offsets, max_history_len):
        """query [total_candidates, d] -> o(i) [total_candidates, d]."""
        cfg = self.cfg
        q = self.q_proj(query).reshape(-1, cfg.n_heads, cfg.head_dim)
        if torch.jit.is_tracing():
            # the reference op pads to Python-int lengths, which torch.jit.trace would freeze into the graph
            attended = traceable_target_attention(q, keys, values, cand_offsets, history_offsets)
        else:
            attended = target_attention(q, keys, values, cand_offsets, history_offsets,
                                        max_history_len=max_history_len, backend=cfg.backend, check_inputs=False)
        return self.out_proj(attended.reshape(-1, cfg.n_heads * cfg.head_dim))


class STCAModel(RankingModel):
    """STCA ranking model over jagged requests; see the module docstring for the equations."""

    def __init__(self, cfg: STCAConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_embedding = nn.Embedding(cfg.num_items + 1, d, padding_idx=0)
        self.tokenizer = HistoryTokenizer(d, cfg.num_actions, cfg.num_time_buckets, cfg.num_rank_buckets)
        self.user_embedding = nn.Embedding(cfg.num_users + 1, d, padding_idx=0) if cfg.num_users else None
        self.query_ffn = SwiGLU(d, int(cfg.ffn_mult * d), cfg.residual_ffn)
        self.query_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(STCALayer(cfg, i) for i in range(cfg.n_layers))
        self._build_tower((2 + bool(cfg.num_users) + cfg.target_product) * d, cfg.mlp_dims, cfg.dropout, cfg.num_tasks)

    def _task_linear(self) -> nn.Linear:
        return self.heads

    # ---- user side: once per request -------------------------------------------------------------------
    def encode_user(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time,
                    user_ids=None) -> STCAUserState:
        """Per-layer K/V of every request's history (and its user token): cache this to serve."""
        check_history(self.limits, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, user_ids)
        hist_item_ids, hist_actions, hist_timestamps, hist_offsets = self.sample_recent(
            hist_item_ids, hist_actions, hist_timestamps, hist_offsets)
        tokens = self.tokenizer(self.item_embedding(hist_item_ids), hist_actions, hist_timestamps, hist_offsets,
                                request_time)  # X [total_history, d]
        keys, values = zip(*(layer.keys_values(tokens) for layer in self.layers))
        user_tokens = self.user_embedding(user_ids) if self.user_embedding is not None else None  # [R, d]
        return STCAUserState(list(keys), list(values), hist_offsets, user_tokens)

    # ---- candidate side --------------------------------------------------------------------------------
    def candidate_hidden(self, state: STCAUserState, cand_item_ids, cand_offsets) -> torch.Tensor:
        """Tower output [total_candidates, hidden_dim] (the input of the task heads)."""
        check_candidates(self.limits, cand_item_ids, cand_offsets, state.num_requests)
        lengths = lengths_from_offsets(state.history_offsets)
        max_history_len = int(lengths.max()) if lengths.numel() else 0
        target = self.item_embedding(cand_item_ids)  # x_t [T, d]
        query = self.query_norm(self.query_ffn(target))  # q(1)
        summaries = []
        for layer, keys, values in zip(self.layers, state.keys, state.values):
            summaries.append(layer.attend(query, keys, values, cand_offsets, state.history_offsets,
                                          max_history_len))  # o(i)
            query = layer.fuse(torch.cat([target, *summaries], dim=-1))  # q(i + 1)
        request_of = (request_of_candidates(state.num_requests, cand_offsets) if state.user_tokens is not None
                      else None)
        return self.tower_hidden(query, target, state.user_tokens, request_of, product=self.cfg.target_product)

    def score_candidates(self, state: STCAUserState, cand_item_ids, cand_offsets) -> torch.Tensor:
        """Logits [total_candidates, num_tasks] of candidates against a (possibly cached) user state."""
        if self.heads is None:
            raise RuntimeError("this STCAModel was built headless (tasks=()); use candidate_hidden")
        return self.heads(self.candidate_hidden(state, cand_item_ids, cand_offsets))

    def forward_per_target(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time,
                           cand_item_ids, cand_offsets, user_ids=None) -> torch.Tensor:
        """The naive layout: every target gets its own copy of its request's history (no sharing).

        Same logits as `forward` (without a length sampler: a sampler would draw per copy, not per request).
        """
        return self.forward(**per_target_layout(hist_item_ids, hist_actions, hist_timestamps, hist_offsets,
                                                request_time, cand_item_ids, cand_offsets, user_ids))


def per_target_layout(hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, cand_item_ids,
                      cand_offsets, user_ids=None) -> dict:
    """Keyword arguments of STCAModel.forward in the per-target layout (RequestBatch.per_target)."""
    return RequestBatch(hist_item_ids=hist_item_ids, hist_offsets=hist_offsets, cand_item_ids=cand_item_ids,
                        cand_offsets=cand_offsets, hist_actions=hist_actions, hist_timestamps=hist_timestamps,
                        request_time=request_time, user_ids=user_ids).per_target().model_inputs
