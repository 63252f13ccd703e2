"""LONGER: global tokens, token merge and hybrid attention over request-grouped ranking data (one file).

arXiv 2505.04421 ("LONGER: Scaling Up Long Sequence Modeling in Industrial Recommenders").

Input (shared with the STCA model so the two are directly comparable), per request r = 0..R-1:
    history  hist_item_ids / hist_actions / hist_timestamps [N] jagged by hist_offsets [R + 1] (most recent
             last, may be empty); request_time [R]; optional user_ids [R]
    targets  cand_item_ids [C] jagged by cand_offsets [R + 1] (at least one per request)
    output   logits [C, num_tasks] (one sigmoid head per task); num_tasks = 0 builds the model headless:
             candidate_hidden gives the MLP's hidden layer [C, head_hidden] for external heads (T4R tasks)
History token (width d = token_dim) = item + action + log2-bucketed (request_time - timestamp)
+ log2-bucketed recency rank (0 = most recent), the same buckets as STCA. No absolute position table: longer
histories than trained on fall into the last buckets, and the context tables start at zero.

Token merge. The L events of a request are cut into G = ceil(L / K) groups of K adjacent events, aligned on
the MOST RECENT event: group g (time order, g = G-1 the newest) holds ranks [(G-1-g) K, (G-g) K), so every
group is full except possibly the OLDEST one, whose missing slots are its oldest ones. Inside a group the
slot of an event is K-1-(rank mod K) (slot K-1 = the group's newest event). A group becomes one token of
width d_model (K * d by default):
    concat  the K slot tokens side by side (empty slots are zeros), projected when K*d != d_model;
    mean    the mean of the real slot tokens, projected when d != d_model;
    inner   a small transformer (inner_layers blocks, bidirectional inside the group, empty slots masked,
            a learned slot embedding) over the K tokens, then concat as above.
An empty history gives no merged token.

Global tokens (config.global_tokens, in that order, each optional), width d_model, built per candidate:
    target                projected target item embedding (the item table is shared with the history)
    cls                   a learned vector
    user                  user id embedding
    target_x_user         Linear(target * user)
    target_x_history      Linear(target * mean merged token of the request)
    target_history_stats  embedding of the log2 bucket of the target's occurrences in the history + embedding
                          of the bucket of its latest occurrence's rank (or "never"); opt-in, see LONGERConfig

Sequence and hybrid attention. Per candidate, the token order is
    [ g_1 .. g_m | s_1 .. s_G ]       g = global tokens, s = merged tokens, oldest first.
The query set is [ g_1 .. g_m | s_{G-k'+1} .. s_G ] with k' = min(k, G) (all G when k is None).
Layer 1 is cross attention from the queries to all m + G tokens; layers 2..N are self-attention among the
m + k' query tokens only. Masks (True = may attend), one rule for every layer, over that layer's keys:
    global query g_i   -> every global token and every merged token (global tokens see everything), except
                          in layer 1, where by default it sees the merged tokens only (layer1_global_keys:
                          there its query would find itself before any event; docs/RESULTS.md, issue 14);
    merged query s_j   -> every global token and the merged tokens s_i with i <= j (never a newer one).
Consequences (tested): an older group s_i (not among the k' newest) is only a key/value of layer 1, yet it
reaches the output through every layer-1 query; a merged token depends only on the events of its own
group; in layer 1 a recent query never sees a newer group, but from layer 2 on it sees the global tokens,
which saw everything, so strict causality over the whole stack holds only with no global tokens; candidates
of a request never see each other (permuting them permutes the scores).

What depends on the request only (the user side, computed once and shared by all its candidates, RLB and
KV cache): the history tokens, the merge, layer-1 keys/values of the merged tokens, layer-1 queries of the
k' recent merged tokens, and their softmax partial sums over the merged keys. Per candidate remain the m
global tokens and the rest of layer 1: the softmax over a query row is split into a merged-key part and a
global-key part and recombined exactly from (row max, denominator, numerator) partials, so a candidate costs
m (m + G) + k' m score entries in layer 1 instead of (m + k') (m + G). Layers 2..N and the head run per
candidate (the recent tokens see the target through the global tokens).

Head: the final global token states, the mean of the final recent states and the raw target item
embedding, concatenated and scaled by 1/sqrt(m + 2) (one factor per concatenated vector), then an MLP (one
hidden layer of head_hidden units) with num_tasks outputs.

Scales and initialisation. Every block is pre-LN and the stack ends in a LayerNorm, whose output ignores the
scale of its input: on a residual stream of RMS ~0.1 (the old tables: items std 0.1, CLS 0.02) Adam's first
steps (about lr per weight) changed every normalised activation by O(1). With random residual branches ~88%
of the head input was also one vector shared by all candidates, so at lr 1e-2 the first steps moved every
logit the same way (T4R test data: loss 0.69 -> 0.96 after one step), the head's GELU pre-activations
drifted down (mean -3.2 after 20 steps) and the model stayed at a constant prediction. Hence: the item and
user tables and CLS ~ N(0, 1) and a LayerNorm on the tokens entering the stack (merged and global tokens, as
BERT normalises its embeddings); zero biases and residual branches (attention output, second FFN layer) at
_RESIDUAL_INIT_SCALE of the default init, so each block starts near the identity and the head sees
per-candidate tokens; the m + 2 unit-RMS head input vectors scaled by 1/sqrt(m + 2) (the first head layer's
init scaled up to match: same function at init) so the per-step change of the head does not grow with the
number of global tokens.

Training options: mixed_precision (bf16 autocast on the input's device; attention softmax statistics stay
float32, logits come back float32), recompute (torch.utils.checkpoint, use_reentrant=False, around the merge,
layer 1's request and candidate halves and every self-attention layer), length_sampler (training only: a
Beta-drawn most-recent suffix per request, as in STCA). forward_reference is the same model computed the
plain way (one masked attention per candidate in layer 1) and exists to check the fast path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from merlin_longseq.backend import Backend, resolve_backend
from merlin_longseq.buckets import log2_buckets
from merlin_longseq.models.tokenizer import HistoryTokenizer
from merlin_longseq.models.base import RankingModel
from merlin_longseq.request import RequestError, check_candidates, check_history
from merlin_longseq.extrapolation import BetaLengthSampler
from merlin_longseq.ops.group_attention import group_attention
from merlin_longseq.ops.target_attention import target_attention
from merlin_longseq.jagged import (
    jagged_positions,
    jagged_to_padded,
    lengths_from_offsets,
    offsets_from_lengths,
    padding_mask,
)

MERGE_MODES = ("inner", "mean", "concat")
GLOBAL_TOKEN_KINDS = ("target", "cls", "user", "target_x_user", "target_x_history", "target_history_stats")
_USER_KINDS = ("user", "target_x_user")
_TARGET_KINDS = ("target", "target_x_user", "target_x_history")
_CROSS_KINDS = ("target_x_user", "target_x_history")


@dataclass
class LONGERConfig:
    num_items: int
    num_actions: int = 3
    num_users: int = 0  # 0: no user table (then no "user" / "target_x_user" global token)
    num_tasks: int = 1  # 0 = headless: candidate_hidden only (external heads, e.g. T4R prediction tasks)
    token_dim: int = 32  # d: width of one history event token
    merge_size: int = 4  # K: events per merged token
    merge_mode: str = "inner"  # inner | mean | concat
    inner_layers: int = 1
    inner_heads: int = 1
    d_model: int | None = None  # width after the merge; K * token_dim by default
    n_heads: int = 2
    n_layers: int = 2  # layer 1 (cross) + n_layers - 1 self-attention layers
    num_recent_queries: int | None = 100  # k; None = every merged token is a query
    ffn_mult: int = 4
    # order is kept; None = target, cls (and user, target_x_user when num_users > 0). target_x_history (target
    # times the mean merged token) is opt-in: a shortcut the model takes instead of learning to read the history
    # (with it, click AUC stayed flat in the history length: docs/RESULTS.md). target_history_stats (how often /
    # how recently the target occurs in the history) is opt-in: a strong hand-made cross feature that STCA does
    # not get, so leave it off for like-for-like comparisons
    global_tokens: tuple[str, ...] | None = None
    num_time_buckets: int = 40  # log2 buckets of seconds before the request (as STCA)
    num_rank_buckets: int = 24  # log2 buckets of recency rank (as STCA)
    head_hidden: int = 64
    # target_product: the head also reads t * h (t = the normalised target vector, h = the "target" global
    # token's final state), the explicit target x history cross STCA's tower has; None = on when "target"
    # is a global token. aligned_init: every attention's key projection starts equal to its query projection
    # and the target projection starts as the merge projection summed over slots, so the target's first-layer
    # query starts out matching the merged tokens that hold the same item (issue 14's ablations: without
    # both, LONGER did not learn to read the history; docs/RESULTS.md)
    target_product: bool | None = None
    aligned_init: bool = True
    # layer 1's global queries attend to the merged history only, so the target's first read is of the history
    # alone (it meets the other global tokens from layer 2 on); True: to the global tokens too (every token of
    # the sequence, the paper's layout), where the target's query finds itself at least as well as any event
    layer1_global_keys: bool = False
    dropout: float = 0.0
    mixed_precision: bool = False  # bf16 autocast on the input's device
    recompute: bool = False  # activation checkpointing of the merge and every attention layer
    length_sampler: BetaLengthSampler | None = None  # training only: keep a Beta-drawn recent suffix
    # auto / triton / pytorch: the Triton kernels for the hybrid layer's attention over the merged tokens
    # (target_attention with per-query key limits) and the InnerTransformer's group attention
    backend: str = "auto"

    def __post_init__(self):
        positive = ("num_items", "num_actions", "token_dim", "merge_size", "inner_heads",
                    "n_heads", "n_layers", "ffn_mult", "num_time_buckets", "num_rank_buckets", "head_hidden")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"LONGERConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_users < 0 or self.inner_layers < 0 or self.num_tasks < 0:
            raise ValueError("num_users, inner_layers and num_tasks must be >= 0")
        if self.merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode must be one of {MERGE_MODES}, got {self.merge_mode!r}")
        if self.merge_mode == "inner" and self.inner_layers < 1:
            raise ValueError("merge_mode='inner' needs inner_layers >= 1")
        if self.merge_mode == "inner" and self.token_dim % self.inner_heads:
            raise ValueError(f"token_dim={self.token_dim} must be divisible by inner_heads={self.inner_heads}")
        if self.d_model is None:
            self.d_model = self.merge_size * self.token_dim
        if self.d_model < 1 or self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be positive and divisible by n_heads={self.n_heads}")
        if self.num_recent_queries is not None and self.num_recent_queries < 1:
            raise ValueError("num_recent_queries (k) must be >= 1, or None for every merged token")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.global_tokens is None:
            users = ("user", "target_x_user") if self.num_users > 0 else ()
            self.global_tokens = ("target", "cls", *users)
        self.global_tokens = tuple(self.global_tokens)
        for kind in self.global_tokens:
            if kind not in GLOBAL_TOKEN_KINDS:
                raise ValueError(f"unknown global token {kind!r}; choose from {GLOBAL_TOKEN_KINDS}")
            if kind in _USER_KINDS and self.num_users == 0:
                raise ValueError(f"global token {kind!r} needs num_users > 0")
        if len(set(self.global_tokens)) != len(self.global_tokens):
            raise ValueError(f"global_tokens has duplicates: {self.global_tokens}")
        if self.target_product is None:
            self.target_product = "target" in self.global_tokens
        elif self.target_product and "target" not in self.global_tokens:
            raise ValueError("target_product=True needs the 'target' global token (or set target_product=False)")
        if self.length_sampler is not None and not isinstance(self.length_sampler, BetaLengthSampler):
            raise TypeError("length_sampler must be a BetaLengthSampler or None")
        Backend.parse(self.backend)

    @property
    def num_global_tokens(self) -> int:
        return len(self.global_tokens)

    def headless(self) -> "LONGERConfig":
        return dataclasses.replace(self, num_tasks=0)

    def with_tasks(self, names) -> "LONGERConfig":
        return dataclasses.replace(self, num_tasks=len(tuple(names)))

    @property
    def uses_users(self) -> bool:
        return any(kind in _USER_KINDS for kind in self.global_tokens)

    @property
    def merge_input_width(self) -> int:
        return self.token_dim if self.merge_mode == "mean" else self.merge_size * self.token_dim


# ----------------------------------------------------------------------------------------------- attention


class _Partial(NamedTuple):
    """Softmax attention over a subset of keys, kept unnormalised so subsets can be combined exactly.

    row_max [..., Tq, 1] (detached; -inf for a row that saw no key), denom [..., Tq, 1] = sum exp(s - max),
    numer [..., Tq, Dv] = sum exp(s - max) v. All float32.
    """

    row_max: torch.Tensor
    denom: torch.Tensor
    numer: torch.Tensor

    def index(self, idx: torch.Tensor) -> "_Partial":
        return _Partial(self.row_max[idx], self.denom[idx], self.numer[idx])

    def finish(self) -> torch.Tensor:
        # a row with no visible key gives zeros, never NaN
        return self.numer / torch.where(self.denom > 0, self.denom, torch.ones_like(self.denom))


def _partial_attention(q, k, v, mask=None) -> _Partial:
    """q [..., Tq, Dh], k/v [..., Tk, Dh], mask broadcastable to [..., Tq, Tk] (True = may attend)."""
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    rows = q.shape[-2]
    if k.shape[-2] == 0:
        empty = q.new_full((*batch, rows, 1), float("-inf"), dtype=torch.float32)
        return _Partial(empty, torch.zeros_like(empty), q.new_zeros((*batch, rows, v.shape[-1]), dtype=torch.float32))
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # [..., Tq, Tk]
    # the max only keeps exp() in range; the result does not depend on it, so it carries no gradient
    visible = scores.detach() if mask is None else scores.detach().masked_fill(~mask, float("-inf"))
    row_max = visible.amax(dim=-1, keepdim=True)
    shifted = scores - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    if mask is not None:
        shifted = shifted.masked_fill(~mask, float("-inf"))  # exp -> exactly 0, and a zero gradient
    weights = torch.exp(shifted)
    return _Partial(row_max, weights.sum(dim=-1, keepdim=True), (weights.to(v.dtype) @ v).float())


def _merge_partials(a: _Partial, b: _Partial) -> _Partial:
    row_max = torch.maximum(a.row_max, b.row_max)
    # the shift cancels in numer / denom: no gradient through it (a kernel's row_max is its lse, differentiable)
    safe = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    wa, wb = torch.exp(a.row_max - safe), torch.exp(b.row_max - safe)
    return _Partial(row_max, a.denom * wa + b.denom * wb, a.numer * wa + b.numer * wb)


# cuDNN's SDPA backward fails ("mha_graph.execute ... is_good()") once batch * heads reaches 65,536 (seen on an
# H100, torch 2.11: the inner transformer of 128 requests x 2,048 events is 65,536 groups), so larger batches
# are cut into chunks of at most this many (batch * heads) rows
_SDPA_MAX_ROWS = 32_768


def _sdpa(q, k, v, mask, causal=False):
    """Masked (or causal) softmax attention over q/k/v [B, H, T, Dh]; every query row must see at least one key
    (callers add the diagonal). `causal` instead of a mask lets CUDA pick a flash kernel."""
    per_item = math.prod(q.shape[1:-2])
    chunk = max(1, _SDPA_MAX_ROWS // max(1, per_item))
    if q.dim() < 3 or q.shape[0] <= chunk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    per_row_mask = mask is not None and mask.shape[0] == q.shape[0]
    return torch.cat([
        F.scaled_dot_product_attention(q[i:i + chunk], k[i:i + chunk], v[i:i + chunk],
                                       attn_mask=mask[i:i + chunk] if per_row_mask else mask, is_causal=causal)
        for i in range(0, q.shape[0], chunk)
    ])


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # [..., T, H * Dh] -> [..., H, T, Dh]
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    # [..., H, T, Dh] -> [..., T, H * Dh]
    return x.transpose(-3, -2).flatten(-2)


# residual branches (attention output projection, second FFN layer) start at this fraction of the default init:
# each block starts close to the identity (not exactly: a zero branch would hide bugs from the equivalence tests)
_RESIDUAL_INIT_SCALE = 0.1


def _zero_bias(module: nn.Module) -> None:
    """Every Linear bias in `module` starts at zero: no offset shared by all tokens (module docstring)."""
    for linear in module.modules():
        if isinstance(linear, nn.Linear) and linear.bias is not None:
            nn.init.zeros_(linear.bias)


def _init_residual_block(block: nn.Module) -> None:
    _zero_bias(block)
    with torch.no_grad():
        for linear in (block.out, block.ffn[2]):
            linear.weight.mul_(_RESIDUAL_INIT_SCALE)


class FeedForward(nn.Sequential):
    def __init__(self, width: int, mult: int, dropout: float):
        super().__init__(nn.Linear(width, mult * width), nn.GELU(), nn.Linear(mult * width, width),
                         nn.Dropout(dropout))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: x [B, T, D], mask [B or 1, 1, T, T] bool (or causal=True) -> [B, T, D].

    Or slot_valid [B, T] bool instead of a mask: group attention (TokenMerge's inner blocks), token i sees token
    j iff slot_valid[:, j] or i == j, through ops.group_attention with `backend`.
    """

    def __init__(self, width: int, heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = FeedForward(width, ffn_mult, dropout)
        self.dropout = nn.Dropout(dropout)
        _init_residual_block(self)

    def forward(self, x, mask=None, causal=False, slot_valid=None, backend: Backend | str = Backend.AUTO):
        if x.shape[0] == 0 or x.shape[1] == 0:
            return x
        h = self.norm1(x)
        if slot_valid is not None:
            # [B, T, H, Dh] views of the Linear outputs, as the kernel takes them: no head transposes, no mask
            q = self.query(h).unflatten(-1, (self.heads, -1))
            k, v = (t.unflatten(-1, (self.heads, -1)) for t in self.key_value(h).chunk(2, dim=-1))
            attn = group_attention(q, k, v, slot_valid, backend=backend, check_inputs=False).flatten(-2)
        else:
            q = _split_heads(self.query(h), self.heads)  # [B, H, T, Dh]
            k, v = (_split_heads(t, self.heads) for t in self.key_value(h).chunk(2, dim=-1))
            attn = _merge_heads(_sdpa(q, k, v, mask, causal))
        x = x + self.dropout(self.out(attn))
        return x + self.ffn(self.norm2(x))


# ---------------------------------------------------------------------------------------- history tokens


def group_history(tokens: torch.Tensor, offsets: torch.Tensor, merge_size: int):
    """Jagged event tokens -> groups of K aligned on the most recent event.

    tokens [N, d], offsets [R + 1] -> (groups [G, K, d] with zeros in empty slots, slot_valid [G, K] bool,
    group_offsets [R + 1]); groups of a request are in time order, its oldest group is the partial one.
    """
    lengths = lengths_from_offsets(offsets)
    num_groups = (lengths + merge_size - 1) // merge_size
    group_offsets = offsets_from_lengths(num_groups)
    seq_index, positions = jagged_positions(offsets)
    rank = lengths[seq_index] - 1 - positions
    group = group_offsets[seq_index] + num_groups[seq_index] - 1 - rank // merge_size
    slot = merge_size - 1 - rank % merge_size
    total_groups = int(group_offsets[-1])
    groups = tokens.new_zeros(total_groups, merge_size, tokens.shape[-1])
    groups = groups.index_put((group, slot), tokens)
    slot_valid = torch.zeros(total_groups, merge_size, dtype=torch.bool, device=tokens.device)
    slot_valid[group, slot] = True
    return groups, slot_valid, group_offsets


class TokenMerge(nn.Module):
    """groups [G, K, d] + slot_valid [G, K] -> merged tokens [G, d_model] (mode: inner / mean / concat)."""

    def __init__(self, cfg: LONGERConfig):
        super().__init__()
        self.mode, self.merge_size, self.d_model = cfg.merge_mode, cfg.merge_size, cfg.d_model
        self.backend = cfg.backend
        if self.mode == "inner":
            self.slot_embedding = nn.Parameter(0.02 * torch.randn(cfg.merge_size, cfg.token_dim))
            self.inner = nn.ModuleList(
                SelfAttentionBlock(cfg.token_dim, cfg.inner_heads, cfg.ffn_mult, cfg.dropout)
                for _ in range(cfg.inner_layers)
            )
        width = cfg.merge_input_width
        self.proj = nn.Linear(width, cfg.d_model) if width != cfg.d_model else nn.Identity()
        _zero_bias(self.proj)

    def item_projection(self) -> torch.Tensor:
        """[d_model, d]: where one item vector lands in the merged space, summed over the slots it may take
        (mean: the projection itself); the target projection's aligned init."""
        weight = self.proj.weight if isinstance(self.proj, nn.Linear) else torch.eye(self.d_model)
        if self.mode == "mean":
            return weight.clone()
        return weight.unflatten(1, (self.merge_size, -1)).sum(1)

    def forward(self, groups, slot_valid):
        if groups.shape[0] == 0:
            return groups.new_zeros(0, self.d_model)
        valid = slot_valid.unsqueeze(-1).to(groups.dtype)  # [G, K, 1]
        if self.mode == "mean":
            pooled = (groups * valid).sum(1) / valid.sum(1).clamp(min=1)  # [G, d]
            return self.proj(pooled)
        if self.mode == "inner":
            x = groups + self.slot_embedding
            if resolve_backend(self.backend, groups) is Backend.TRITON:
                # the Triton group attention: programs of whole groups, no [G, 1, K, K] mask, no SDPA chunks
                for block in self.inner:
                    x = block(x, slot_valid=slot_valid, backend=self.backend)
            else:
                eye = torch.eye(self.merge_size, dtype=torch.bool, device=groups.device)
                mask = (slot_valid[:, None, :] | eye).unsqueeze(1)  # [G, 1, K, K]; the diagonal keeps empty rows finite
                for block in self.inner:
                    x = block(x, mask)
            groups = x * valid  # empty slots stay zero, as in concat
        return self.proj(groups.flatten(1))  # [G, K * d] -> [G, d_model]


# ------------------------------------------------------------------------------------------------ layer 1


class RequestFeatures(NamedTuple):
    """Per-request inputs of the global tokens (None where no configured token needs them)."""

    user_token: torch.Tensor | None  # [R, d_model] user id embedding
    history_summary: torch.Tensor | None  # [R, d_model] mean merged token (target_x_history)
    history_item_ids: torch.Tensor | None  # [R, Lmax] right-padded with 0 (target_history_stats)
    history_lengths: torch.Tensor | None  # [R] (target_history_stats)

    def index(self, idx: torch.Tensor) -> "RequestFeatures":
        return RequestFeatures(*(None if t is None else t[idx] for t in self))


@dataclass
class UserCache:
    """Request-side state of one batch of requests (R of them); reused by `score` for any candidates.

    P = longest merged length in the batch, Q = most recent-query tokens (k' = min(k, G_r) per request).
    """

    key: torch.Tensor  # [R, H, P, Dh] layer-1 keys of the merged tokens
    value: torch.Tensor  # [R, H, P, Dh] layer-1 values
    merged_valid: torch.Tensor  # [R, P] bool
    recent_state: torch.Tensor  # [R, Q, d_model] merged tokens used as queries (residual stream input)
    recent_query: torch.Tensor  # [R, H, Q, Dh] their layer-1 queries
    recent_valid: torch.Tensor  # [R, Q] bool
    recent_partial: _Partial  # fields [R, H, Q, .]: their attention over the merged keys (causal)
    features: RequestFeatures  # what the global tokens read

    @property
    def num_requests(self) -> int:
        return self.key.shape[0]


def _kernel_partial(q, q_offsets, max_queries, k, v, key_limit) -> _Partial:
    """Softmax attention of jagged query rows over padded per-request key blocks with the Triton
    target_attention kernel. q [N, H, Dh] (request r owns rows q_offsets[r]:q_offsets[r + 1]), k/v
    [R, H, P, Dh], key_limit [N]: how many of its request's P keys each row sees (a prefix).
    -> _Partial with fields [N, H, 1 or Dh]: row_max is the (differentiable) log-sum-exp, denom 1 (0 for a
    row that sees no key), numer the normalised output."""
    requests, heads, num_keys, dh = k.shape
    # [R, H, P, Dh] views of token-major Linear outputs -> [R * P, H, Dh], no copy
    k, v = (t.transpose(1, 2).reshape(-1, heads, dh) for t in (k, v))
    kv_offsets = torch.arange(requests + 1, device=k.device) * num_keys
    out, lse = target_attention(q, k, v, q_offsets, kv_offsets, key_limit=key_limit, return_lse=True,
                                max_history_len=num_keys, max_targets=max_queries, backend=Backend.TRITON,
                                check_inputs=False)
    lse = lse.unsqueeze(-1)
    return _Partial(lse, torch.isfinite(lse).float(), out.float())


class HybridCrossLayer(nn.Module):
    """Layer 1: queries = global + k' recent merged tokens, keys/values = global + all merged tokens."""

    def __init__(self, cfg: LONGERConfig):
        super().__init__()
        d = cfg.d_model
        self.backend = cfg.backend
        self.heads = cfg.n_heads
        self.global_keys = cfg.layer1_global_keys
        self.norm1 = nn.LayerNorm(d)
        self.query = nn.Linear(d, d)
        self.key_value = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, cfg.ffn_mult, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        _init_residual_block(self)

    def encode_memory(self, merged, merged_valid, recent_pos, recent_valid):
        """merged [R, P, d], recent_pos [R, Q] (index into P) -> the request-side pieces of the layer."""
        h = self.norm1(merged)
        key, value = (_split_heads(t, self.heads) for t in self.key_value(h).chunk(2, dim=-1))  # [R, H, P, Dh]
        rows = torch.arange(merged.shape[0], device=merged.device).unsqueeze(1)
        recent_state = merged[rows, recent_pos]  # [R, Q, d]
        recent_query = _split_heads(self.query(h[rows, recent_pos]), self.heads)  # [R, H, Q, Dh]
        if self._use_kernel(key):
            # the query of merged index p sees merged keys 0..p (recent_pos < the request's merged count)
            requests, heads, num_recent, dh = recent_query.shape
            limit = torch.where(recent_valid, recent_pos + 1, torch.zeros_like(recent_pos)).reshape(-1)
            q_offsets = torch.arange(requests + 1, device=key.device) * num_recent
            partial = _kernel_partial(recent_query.transpose(1, 2).reshape(-1, heads, dh), q_offsets, num_recent,
                                      key, value, limit)
            partial = _Partial(*(t.view(requests, num_recent, heads, -1).transpose(1, 2) for t in partial))
            return key, value, recent_state, recent_query, partial
        positions = torch.arange(merged.shape[1], device=merged.device)
        causal = positions.view(1, 1, -1) <= recent_pos.unsqueeze(-1)  # [R, Q, P]
        mask = (causal & merged_valid.unsqueeze(1) & recent_valid.unsqueeze(-1)).unsqueeze(1)  # [R, 1, Q, P]
        return key, value, recent_state, recent_query, _partial_attention(recent_query, key, value, mask)

    def _use_kernel(self, tensor) -> bool:
        return resolve_backend(self.backend, tensor) is Backend.TRITON

    def attend_candidates(self, global_tokens, cache: UserCache, request_index, cand_offsets):
        """global_tokens [C, m, d] -> the layer's output for [globals | recent] per candidate [C, m + Q, d]."""
        h = self.norm1(global_tokens)
        gq = _split_heads(self.query(h), self.heads)  # [C, H, m, Dh]
        gk, gv = (_split_heads(t, self.heads) for t in self.key_value(h).chunk(2, dim=-1))
        # recent rows: cached part over the merged keys + this candidate's global keys
        recent_valid = cache.recent_valid[request_index]  # [C, Q]
        to_globals = _partial_attention(cache.recent_query[request_index], gk, gv, recent_valid[:, None, :, None])
        recent = _merge_partials(cache.recent_partial.index(request_index), to_globals)
        # global rows: own global keys + the request's merged keys (grouped per request: no copy of the cache)
        merged = self._globals_to_merged(gq, cache, cand_offsets)
        glob = _merge_partials(_partial_attention(gq, gk, gv), merged) if self.global_keys else merged
        attended = torch.cat([glob.finish(), recent.finish()], dim=-2).to(global_tokens.dtype)  # [C, H, m + Q, Dh]
        x = torch.cat([global_tokens, cache.recent_state[request_index].to(global_tokens.dtype)], dim=1)
        return self._finish(x, _merge_heads(attended))

    def _globals_to_merged(self, gq, cache: UserCache, cand_offsets) -> _Partial:
        num_cand, heads, m, dh = gq.shape
        if self._use_kernel(gq):
            # candidates are grouped by request: its C_r * m global rows see the request's merged keys
            per_request = lengths_from_offsets(cand_offsets)
            merged_count = cache.merged_valid.sum(1)  # [R]
            limit = torch.repeat_interleave(merged_count, per_request * m)
            max_rows = (int(per_request.max()) if per_request.numel() else 0) * m
            partial = _kernel_partial(gq.transpose(1, 2).reshape(-1, heads, dh), cand_offsets * m, max_rows,
                                      cache.key, cache.value, limit)
            return _Partial(*(t.view(num_cand, m, heads, -1).transpose(1, 2) for t in partial))
        padded = jagged_to_padded(gq, cand_offsets)  # [R, Cmax, H, m, Dh]
        cmax = padded.shape[1]
        q = padded.permute(0, 2, 1, 3, 4).reshape(padded.shape[0], heads, cmax * m, dh)  # [R, H, Cmax*m, Dh]
        part = _partial_attention(q, cache.key, cache.value, cache.merged_valid[:, None, None, :])
        real = padding_mask(lengths_from_offsets(cand_offsets), cmax)  # [R, Cmax]

        def unpad(t):  # [R, H, Cmax*m, X] -> [C, H, m, X]
            t = t.reshape(t.shape[0], heads, cmax, m, t.shape[-1]).permute(0, 2, 1, 3, 4)
            return t[real]

        return _Partial(unpad(part.row_max), unpad(part.denom), unpad(part.numer))

    def forward_dense(self, queries, keys, mask, keyless_rows=None):
        """Plain masked attention (reference path): queries [C, Tq, d], keys [C, Tk, d], mask [C, 1, Tq, Tk];
        keyless_rows [C, Tq] bool: rows whose attention output is zero (they see no key; the fast path's rule)."""
        q = _split_heads(self.query(self.norm1(queries)), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.key_value(self.norm1(keys)).chunk(2, dim=-1))
        if q.shape[-2] == 0:
            return queries
        attended = _merge_heads(_sdpa(q, k, v, mask))
        if keyless_rows is not None:
            attended = attended.masked_fill(keyless_rows.unsqueeze(-1), 0.0)
        return self._finish(queries, attended)

    def _finish(self, x, attended):
        x = x + self.dropout(self.out(attended))
        return x + self.ffn(self.norm2(x))


# ------------------------------------------------------------------------------------------------- model


class LONGERModel(RankingModel):
    """LONGER ranking model; forward(...) = score(encode_user(...), ...). See the module docstring."""

    def __init__(self, cfg: LONGERConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_embedding = _item_table(cfg.num_items, cfg.token_dim)
        self.tokenizer = HistoryTokenizer(cfg.token_dim, cfg.num_actions, cfg.num_time_buckets, cfg.num_rank_buckets)
        self.merge = TokenMerge(cfg)
        kinds = cfg.global_tokens
        self.target_proj = nn.Linear(cfg.token_dim, d) if any(k in _TARGET_KINDS for k in kinds) else None
        self.cls = nn.Parameter(torch.randn(d)) if "cls" in kinds else None  # N(0, 1), like the tables
        self.user_embedding = nn.Embedding(cfg.num_users + 1, d) if cfg.uses_users else None  # N(0, 1)
        self.cross = nn.ModuleDict({kind: nn.Linear(d, d) for kind in kinds if kind in _CROSS_KINDS})
        for linear in (self.target_proj, self.cross):
            if linear is not None:
                _zero_bias(linear)
        # the tokens entering the stack are normalised: the residual stream starts at RMS 1
        self.merged_norm = nn.LayerNorm(d)
        self.global_norm = nn.LayerNorm(d)
        if "target_history_stats" in kinds:
            self.target_count = nn.Embedding(cfg.num_rank_buckets, d)  # log2-bucketed occurrences
            self.target_recency = nn.Embedding(cfg.num_rank_buckets + 1, d)  # last occurrence's rank; last row: never
        self.layer1 = HybridCrossLayer(cfg)
        self.self_layers = nn.ModuleList(
            SelfAttentionBlock(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.n_layers - 1)
        )
        self.final_norm = nn.LayerNorm(d)
        self.target_index = cfg.global_tokens.index("target") if cfg.target_product else None
        head_in = cfg.num_global_tokens * d + d + cfg.token_dim + (d if cfg.target_product else 0)
        # m + 2 (+ 1) concatenated unit-RMS vectors, scaled by 1/sqrt(m + 2 (+ 1)); the init compensates (module
        # docstring)
        self.head_input_scale = (cfg.num_global_tokens + 2 + bool(cfg.target_product)) ** -0.5
        # head[:2] is the hidden layer (what a headless model returns), head[2] the task logits
        self.head = nn.Sequential(nn.Linear(head_in, cfg.head_hidden), nn.GELU())
        with torch.no_grad():
            self.head[0].weight.div_(self.head_input_scale)
        if cfg.num_tasks:
            self.head.append(nn.Linear(cfg.head_hidden, cfg.num_tasks))
        self.hidden_dim = cfg.head_hidden
        if cfg.aligned_init:
            self._align_init()

    @torch.no_grad()
    def _align_init(self):
        """Keys start equal to queries, and the target vector starts in the merged tokens' item subspace."""
        blocks = [self.layer1, *self.self_layers, *(self.merge.inner if self.cfg.merge_mode == "inner" else ())]
        for block in blocks:
            width = block.query.weight.shape[0]
            block.key_value.weight[:width].copy_(block.query.weight)
        if self.target_proj is not None:
            self.target_proj.weight.copy_(self.merge.item_projection())

    # ---- public API

    def _task_linear(self) -> nn.Linear:
        return self.head[2]

    def encode_user(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time,
                    user_ids=None) -> UserCache:
        """Everything that depends on the request only; compute once, score any number of candidates."""
        with self._autocast(hist_offsets.device):
            merged, merged_valid, recent_pos, recent_valid, features = self._prepare_request(
                hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, user_ids)
            key, value, recent_state, recent_query, partial = self._maybe_checkpoint(
                self.layer1.encode_memory, merged, merged_valid, recent_pos, recent_valid)
            return UserCache(key, value, merged_valid, recent_state, recent_query, recent_valid, partial, features)

    def score_candidates(self, cache: UserCache, cand_item_ids, cand_offsets, check_inputs: bool = True):
        """Candidates of the cached requests -> logits [C, num_tasks] (float32)."""
        self._need_heads()
        return self._score(cache, cand_item_ids, cand_offsets, check_inputs, hidden=False)

    def candidate_hidden(self, cache: UserCache, cand_item_ids, cand_offsets, check_inputs: bool = True):
        """Candidates of the cached requests -> the head's hidden layer [C, head_hidden] (float32): the input
        of the task logits, or of external heads when the model is headless (num_tasks = 0)."""
        return self._score(cache, cand_item_ids, cand_offsets, check_inputs, hidden=True)

    def _score(self, cache: UserCache, cand_item_ids, cand_offsets, check_inputs, hidden):
        if check_inputs:
            _check_candidates(self.limits, cand_item_ids, cand_offsets, cache.num_requests)
        request_index, _ = jagged_positions(cand_offsets)
        with self._autocast(cand_item_ids.device):
            target_emb, global_tokens = self._global_tokens(cand_item_ids, cache.features.index(request_index))
            x = self._maybe_checkpoint(self.layer1.attend_candidates, global_tokens, cache, request_index,
                                       cand_offsets)
            recent_valid = cache.recent_valid[request_index]
            x = self._self_layers(x, recent_valid)
            return self._head(x, recent_valid, target_emb, global_tokens, hidden).float()

    def forward_reference(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time,
                          cand_item_ids, cand_offsets, user_ids=None, hidden: bool = False):
        """Same model without the KV cache or the split softmax: every candidate runs layer 1 as one masked
        attention over its own copy of [globals | merged]. Slower; it exists to check the fast path.
        hidden=True returns what candidate_hidden returns instead of the logits."""
        if not hidden:
            self._need_heads()
        with self._autocast(hist_offsets.device):
            merged, merged_valid, recent_pos, recent_valid, features = self._prepare_request(
                hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, user_ids)
            _check_candidates(self.limits, cand_item_ids, cand_offsets, merged.shape[0])
            request_index, _ = jagged_positions(cand_offsets)
            target_emb, global_tokens = self._global_tokens(cand_item_ids, features.index(request_index))
            m, num_cand = global_tokens.shape[1], global_tokens.shape[0]
            rows = torch.arange(merged.shape[0], device=merged.device).unsqueeze(1)
            recent = merged[rows, recent_pos][request_index]  # [C, Q, d]
            keys = torch.cat([global_tokens, merged[request_index]], dim=1)  # [C, m + P, d]
            queries = torch.cat([global_tokens, recent], dim=1)  # [C, m + Q, d]
            key_valid = torch.cat([merged_valid.new_ones(num_cand, m), merged_valid[request_index]], dim=1)
            key_pos = torch.arange(merged.shape[1], device=merged.device)
            recent_sees = torch.cat([
                recent_valid.new_ones(*recent_pos.shape, m),
                key_pos.view(1, 1, -1) <= recent_pos.unsqueeze(-1),
            ], dim=-1)
            recent_sees = (recent_sees & recent_valid.unsqueeze(-1))[request_index]  # [C, Q, m + P]
            global_sees = key_valid.new_ones(num_cand, m, keys.shape[1])
            if not self.cfg.layer1_global_keys:
                global_sees[:, :, :m] = False
            row_rule = torch.cat([global_sees, recent_sees], dim=1)
            mask = row_rule & key_valid.unsqueeze(1)
            # rows that see no key (padded recent rows; global rows of an empty history without global keys) attend
            # to key 0 only, to stay finite, and their output is zeroed as the fast path gives it
            empty_rows = ~mask.any(-1, keepdim=True)
            first_key = torch.zeros_like(mask)
            first_key[..., :1] = True
            mask = (mask | (empty_rows & first_key)).unsqueeze(1)  # [C, 1, m + Q, m + P]
            x = self.layer1.forward_dense(queries, keys, mask, keyless_rows=empty_rows.squeeze(-1))
            x = self._self_layers(x, recent_valid[request_index])
            return self._head(x, recent_valid[request_index], target_emb, global_tokens, hidden).float()

    # ---- pieces

    def _need_heads(self):
        if self.cfg.num_tasks == 0:
            raise RuntimeError("this LONGERModel was built headless (num_tasks=0); use candidate_hidden")

    def _maybe_checkpoint(self, fn, *args):
        if self.cfg.recompute and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _prepare_request(self, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, user_ids):
        """History -> merged tokens [R, P, d] (+ valid [R, P]), recent query positions [R, Q] (+ valid) and the
        RequestFeatures of the global tokens."""
        cfg = self.cfg
        check_history(self.limits, hist_item_ids, hist_actions, hist_timestamps, hist_offsets, request_time, user_ids)
        hist_item_ids, hist_actions, hist_timestamps, hist_offsets = self.sample_recent(
            hist_item_ids, hist_actions, hist_timestamps, hist_offsets)
        tokens = self.tokenizer(self.item_embedding(hist_item_ids), hist_actions, hist_timestamps, hist_offsets,
                                request_time)  # [N, d]
        groups, slot_valid, group_offsets = group_history(tokens, hist_offsets, cfg.merge_size)
        merged = self.merged_norm(self._maybe_checkpoint(self.merge, groups, slot_valid))  # [G, d_model]
        num_groups = lengths_from_offsets(group_offsets)
        merged = jagged_to_padded(merged, group_offsets)  # [R, P, d_model]
        merged_valid = padding_mask(num_groups, merged.shape[1])
        k = cfg.num_recent_queries
        num_recent = num_groups if k is None else num_groups.clamp(max=k)
        longest = int(num_recent.max()) if num_recent.numel() else 0
        slots = torch.arange(longest, device=merged.device)
        recent_valid = slots.unsqueeze(0) < num_recent.unsqueeze(1)  # [R, Q]
        recent_pos = (num_groups - num_recent).unsqueeze(1) + slots  # merged index of each recent query
        recent_pos = torch.where(recent_valid, recent_pos, torch.zeros_like(recent_pos))
        kinds = cfg.global_tokens
        user_token = self.user_embedding(user_ids) if self.user_embedding is not None else None
        summary = history_ids = history_lengths = None
        if "target_x_history" in kinds:
            weight = merged_valid.unsqueeze(-1).to(merged.dtype)
            summary = (merged * weight).sum(1) / weight.sum(1).clamp(min=1)  # [R, d]
        if "target_history_stats" in kinds:
            history_ids = jagged_to_padded(hist_item_ids, hist_offsets)  # [R, Lmax]
            history_lengths = lengths_from_offsets(hist_offsets)
        features = RequestFeatures(user_token, summary, history_ids, history_lengths)
        return merged, merged_valid, recent_pos, recent_valid, features

    def _global_tokens(self, cand_item_ids, features: RequestFeatures):
        """features: per candidate (already indexed by request) -> (target item embedding [C, token_dim],
        global tokens [C, m, d_model] in config order)."""
        target_emb = self.item_embedding(cand_item_ids)
        target_vec = self.target_proj(target_emb) if self.target_proj is not None else None
        tokens = []
        for kind in self.cfg.global_tokens:
            if kind == "target":
                tokens.append(target_vec)
            elif kind == "cls":
                tokens.append(self.cls.to(target_emb.dtype).expand(cand_item_ids.shape[0], -1))
            elif kind == "user":
                tokens.append(features.user_token)
            elif kind == "target_x_user":
                tokens.append(self.cross[kind](target_vec * features.user_token))
            elif kind == "target_x_history":
                tokens.append(self.cross[kind](target_vec * features.history_summary))
            else:  # target_history_stats
                tokens.append(self._target_history_stats(cand_item_ids, features))
        if not tokens:
            return target_emb, target_emb.new_zeros(cand_item_ids.shape[0], 0, self.cfg.d_model)
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in tokens])
        return target_emb, self.global_norm(torch.stack([t.to(dtype) for t in tokens], dim=1))

    def _target_history_stats(self, cand_item_ids, features: RequestFeatures):
        """Occurrences of each candidate in its request's history and the rank of the latest one -> [C, d]."""
        history = features.history_item_ids  # [C, Lmax]; padding 0 never equals a candidate (>= 1)
        match = history == cand_item_ids.unsqueeze(1)
        positions = torch.arange(history.shape[1], device=history.device)
        rank = features.history_lengths.unsqueeze(1) - 1 - positions  # 0 = most recent
        never = self.cfg.num_rank_buckets
        latest = torch.where(match, rank, torch.full_like(rank, torch.iinfo(rank.dtype).max)).amin(1) \
            if history.shape[1] else rank.new_zeros(history.shape[0])
        seen = match.any(1)
        recency = torch.where(seen, log2_buckets(latest, never), torch.full_like(latest, never))
        return self.target_count(log2_buckets(match.sum(1), never)) + self.target_recency(recency)

    def _self_layers(self, x, recent_valid):
        """Layers 2..N over [globals | recent] per candidate: x [C, m + Q, d], recent_valid [C, Q]."""
        if not len(self.self_layers):
            return x
        m, q = x.shape[1] - recent_valid.shape[1], recent_valid.shape[1]
        valid = torch.cat([recent_valid.new_ones(recent_valid.shape[0], m), recent_valid], dim=1)  # [C, T]
        pos = torch.arange(m + q, device=x.device)
        is_global_row = (pos < m).view(1, -1, 1)
        causal = pos.view(1, 1, -1) <= pos.view(1, -1, 1)  # recent rows: keys up to themselves (globals come first)
        mask = (is_global_row | causal) & valid.unsqueeze(1)
        mask = (mask | torch.eye(m + q, dtype=torch.bool, device=x.device)).unsqueeze(1)  # [C, 1, T, T]
        for layer in self.self_layers:
            x = self._maybe_checkpoint(layer, x, mask)
        return x

    def _head(self, x, recent_valid, target_emb, global_tokens, hidden=False):
        """x [C, m + Q, d] final states, global_tokens [C, m, d] the stack's input (for target_product)."""
        x = self.final_norm(x)
        m = x.shape[1] - recent_valid.shape[1]
        weight = recent_valid.unsqueeze(-1).to(x.dtype)
        recent_mean = (x[:, m:] * weight).sum(1) / weight.sum(1).clamp(min=1)  # [C, d]
        parts = [x[:, :m].flatten(1), recent_mean, target_emb.to(x.dtype)]
        if self.target_index is not None:
            i = self.target_index
            parts.append(x[:, i] * global_tokens[:, i].to(x.dtype))
        features = torch.cat(parts, dim=-1)
        features = features * self.head_input_scale
        return self.head[:2](features) if hidden else self.head(features)


# ------------------------------------------------------------------------------------- baseline model


class FullSequenceTransformer(nn.Module):
    """The plain transformer LONGER is measured against (benchmarks/bench_longer.py): no token merge, no
    hybrid attention, every layer over every event.

    One sample = one (request, candidate) pair; the target is a token of the sequence, so nothing is shared
    among a request's candidates. Histories have one length L (a benchmark baseline, not a ragged model):
    hist_* [S, L] (most recent last), request_time [S], cand_item_ids [S] -> logits [S, num_tasks] (float32).
    Tokens: the event tokens of LONGER (HistoryTokenizer) at `width`, then m = max(1, number of LONGER global
    tokens) global tokens (the target item embedding, then learned vectors). Sequence [e_1 .. e_L | g_1 .. g_m]
    under one causal mask: events see older events only and the globals, placed last, see the whole history
    (a causal mask, so CUDA can use a flash kernel). Same layers, heads and FFN as cfg; head: the final
    global states -> Linear(head_hidden) -> GELU -> Linear(num_tasks). cfg.mixed_precision applies.
    """

    def __init__(self, cfg: LONGERConfig, width: int | None = None):
        super().__init__()
        width = cfg.token_dim if width is None else width
        if width < 1 or width % cfg.n_heads:
            raise ValueError(f"width={width} must be positive and divisible by n_heads={cfg.n_heads}")
        self.cfg, self.width = cfg, width
        self.num_tasks = max(1, cfg.num_tasks)
        self.num_global = max(1, cfg.num_global_tokens)
        self.item_embedding = _item_table(cfg.num_items, width)
        self.tokenizer = HistoryTokenizer(width, cfg.num_actions, cfg.num_time_buckets, cfg.num_rank_buckets)
        self.global_vectors = nn.Parameter(0.02 * torch.randn(self.num_global - 1, width))
        self.layers = nn.ModuleList(
            SelfAttentionBlock(width, cfg.n_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(self.num_global * width, cfg.head_hidden), nn.GELU(),
                                  nn.Linear(cfg.head_hidden, self.num_tasks))

    def forward(self, hist_item_ids, hist_actions, hist_timestamps, request_time, cand_item_ids):
        if hist_item_ids.dim() != 2 or hist_actions.shape != hist_item_ids.shape \
                or hist_timestamps.shape != hist_item_ids.shape:
            raise ValueError("hist_item_ids / hist_actions / hist_timestamps must all be [S, L], got "
                             f"{tuple(hist_item_ids.shape)}, {tuple(hist_actions.shape)}, "
                             f"{tuple(hist_timestamps.shape)}")
        samples, length = hist_item_ids.shape
        if request_time.shape != (samples,) or cand_item_ids.shape != (samples,):
            raise ValueError(f"request_time and cand_item_ids must be [S] = [{samples}], got "
                             f"{tuple(request_time.shape)} and {tuple(cand_item_ids.shape)}")
        offsets = torch.arange(samples + 1, device=hist_item_ids.device) * length
        autocast = (torch.autocast(device_type=hist_item_ids.device.type, dtype=torch.bfloat16)
                    if self.cfg.mixed_precision else contextlib.nullcontext())
        with autocast:
            events = self.tokenizer(self.item_embedding(hist_item_ids.reshape(-1)), hist_actions.reshape(-1),
                                    hist_timestamps.reshape(-1), offsets, request_time)  # [S * L, w]
            target = self.item_embedding(cand_item_ids).unsqueeze(1)  # [S, 1, w]
            learned = self.global_vectors.to(target.dtype).expand(samples, -1, -1)  # [S, m - 1, w]
            x = torch.cat([events.view(samples, length, -1), target, learned], dim=1)  # [S, L + m, w]
            for layer in self.layers:
                x = layer(x, causal=True)
            x = self.final_norm(x[:, length:]).flatten(1)  # [S, m * w]
            return self.head(x).float()

    def flops_per_sample(self, history_len: int) -> int:
        """Matmul FLOPs of one sample's forward pass (counted as full_transformer_flops_per_sample does)."""
        head = 2 * self.num_global * self.width * self.cfg.head_hidden + 2 * self.cfg.head_hidden * self.num_tasks
        return head + full_transformer_flops_per_sample(history_len, self.width, self.cfg.n_layers,
                                                        self.cfg.ffn_mult, self.num_global)


# ------------------------------------------------------------------------------------------ input checks


def _check_candidates(limits, cand_item_ids, cand_offsets, num_requests):
    check_candidates(limits, cand_item_ids, cand_offsets, num_requests)
    counts = lengths_from_offsets(cand_offsets)
    if counts.numel() and int(counts.min()) < 1:
        raise RequestError("every request needs at least one candidate")


def _item_table(num_items: int, dim: int) -> nn.Embedding:
    table = nn.Embedding(num_items + 1, dim, padding_idx=0)
    nn.init.normal_(table.weight, std=1.0)  # unit scale: see "Scales and initialisation"
    with torch.no_grad():
        table.weight[0].zero_()
    return table


# ------------------------------------------------------------------------------------------------- FLOPs
# Matmul FLOPs (2 per multiply-add) of a dense forward pass, what this file computes: attention is counted
# over the full masked score matrix (as a masked kernel computes it), norms, softmax and lookups are free.


def full_transformer_flops_per_sample(history_len: int, d_model: int, n_layers: int, ffn_mult: int = 4,
                                      num_global_tokens: int = 0) -> int:
    """Vanilla transformer over T = L + m tokens of width d: per layer (8 + 4 f) T d^2 + 4 T^2 d
    (Q, K, V, O projections, a 2-matmul FFN of width f d, scores and the weighted sum)."""
    tokens = history_len + num_global_tokens
    return n_layers * ((8 + 4 * ffn_mult) * tokens * d_model ** 2 + 4 * tokens ** 2 * d_model)


def longer_flops_breakdown(cfg: LONGERConfig, history_len: int, candidates_per_request: int = 1) -> dict[str, int]:
    """Forward matmul FLOPs of one request of `history_len` events scored on `candidates_per_request` targets."""
    if history_len < 0 or candidates_per_request < 1:
        raise ValueError("need history_len >= 0 and candidates_per_request >= 1")
    t, d, size, f = cfg.token_dim, cfg.d_model, cfg.merge_size, cfg.ffn_mult
    n_cand, m = candidates_per_request, cfg.num_global_tokens
    groups = math.ceil(history_len / size)
    recent = groups if cfg.num_recent_queries is None else min(cfg.num_recent_queries, groups)
    merge = 0
    if cfg.merge_mode == "inner":
        merge += cfg.inner_layers * groups * ((8 + 4 * f) * size * t ** 2 + 4 * size ** 2 * t)
    if cfg.merge_input_width != d:
        merge += 2 * groups * cfg.merge_input_width * d
    kinds = cfg.global_tokens
    uses_target = any(k in _TARGET_KINDS for k in kinds)
    global_tokens = n_cand * (2 * t * d * uses_target + 2 * d ** 2 * sum(k in _CROSS_KINDS for k in kinds))
    layer1_request = 4 * groups * d ** 2 + 2 * recent * d ** 2 + 4 * recent * groups * d
    layer1_candidates = n_cand * (
        6 * m * d ** 2  # Q, K, V of the global tokens
        + 4 * recent * m * d  # recent queries -> global keys
        + 4 * m * (m * cfg.layer1_global_keys + groups) * d  # global queries -> (global and) merged keys
        + (2 + 4 * f) * (m + recent) * d ** 2  # output projection and FFN of every query row
    )
    rows = m + recent
    self_layers = (cfg.n_layers - 1) * n_cand * ((8 + 4 * f) * rows * d ** 2 + 4 * rows ** 2 * d)
    head_in = m * d + d + t + (d if cfg.target_product else 0)
    head = n_cand * (2 * head_in * cfg.head_hidden + 2 * cfg.head_hidden * cfg.num_tasks)
    return {"merge": merge, "global_tokens": global_tokens, "layer1_request": layer1_request,
            "layer1_candidates": layer1_candidates, "self_layers": self_layers, "head": head}


def longer_flops_per_sample(cfg: LONGERConfig, history_len: int, candidates_per_request: int = 1) -> float:
    """FLOPs per scored (request, candidate) sample; the request side is shared by its candidates (RLB)."""
    return sum(longer_flops_breakdown(cfg, history_len, candidates_per_request).values()) / candidates_per_request


__all__ = [
    "GLOBAL_TOKEN_KINDS",
    "MERGE_MODES",
    "RequestFeatures",
    "HybridCrossLayer",
    "FullSequenceTransformer",
    "LONGERConfig",
    "LONGERModel",
    "SelfAttentionBlock",
    "TokenMerge",
    "UserCache",
    "full_transformer_flops_per_sample",
    "group_history",
    "longer_flops_breakdown",
    "longer_flops_per_sample",
]
