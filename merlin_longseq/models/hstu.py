"""HSTU and ULTRA-HSTU on jagged sequences (one file for the architecture).

HSTU layer (arXiv 2402.17152):
    U, V, Q, K = split(SiLU(f1(LN(X))))
    AV = SiLU(Q K^T * alpha + rab(p, t)) V / N      (pointwise, causal, N = max_seq_len)
    Y  = f2(LN(AV) * U) + X
ULTRA-HSTU options (arXiv 2602.16986), all on the same encoder:
  - one token per event (EventTokenizer: item + action embedding, candidates get a zero action);
  - semi-local attention: local_window (K1 most recent) + global_prefix (K2 first tokens);
  - num_targets: candidates at the end of a sequence see the history, not each other;
  - attention truncation: the last `truncated_layers` layers (N2) run on the most recent `truncated_len`
    (L') history tokens plus the targets; earlier tokens keep their output from the full-length layers;
  - mixture of transducers: one stack per token type; every token's output is the concatenation of each
    stream's latest state at that point (targets belong to every stream), projected back to d_model.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from merlin_longseq.backend import Backend
from merlin_longseq.jagged import (
    JaggedInputError,
    jagged_positions,
    lengths_from_offsets,
    offsets_from_lengths,
    validate_offsets,
)
from merlin_longseq.ops.hstu_attention import hstu_attention


QK_ACTIVATIONS = ("silu", "linear")


@dataclass
class HSTUConfig:
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    max_seq_len: int = 200  # N: the attention normaliser and the longest accepted sequence
    attn_dim: int | None = None  # per-head Q/K width; d_model // n_heads by default
    hidden_dim: int | None = None  # per-head V/U width; d_model // n_heads by default
    dropout: float = 0.1
    alpha: float | None = None  # score scale; 1 / sqrt(attn_dim) by default
    causal: bool = True
    num_position_buckets: int = 64  # 0 disables the position part of the relative bias
    num_time_buckets: int = 32  # 0 disables the time part (it is used only when timestamps are given)
    local_window: int | None = None  # K1 (semi-local attention); None = full causal attention
    global_prefix: int = 0  # K2
    truncated_layers: int = 0  # N2: trailing layers that see only the most recent tokens
    truncated_len: int | None = None  # L'
    num_transducers: int = 1
    output_norm: bool = True
    # "silu": U, V, Q, K = SiLU(f1(LN(X))) as published. "linear": Q and K skip the SiLU, so q.k can be negative
    # and SiLU(q.k) ~ 0 for unrelated events: a sparse sum that can single out a few matches among thousands
    # (with SiLU'd, mostly positive Q and K every event adds weight; see docs/RESULTS.md, ULTRA-HSTU)
    qk_activation: str = "silu"
    backend: str = "auto"

    def __post_init__(self):
        if self.d_model < 1 or self.n_heads < 1 or self.n_layers < 1:
            raise ValueError("d_model, n_heads and n_layers must be positive")
        # the layers call the attention with check_inputs=False, so every structural value is checked here
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        for name in ("attn_dim", "hidden_dim"):
            width = getattr(self, name)
            if width is not None and width < 1:
                raise ValueError(f"{name} must be >= 1 (or None for d_model // n_heads), got {width}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {self.dropout}")
        if self.num_position_buckets < 0 or self.num_time_buckets < 0:
            raise ValueError("num_position_buckets and num_time_buckets must be >= 0 (0 disables)")
        if self.local_window is not None and self.local_window < 1:
            raise ValueError(f"local_window must be >= 1 (or None for full attention), got {self.local_window}")
        if self.global_prefix < 0:
            raise ValueError(f"global_prefix must be >= 0, got {self.global_prefix}")
        if self.global_prefix and self.local_window is None:
            # with full attention every earlier token is visible already: a prefix alone would do nothing
            raise ValueError(f"global_prefix={self.global_prefix} needs local_window (semi-local attention = "
                             "the K1 most recent tokens + the K2 first ones); without local_window attention "
                             "is full and global_prefix would be ignored")
        if self.truncated_len is not None and self.truncated_len < 1:
            raise ValueError(f"truncated_len must be >= 1, got {self.truncated_len}")
        self.attn_dim = self.attn_dim or max(1, self.d_model // self.n_heads)
        self.hidden_dim = self.hidden_dim or max(1, self.d_model // self.n_heads)
        if self.alpha is None:
            self.alpha = self.attn_dim ** -0.5
        if not 0 <= self.truncated_layers <= self.n_layers:
            raise ValueError(f"truncated_layers must be in [0, n_layers={self.n_layers}]")
        if self.truncated_layers and not self.truncated_len:
            raise ValueError("truncated_layers > 0 needs truncated_len (L')")
        if self.num_transducers < 1:
            raise ValueError("num_transducers must be >= 1")
        if self.qk_activation not in QK_ACTIVATIONS:
            raise ValueError(f"qk_activation must be one of {QK_ACTIVATIONS}, got {self.qk_activation!r}")
        Backend.parse(self.backend)

    @classmethod
    def build(cls, d_model: int, n_head: int, n_layer: int, total_seq_length: int | None = None,
              **kwargs) -> "HSTUConfig":
        """HSTUConfig with the signature of every Transformers4Rec config (`tr.XLNetConfig.build(...)`).

        - total_seq_length becomes max_seq_len: N of the 1/N attention normaliser, and the longest session.
        - dropout keeps HSTU's own default (0.1) unless passed. T4R's configs default to 0.3, which cost HSTU
          about a quarter of its accuracy, so it is never inherited.
        - attn_type (XLNet's keyword): "uni" -> causal, "bi" -> bidirectional (HSTUBlock refuses that under
          causal masking).
        - hidden_act, initializer_range, layer_norm_eps, pad_token, log_attention_weights and mem_len are
          accepted and ignored: HSTU's activation is SiLU, its norms and weights use PyTorch defaults, and its
          padding comes from the masking module.
        - any HSTUConfig field (local_window, num_time_buckets, backend, ...) passes through.
        """
        if total_seq_length is None:
            raise ValueError("HSTUConfig.build needs total_seq_length: it is N, the attention normaliser, and must "
                             "be fixed (the padded session length, e.g. the input module's max_sequence_length)")
        if "max_seq_len" in kwargs:
            raise ValueError("pass total_seq_length (T4R's name) or build HSTUConfig(max_seq_len=...), not both")
        doubled = sorted({"d_model", "n_heads", "n_layers"} & set(kwargs))
        if doubled:
            raise TypeError(f"HSTUConfig.build got {doubled} twice: it takes T4R's names d_model, n_head, n_layer")
        for name in _T4R_IGNORED_KEYWORDS:
            kwargs.pop(name, None)
        attn_type = kwargs.pop("attn_type", None)
        if attn_type is not None:
            if attn_type not in ("uni", "bi"):
                raise ValueError(f"attn_type must be 'uni' (causal) or 'bi' (bidirectional), got {attn_type!r}")
            if "causal" in kwargs and kwargs["causal"] != (attn_type == "uni"):
                raise ValueError(f"attn_type={attn_type!r} contradicts causal={kwargs['causal']}")
            kwargs["causal"] = attn_type == "uni"
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"HSTUConfig.build got unknown keyword(s) {unknown}; HSTUConfig fields are "
                            f"{[f.name for f in fields(cls)]}")
        return cls(d_model=d_model, n_heads=n_head, n_layers=n_layer, max_seq_len=int(total_seq_length), **kwargs)


# Transformers4Rec build() keywords that have no HSTU counterpart (see HSTUConfig.build)
_T4R_IGNORED_KEYWORDS = ("hidden_act", "initializer_range", "layer_norm_eps", "pad_token", "log_attention_weights",
                         "mem_len")


class HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.cfg = cfg
        heads, dqk, dv = cfg.n_heads, cfg.attn_dim, cfg.hidden_dim
        self.input_norm = nn.LayerNorm(cfg.d_model)
        self.uvqk = nn.Linear(cfg.d_model, heads * (2 * dv + 2 * dqk))  # f1, fused
        self.attn_norm = nn.LayerNorm(heads * dv)
        self.out_proj = nn.Linear(heads * dv, cfg.d_model)  # f2
        self.dropout = nn.Dropout(cfg.dropout)
        self.pos_bias = nn.Parameter(0.02 * torch.randn(heads, cfg.num_position_buckets)) \
            if cfg.num_position_buckets else None
        self.time_bias = nn.Parameter(0.02 * torch.randn(heads, cfg.num_time_buckets)) \
            if cfg.num_time_buckets else None

    def project(self, x):
        """x [total, d] -> u [total, H * dv], q, k [total, H, dqk], v [total, H, dv] (f1 of the layer)."""
        cfg = self.cfg
        heads, dqk, dv = cfg.n_heads, cfg.attn_dim, cfg.hidden_dim
        uvqk = self.uvqk(self.input_norm(x))
        if cfg.qk_activation == "silu":
            uvqk = F.silu(uvqk)
        else:  # "linear": SiLU on U and V only
            uvqk = torch.cat([F.silu(uvqk[:, :2 * heads * dv]), uvqk[:, 2 * heads * dv:]], dim=-1)
        u, v, q, k = torch.split(uvqk, [heads * dv, heads * dv, heads * dqk, heads * dqk], dim=-1)
        return u, q.reshape(-1, heads, dqk), k.reshape(-1, heads, dqk), v.reshape(-1, heads, dv)

    def finish(self, x, av, u):
        """Residual output Y = X + f2(LN(AV) * U) from the attention output av [total, H, dv]."""
        y = self.attn_norm(av.reshape(av.shape[0], av.shape[1] * av.shape[2])) * u
        return x + self.dropout(self.out_proj(y))

    def forward(self, x, offsets, timestamps=None, num_targets=None):
        cfg = self.cfg
        u, q, k, v = self.project(x)
        av = hstu_attention(
            q, k, v, offsets, cfg.max_seq_len, cfg.alpha,
            num_targets=num_targets, causal=cfg.causal, local_window=cfg.local_window,
            global_prefix=cfg.global_prefix, timestamps=timestamps, pos_bias=self.pos_bias,
            time_bias=self.time_bias if timestamps is not None else None,
            backend=cfg.backend, check_inputs=False,
        )  # [total, H, dv]
        return self.finish(x, av, u)


def _select_tokens(offsets, keep):
    """Sub-jagged view of the tokens where keep [total] is True: (indices, new offsets)."""
    seq_index, _ = jagged_positions(offsets)
    idx = torch.nonzero(keep).squeeze(1)
    counts = torch.zeros(offsets.numel() - 1, dtype=torch.int64, device=offsets.device)
    counts.index_add_(0, seq_index[idx], torch.ones_like(idx))
    return idx, offsets_from_lengths(counts)


class HSTUEncoder(nn.Module):
    """Stacks of HSTU layers over jagged tokens: [total, d_model] -> [total, d_model]."""

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.cfg = cfg
        self.stacks = nn.ModuleList(
            nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.n_layers)) for _ in range(cfg.num_transducers)
        )
        self.mix = nn.Linear(cfg.num_transducers * cfg.d_model, cfg.d_model) if cfg.num_transducers > 1 else None
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.output_norm = nn.LayerNorm(cfg.d_model) if cfg.output_norm else nn.Identity()

    def forward(self, x, offsets, timestamps=None, num_targets=None, token_types=None):
        cfg = self.cfg
        if x.dim() != 2 or x.shape[-1] != cfg.d_model:
            raise JaggedInputError(f"x must be [total, d_model={cfg.d_model}], got {tuple(x.shape)}")
        validate_offsets(offsets, total=x.shape[0], max_seq_len=cfg.max_seq_len)
        batch = offsets.numel() - 1
        lengths = lengths_from_offsets(offsets)
        if num_targets is None:
            num_targets = torch.zeros(batch, dtype=torch.int64, device=x.device)
        elif num_targets.shape != (batch,) or bool((num_targets < 0).any()) or bool((num_targets > lengths).any()):
            raise JaggedInputError("num_targets must be [B] with 0 <= num_targets <= length")
        if timestamps is not None and timestamps.shape != (x.shape[0],):
            raise JaggedInputError(f"timestamps must be [total] = [{x.shape[0]}], got {tuple(timestamps.shape)}")
        x = self.input_dropout(x)
        if cfg.num_transducers == 1:
            return self.output_norm(self._run_stack(self.stacks[0], x, offsets, timestamps, num_targets))
        if token_types is None or token_types.shape != (x.shape[0],):
            raise JaggedInputError(f"num_transducers={cfg.num_transducers} needs token_types [total]")
        if x.shape[0] and (int(token_types.min()) < 0 or int(token_types.max()) >= cfg.num_transducers):
            raise JaggedInputError(f"token_types must lie in [0, {cfg.num_transducers})")
        return self.output_norm(self._mixture(x, offsets, timestamps, num_targets, token_types))

    def _run_stack(self, layers, x, offsets, timestamps, num_targets):
        cfg = self.cfg
        n_full = cfg.n_layers - cfg.truncated_layers
        for layer in layers[:n_full]:
            x = layer(x, offsets, timestamps, num_targets)
        if cfg.truncated_layers == 0:
            return x
        # attention truncation: keep the L' most recent history tokens and every target
        seq_index, positions = jagged_positions(offsets)
        history_len = lengths_from_offsets(offsets) - num_targets
        keep = positions >= (history_len - cfg.truncated_len).clamp(min=0)[seq_index]
        idx, sub_offsets = _select_tokens(offsets, keep)
        sub = x[idx]
        sub_ts = timestamps[idx] if timestamps is not None else None
        for layer in layers[n_full:]:
            sub = layer(sub, sub_offsets, sub_ts, num_targets)
        return x.index_copy(0, idx, sub)

    def _mixture(self, x, offsets, timestamps, num_targets, token_types):
        total = x.shape[0]
        seq_index, positions = jagged_positions(offsets)
        is_target = positions >= (lengths_from_offsets(offsets) - num_targets)[seq_index]
        token_index = torch.arange(total, device=x.device)
        seq_start = offsets[:-1][seq_index]
        states = []
        for stream, layers in enumerate(self.stacks):
            member = (token_types == stream) | is_target
            idx, sub_offsets = _select_tokens(offsets, member)
            sub_ts = timestamps[idx] if timestamps is not None else None
            out = self._run_stack(layers, x[idx], sub_offsets, sub_ts, num_targets)
            # the stream's state at each token = its output at the latest member token at or before it
            latest = torch.cummax(torch.where(member, token_index, -1), dim=0).values
            has_state = latest >= seq_start
            slot = torch.full((total,), -1, dtype=torch.int64, device=x.device)
            slot[idx] = torch.arange(idx.numel(), device=x.device)
            gathered = out[slot[latest.clamp(min=0)].clamp(min=0)] if idx.numel() else x.new_zeros(x.shape)
            states.append(gathered * has_state.unsqueeze(1).to(x.dtype))
        return self.mix(torch.cat(states, dim=-1))


class EventTokenizer(nn.Module):
    """ULTRA-HSTU input: one token per event = item embedding + action embedding.

    Item and action ids are 1-based; 0 is padding / "no action". Candidate (target) positions always get the
    zero action, so a label can never leak into the candidate's own token.
    """

    def __init__(self, num_items: int, num_actions: int, d_model: int):
        super().__init__()
        self.item_embedding = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        self.action_embedding = nn.Embedding(num_actions + 1, d_model, padding_idx=0)
        # unit-scale logits under weight tying: a LayerNormed hidden state has norm sqrt(d_model)
        for table in (self.item_embedding, self.action_embedding):
            nn.init.normal_(table.weight, std=d_model ** -0.5)
            table.weight.data[0].zero_()

    def forward(self, item_ids, action_ids, offsets, num_targets=None):
        if action_ids.shape != item_ids.shape:
            raise JaggedInputError("action_ids must have the shape of item_ids")
        if num_targets is not None:
            seq_index, positions = jagged_positions(offsets)
            is_target = positions >= (lengths_from_offsets(offsets) - num_targets)[seq_index]
            action_ids = action_ids.masked_fill(is_target, 0)
        return self.item_embedding(item_ids) + self.action_embedding(action_ids)


class HSTUNextItemModel(nn.Module):
    """Plain-PyTorch next-item model: item (+ action) tokens -> HSTU -> weight-tied scores over items.

    Used where Transformers4Rec is not installed (GPU machines, unit tests of the architecture).
    """

    def __init__(self, num_items: int, cfg: HSTUConfig, num_actions: int = 0):
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        self.tokenizer = EventTokenizer(num_items, max(num_actions, 1), cfg.d_model)
        self.encoder = HSTUEncoder(cfg)

    @property
    def num_actions(self) -> int:
        return self.tokenizer.action_embedding.num_embeddings - 1

    def constructor_args(self) -> dict:
        """JSON-safe sizes that, with cfg, rebuild this model (registry.model_to_dict)."""
        return {"num_items": int(self.num_items), "num_actions": int(self.num_actions)}

    @classmethod
    def from_constructor_args(cls, cfg: HSTUConfig, args: dict) -> "HSTUNextItemModel":
        return cls(args["num_items"], cfg, num_actions=args.get("num_actions", 0))

    def candidate_logits(self, hidden, item_ids):
        """hidden [C, d] (one row per candidate) . item embedding [C, d] -> [C]: item_scores for given items."""
        return (hidden * self.tokenizer.item_embedding.weight[item_ids]).sum(-1)

    def forward(self, item_ids, offsets, action_ids=None, timestamps=None):
        """item_ids [total] (1-based) -> hidden states [total, d_model]."""
        if action_ids is None:
            action_ids = torch.zeros_like(item_ids)
        tokens = self.tokenizer(item_ids, action_ids, offsets)
        return self.encoder(tokens, offsets, timestamps=timestamps)

    def item_scores(self, hidden):
        # weight tying; column 0 (padding) can never be recommended
        scores = hidden @ self.tokenizer.item_embedding.weight.t()
        scores[..., 0] = float("-inf")
        return scores


class HSTUSequenceModel(nn.Module):
    """The served form of a Transformers4Rec next-item model with HSTUBlock (t4r.hstu.next_item_servable).

    What the T4R model computes at inference, with plain modules: item embedding (the T4R item table) ->
    the input layers between the embedding and the block (T4R's projection and MLP blocks: Linear and
    activations) -> HSTU encoder (relative time bias when timestamps are given) -> the last position's state
    . item table (weight tying), divided by the task's softmax temperature when it has one. Item ids are the
    T4R (Categorify) ids; column 0 (padding) is never recommended.
    """

    LAYERS = {"Linear": nn.Linear, "ReLU": nn.ReLU, "GELU": nn.GELU, "SiLU": nn.SiLU, "Tanh": nn.Tanh,
              "LayerNorm": nn.LayerNorm}

    def __init__(self, cfg: HSTUConfig, num_embeddings: int, item_dim: int, layers: list[dict] | None = None,
                 temperature: float = 0.0, uses_timestamps: bool = False):
        super().__init__()
        self.cfg = cfg
        self.num_items = int(num_embeddings) - 1  # ids 1 .. num_embeddings - 1; 0 = padding
        self.item_embedding = nn.Embedding(num_embeddings, item_dim)
        self.layer_specs = [dict(spec) for spec in (layers or [])]
        self.input_layers = nn.Sequential(*(self._layer(spec) for spec in self.layer_specs))
        self.encoder = HSTUEncoder(cfg)
        self.temperature = float(temperature)
        self.uses_timestamps = bool(uses_timestamps)
        self.num_actions = 0

    @classmethod
    def _layer(cls, spec: dict) -> nn.Module:
        kind = spec.get("type")
        if kind not in cls.LAYERS:
            raise ValueError(f"unsupported input layer {kind!r}; supported: {sorted(cls.LAYERS)}")
        if kind == "Linear":
            return nn.Linear(spec["in_features"], spec["out_features"], bias=spec.get("bias", True))
        if kind == "LayerNorm":
            return nn.LayerNorm(spec["normalized_shape"], eps=spec.get("eps", 1e-5))
        return cls.LAYERS[kind]()

    def constructor_args(self) -> dict:
        return {"num_embeddings": self.num_items + 1, "item_dim": self.item_embedding.embedding_dim,
                "layers": self.layer_specs, "temperature": self.temperature,
                "uses_timestamps": self.uses_timestamps}

    @classmethod
    def from_constructor_args(cls, cfg: HSTUConfig, args: dict) -> "HSTUSequenceModel":
        return cls(cfg, **args)

    def forward(self, item_ids, offsets, action_ids=None, timestamps=None):
        """item_ids [total] -> hidden states [total, d_model] (action ids are not read)."""
        tokens = self.input_layers(self.item_embedding(item_ids))
        return self.encoder(tokens, offsets, timestamps=timestamps if self.uses_timestamps else None)

    def _scale(self, scores):
        return scores / self.temperature if self.temperature else scores

    def item_scores(self, hidden):
        scores = self._scale(hidden @ self.item_embedding.weight.t())
        scores[..., 0] = float("-inf")
        return scores

    def candidate_logits(self, hidden, item_ids):
        return self._scale((hidden * self.item_embedding.weight[item_ids]).sum(-1))
