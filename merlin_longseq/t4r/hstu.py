"""HSTUBlock: HSTU / ULTRA-HSTU as a Transformers4Rec sequence block.

Swap it in for `tr.TransformerBlock` with one changed line:

    body = tr.SequentialBlock(
        input_module, tr.MLPBlock([64]),
        HSTUBlock(transformer_config, inputs=input_module),   # was tr.TransformerBlock(..., masking=...)
    )

Transformers4Rec hands a sequence block only the [B, S, D] embeddings, so:
  - padding comes from the masking module (`masking.mask_schema`, set by the input module for every batch):
    the block runs only on the positions the masking marks as tokens (one contiguous run per row; a causal
    masking that trains on recent windows, t4r/masking.py, marks a window), drops the rest before any compute
    and returns zeros there; the causal mask is its own;
  - timestamps (for HSTU's relative time bias) come from the raw batch: with `inputs=input_module` the block
    puts a forward pre-hook on the input module that records the timestamp column of each batch, as T4R's
    masking records mask_schema; the column is the schema's list column tagged Tags.TIME, or
    `timestamp_column=` by name;
  - the attention normaliser N is fixed when the block is built (never read from a batch, whose padded width
    T4R sets to its longest session), so a session scores the same alone and in any padded batch.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers4rec.torch.block.base import BlockBase
from transformers4rec.torch.masking import CausalLanguageModeling, MaskSequence

from merlin_longseq.jagged import JaggedInputError, offsets_from_lengths
from merlin_longseq.models.hstu import HSTUConfig, HSTUEncoder

# attribute names under which Transformers4Rec / Hugging Face configs keep the sizes. N: T4R's XLNetConfig.build
# drops total_seq_length, GPT2Config.build keeps it as n_positions; position-table sizes of BERT-like configs
# (max_position_embeddings = total_seq_length + 2, or HF's default 512) are not N and are not read.
_SIZE_ATTRIBUTES = {
    "d_model": ("d_model", "hidden_size", "n_embd"),
    "n_heads": ("n_head", "num_attention_heads"),
    "n_layers": ("n_layer", "num_hidden_layers"),
}
_LENGTH_ATTRIBUTES = ("total_seq_length", "max_seq_length", "n_positions")


def _first_attribute(config: Any, names) -> Any:
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


def session_length_of(config: Any) -> int | None:
    """The session length a config keeps (HSTUConfig.max_seq_len, or a T4R config's total_seq_length /
    max_seq_length / n_positions), or None (T4R's XLNetConfig.build drops total_seq_length)."""
    if isinstance(config, HSTUConfig):
        return config.max_seq_len
    length = _first_attribute(config, _LENGTH_ATTRIBUTES)
    return None if length is None else int(length)


def hstu_config_from(config: Any, max_seq_len: int | None = None, **overrides) -> HSTUConfig:
    """HSTUConfig from an HSTUConfig or any T4R transformer config (XLNetConfig, GPT2Config, ...).

    From a T4R config only the sizes are reused: d_model, heads, layers and, where the config keeps it, the
    session length (`session_length_of`) as max_seq_len. Dropout is NOT inherited (T4R's default 0.3 is far
    too high for HSTU): HSTUConfig's default applies unless `dropout=` is passed. An explicit `max_seq_len`
    wins; without one, a config that keeps no length is an error.
    """
    if isinstance(config, HSTUConfig):
        values = dict(config.__dict__)
    else:
        values = {}
        for field, names in _SIZE_ATTRIBUTES.items():
            found = _first_attribute(config, names)
            if found is None:
                raise ValueError(f"cannot read {field} from {type(config).__name__}; pass an HSTUConfig")
            values[field] = int(found)
    length = max_seq_len if max_seq_len is not None else session_length_of(config)
    if length is None:
        raise ValueError(f"{type(config).__name__} keeps no session length (T4R's XLNetConfig.build drops "
                         "total_seq_length): pass max_seq_len=, the attention normaliser N")
    values["max_seq_len"] = int(length)
    values.update(overrides)
    return HSTUConfig(**values)


def _time_columns(schema) -> list[str]:
    """Names of the list columns tagged Tags.TIME in a merlin schema."""
    from merlin.schema import Tags

    if schema is None:
        return []
    found = []
    for column in schema.select_by_tag(Tags.TIME):
        tags = set(column.tags)
        if getattr(column, "is_list", False) or Tags.LIST in tags or Tags.SEQUENCE in tags:
            found.append(column.name)
    return found


class HSTUBlock(BlockBase):
    """Transformers4Rec block running an HSTUEncoder over [B, S, D] embeddings.

    Args:
        config: an HSTUConfig (e.g. `HSTUConfig.build(d_model, n_head, n_layer, total_seq_length)`), or a T4R
            transformer config whose sizes are reused (d_model, heads, layers; see `hstu_config_from`).
        masking: the input module's masking (`input_module.masking`). Required (or given through `inputs`)
            and causal: T4R's clm masking or a subclass such as LengthExtrapolationMasking.
        max_seq_len: N of the attention normaliser. Default: the config's (HSTUConfig.max_seq_len or the T4R
            config's total_seq_length); for a config that keeps none (T4R's XLNetConfig), the padded session
            length of the input module, taken once when tr.SequentialBlock builds the block. Sessions longer
            than N are rejected.
        inputs: the input module (tr.TabularSequenceFeatures). Gives the masking and, for the relative time
            bias, the raw timestamp column of every batch (through a pre-hook on the module).
        timestamp_column: "auto" (default): the list column tagged Tags.TIME in `inputs.schema`, if there is
            exactly one (none: no time bias); a column name; or None for no time bias. Timestamps must be
            integers (seconds): the bias buckets log2 of time gaps. When a column is set, every batch must
            carry it (a model trained with the time bias would otherwise silently serve without it).
        **overrides: any HSTUConfig field (dropout, local_window, global_prefix, truncated_layers, backend, ...).
            `dropout` is HSTUConfig's default (0.1) unless passed here or set in an HSTUConfig; it is never
            taken from a T4R config.
    """

    def __init__(self, config: Any = None, masking: MaskSequence | None = None, max_seq_len: int | None = None,
                 *, inputs=None, timestamp_column: str | None = "auto", **overrides):
        super().__init__()
        if inputs is not None:
            if masking is not None and masking is not getattr(inputs, "masking", None):
                raise ValueError("masking= and inputs= disagree: pass inputs.masking, or only inputs=")
            masking = getattr(inputs, "masking", None)
        if masking is None:
            raise ValueError(
                "HSTUBlock needs the input module's causal masking, where it reads padding and targets: "
                "HSTUBlock(config, inputs=input_module) with TabularSequenceFeatures.from_schema(..., masking='clm')"
            )
        if not isinstance(masking, CausalLanguageModeling):
            raise ValueError(
                f"HSTUBlock is causal and needs causal (clm) masking; got {type(masking).__name__}"
            )
        if overrides.get("num_transducers", 1) != 1:
            raise ValueError("Transformers4Rec passes no token types; use HSTUEncoder for a mixture of transducers")
        self.masking = masking
        config = config if config is not None else HSTUConfig()
        # a config that keeps no length (T4R's XLNetConfig): N is taken once, in build(), from the input
        # module's padded session length; until then it is a placeholder that forward() refuses
        self._length_pending = max_seq_len is None and session_length_of(config) is None
        cfg = hstu_config_from(config, max_seq_len=1 if self._length_pending else max_seq_len, **overrides)
        if not cfg.causal:
            raise ValueError("HSTUBlock runs under causal masking; a bidirectional HSTUConfig (causal=False, "
                             "attn_type='bi') would let every position read its own target")
        self.hstu_config = cfg
        self.encoder = HSTUEncoder(cfg)
        self.timestamp_column = self._resolve_timestamp_column(inputs, timestamp_column, cfg)
        self._recorded_timestamps = None
        self._recorded = False
        if self.timestamp_column is not None:
            inputs.register_forward_pre_hook(self._record_timestamps)

    @staticmethod
    def _resolve_timestamp_column(inputs, timestamp_column, cfg: HSTUConfig) -> str | None:
        if timestamp_column is None:
            return None
        if timestamp_column == "auto":
            if inputs is None or cfg.num_time_buckets == 0:
                return None
            found = _time_columns(getattr(inputs, "schema", None))
            if len(found) > 1:
                raise ValueError(f"the input schema has several list columns tagged TIME {found}; "
                                 "name one with timestamp_column=")
            return found[0] if found else None
        if inputs is None:
            raise ValueError(f"timestamp_column={timestamp_column!r} needs inputs=input_module: T4R gives a "
                             "sequence block only embeddings, so the block reads timestamps from the input module")
        if cfg.num_time_buckets == 0:
            raise ValueError(f"timestamp_column={timestamp_column!r} but num_time_buckets=0 disables the time bias")
        names = getattr(getattr(inputs, "schema", None), "column_names", None)
        if names is not None and timestamp_column not in names:
            raise ValueError(f"timestamp_column={timestamp_column!r} is not in the input schema {list(names)}")
        return str(timestamp_column)

    def _record_timestamps(self, module, args):
        """Forward pre-hook on the input module: keep this batch's raw timestamp column for forward()."""
        raw = args[0] if args else None
        self._recorded = True
        self._recorded_timestamps = raw.get(self.timestamp_column) if isinstance(raw, dict) else None

    @property
    def d_model(self) -> int:
        return self.hstu_config.d_model

    @property
    def max_seq_len(self) -> int:
        """N, the attention normaliser (fixed once the block is built)."""
        return self.hstu_config.max_seq_len

    def build(self, input_size, schema=None, **kwargs):
        seq_len = input_size[1] if input_size is not None and len(input_size) == 3 else None
        if seq_len is not None and seq_len > 0:
            if self._length_pending:
                self.hstu_config.max_seq_len = int(seq_len)
                self._length_pending = False
            elif seq_len > self.max_seq_len:
                raise ValueError(f"the input module pads sessions to {seq_len} events but HSTU's max_seq_len (N) "
                                 f"is {self.max_seq_len}; build the config with total_seq_length >= {seq_len}")
        return super().build(input_size, schema=schema, **kwargs)

    def _token_mask(self, inputs: torch.Tensor) -> torch.Tensor:
        schema = self.masking.mask_schema
        if schema is None:
            raise ValueError("the masking has no mask_schema yet: run the block after its input module "
                             "(tr.SequentialBlock(input_module, ..., HSTUBlock(...)))")
        if schema.shape != inputs.shape[:2]:
            raise ValueError(f"masking schema {tuple(schema.shape)} does not match inputs {tuple(inputs.shape[:2])}")
        mask = schema.bool()
        # one contiguous run per row: right padding, or a recent window (LengthExtrapolationMasking); anything
        # else would be misread as one sequence
        lengths = mask.sum(dim=1)
        starts = torch.where(lengths > 0, mask.to(torch.int8).argmax(dim=1), torch.zeros_like(lengths))
        steps = torch.arange(mask.shape[1], device=mask.device)
        run = (steps >= starts[:, None]) & (steps < (starts + lengths)[:, None])
        if not torch.equal(mask, run):
            raise JaggedInputError("the masking schema must mark one contiguous run of tokens per row")
        return mask

    def _timestamps(self, explicit: torch.Tensor | None, shape) -> torch.Tensor | None:
        recorded, self._recorded_timestamps = self._recorded_timestamps, None
        was_recorded, self._recorded = self._recorded, False
        if explicit is not None:
            timestamps = explicit
        elif self.timestamp_column is None:
            return None
        else:
            timestamps = recorded
            if timestamps is None:
                where = "this batch has no column" if was_recorded else "the input module did not run before"
                raise ValueError(f"HSTUBlock reads timestamps from {self.timestamp_column!r} but {where}; "
                                 "pass timestamp_column=None to run without the time bias")
        if timestamps.is_floating_point():
            raise TypeError(f"timestamps must be integers (e.g. int64 seconds), got {timestamps.dtype}: the time "
                            "bias buckets log2 of time gaps, and T4R casts float columns to float32")
        if tuple(timestamps.shape) != tuple(shape):
            raise ValueError(f"timestamps {tuple(timestamps.shape)} do not match the embeddings {tuple(shape)}")
        return timestamps

    def forward(self, inputs: torch.Tensor, timestamps: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """inputs [B, S, d_model] -> [B, S, d_model]; timestamps [B, S] (integers) override the recorded ones."""
        if inputs.dim() != 3 or inputs.shape[-1] != self.d_model:
            raise ValueError(
                f"HSTUBlock expects [batch, seq, d_model={self.d_model}] embeddings, got {tuple(inputs.shape)}; "
                "put tr.MLPBlock([d_model]) before it when the input width differs"
            )
        if torch.jit.is_tracing():
            # the jagged conversion reads lengths from the masking as data-dependent sizes: a trace would keep
            # this batch's shapes and fail (or mislead) on others
            raise RuntimeError("HSTUBlock cannot be traced with torch.jit.trace (the trace would keep this batch's "
                               "session lengths); serve the trained model with "
                               "merlin_longseq.serving.export(repo, workflow, model, top_k=...) instead")
        if self._length_pending:
            raise ValueError("HSTUBlock's max_seq_len (N) is unknown: the config keeps no session length and the "
                             "block was not built after an input module; pass max_seq_len=")
        timestamps = self._timestamps(timestamps, inputs.shape[:2])
        mask = self._token_mask(inputs)
        values = inputs[mask]  # [total, D], row-major: every session's tokens in order
        offsets = offsets_from_lengths(mask.sum(dim=1))
        hidden = self.encoder(values, offsets, timestamps=timestamps[mask] if timestamps is not None else None)
        out = inputs.new_zeros(inputs.shape)
        out[mask] = hidden
        return out

    def forward_output_size(self, input_size):
        return torch.Size([*input_size[:-1], self.d_model])


# ---- the served form ------------------------------------------------------------------------------------------
_LAYER_TYPES = ("Linear", "ReLU", "GELU", "SiLU", "Tanh", "LayerNorm")


def _layer_specs(module) -> list[dict]:
    """Leaf modules of a T4R projection / MLP block as HSTUSequenceModel layer specs (dropout left out: eval)."""
    specs = []
    for leaf in module.modules():
        if any(True for _ in leaf.children()):
            continue
        kind = type(leaf).__name__
        if isinstance(leaf, torch.nn.Dropout) or kind == "Identity":
            continue
        if kind not in _LAYER_TYPES:
            raise ValueError(f"a {kind} between the embeddings and HSTUBlock has no served form (supported: "
                             f"{', '.join(_LAYER_TYPES)}, Dropout)")
        if kind == "Linear":
            specs.append({"type": kind, "in_features": leaf.in_features, "out_features": leaf.out_features,
                          "bias": leaf.bias is not None, "module": leaf})
        elif kind == "LayerNorm":
            specs.append({"type": kind, "normalized_shape": list(leaf.normalized_shape), "eps": leaf.eps,
                          "module": leaf})
        else:
            specs.append({"type": kind})
    return specs


def next_item_servable(model, check: bool = True):
    """The served form (HSTUSequenceModel, eval mode) of a trained T4R next-item model around HSTUBlock.

    Supported: tr.Model(tr.Head(tr.SequentialBlock(TabularSequenceFeatures with the item id as its one
    categorical feature (timestamps may feed the block's time bias), Linear / activation blocks such as
    tr.MLPBlock, HSTUBlock), NextItemPredictionTask(weight_tying=True))). check=True scores a few sessions with
    both models and refuses the export when they differ, so an unsupported part is never served silently.
    """
    from transformers4rec.torch.features.sequence import TabularSequenceFeatures
    from transformers4rec.torch.model.prediction_task import NextItemPredictionTask

    from merlin_longseq.models.hstu import HSTUSequenceModel

    heads = list(getattr(model, "heads", []))
    tasks = [t for head in heads for t in head.prediction_task_dict.values()]
    if len(heads) != 1 or len(tasks) != 1 or not isinstance(tasks[0], NextItemPredictionTask):
        raise ValueError("a served next-item model needs one head with one NextItemPredictionTask")
    task, body = tasks[0], heads[0].body
    stages = list(body)
    blocks = [m for m in stages if isinstance(m, HSTUBlock)]
    if len(blocks) != 1 or stages[-1] is not blocks[0] or not isinstance(stages[0], TabularSequenceFeatures):
        raise ValueError("expected tr.SequentialBlock(TabularSequenceFeatures, [MLP blocks], HSTUBlock)")
    inputs, block = stages[0], blocks[0]
    if "categorical_module" not in inputs.to_merge or "continuous_module" in inputs.to_merge:
        raise ValueError(f"the input module merges {sorted(inputs.to_merge)}: only the item id (one categorical "
                         "feature) has a served form; continuous inputs are not supported")
    tables = inputs.to_merge["categorical_module"].embedding_tables
    if len(tables) != 1:
        raise ValueError(f"the input module embeds {sorted(tables)}: only the item id has a served form")
    item_column, table = next(iter(tables.items()))
    pre = getattr(task.pre, "module", task.pre)  # T4R wraps it in a Block
    if getattr(task, "task_block", None) is not None or not getattr(pre, "weight_tying", False):
        raise ValueError("a served next-item model needs NextItemPredictionTask(weight_tying=True) with no "
                         "task block")
    specs = _layer_specs(inputs.projection_module) if inputs.projection_module is not None else []
    for stage in stages[1:-1]:
        specs += _layer_specs(stage)
    modules = [spec.pop("module", None) for spec in specs]
    served = HSTUSequenceModel(block.hstu_config, table.num_embeddings, table.embedding_dim, specs,
                               temperature=float(pre.softmax_temperature or 0.0),
                               uses_timestamps=block.timestamp_column is not None)
    with torch.no_grad():
        served.item_embedding.weight.copy_(table.weight)
        for target, source in zip(served.input_layers, modules):
            if source is not None:
                target.load_state_dict(source.state_dict())
        served.encoder.load_state_dict(block.encoder.state_dict())
    served.eval()
    served.item_column, served.timestamp_column = item_column, block.timestamp_column
    if check:
        _check_same_scores(model, served, item_column, block.timestamp_column)
    return served


def _check_same_scores(model, served, item_column: str, timestamp_column: str | None) -> None:
    """Score three short sessions with the T4R model and its served form; refuse when they differ."""
    g = torch.Generator().manual_seed(0)
    width = min(6, served.cfg.max_seq_len)
    lengths = [width, max(1, width // 2), 1]
    items = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, length in enumerate(lengths):
        items[row, :length] = torch.randint(1, served.num_items + 1, (length,), generator=g)
    batch = {item_column: items}
    times = None
    if timestamp_column is not None:
        times = torch.cumsum(torch.randint(1, 10_000, items.shape, generator=g), dim=1) * (items != 0)
        batch[timestamp_column] = times
    was_training, top_k = model.training, getattr(model, "top_k", None)
    model.eval()
    model.top_k = None  # full scores, not the sorted top k
    try:
        with torch.no_grad():
            try:
                expected = model({k: v.clone() for k, v in batch.items()})
            except (KeyError, ValueError) as err:  # it reads an input the served form does not have
                raise ValueError(f"this T4R model reads more than the item ids and timestamps ({err}); only "
                                 "those have a served form") from None
            mask = items != 0
            offsets = offsets_from_lengths(mask.sum(1))
            hidden = served(items[mask], offsets, timestamps=times[mask] if times is not None else None)
            got = served.item_scores(hidden[offsets[1:] - 1])
    finally:
        model.train(was_training)
        model.top_k = top_k
    if expected.shape != got.shape or not torch.allclose(expected[:, 1:], got[:, 1:], atol=1e-4, rtol=1e-4):
        raise ValueError("the served form of this T4R model does not reproduce its scores (a part between the "
                         "embeddings and HSTUBlock, or of the task, has no served form); it cannot be exported")
