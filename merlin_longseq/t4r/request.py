"""What every request-level ranking block shares in Transformers4Rec: the data contract, the block base, the
masked binary task and the loader (STCABlock and LONGERBlock are built on these).

One row per request (the data contract): user_id, request_time, hist_item_id / hist_action / hist_timestamp
(lists, most recent last, may be empty), cand_item_id (list, >= 1) and one list label column per task
(click, like, ...) aligned with cand_item_id.

    loader = request_dataloader(dataset, batch_size=64, label_columns=["click", "like"])
    block = STCABlock.from_schema(dataset.schema, d_model=64)      # or LONGERBlock.from_schema(...)
    head = tr.Head(block, [RequestBinaryClassificationTask("click"), RequestBinaryClassificationTask("like")])
    model = tr.Model(head)
    for inputs, targets in loader:
        loss = model(inputs, targets=targets, training=True)["loss"]

Why each piece exists (Transformers4Rec 23.12 / merlin-dataloader 23.8):
- RequestBlock: a request block reads the request columns from the raw input dict (there is no
  TabularSequenceFeatures in front of it: its embeddings are its own), scores every candidate with request
  level batching and returns one vector per candidate, [B, C, hidden], padded candidates as zeros.
- RequestBinaryClassificationTask: the stock BinaryClassificationTask scores every padded candidate
  slot and counts it as a negative in the loss and the metrics (padded labels are 0, indistinguishable
  from a real negative). This subclass keeps only the real candidates, using the mask the block records
  on each forward (as T4R's own masking modules record theirs).
- request_dataloader: the merlin Loader cannot pop ragged list columns as targets (KeyError on the
  label: they arrive as `name__values` / `name__offsets`), and T4R's padding pads every list to one
  length and truncates from the right, which would drop the MOST RECENT events. So the loader reads labels
  as ordinary list columns and a Loader.map step pads each list to its own batch maximum and moves the
  labels into the targets dict.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import NamedTuple, Sequence

import torch
import torchmetrics as tm
from merlin.schema import Schema as CoreSchema
from merlin.schema import Tags, TagSet
from transformers4rec.torch.block.base import BlockBase
from transformers4rec.torch.model.prediction_task import BinaryClassificationTask
from transformers4rec.torch.utils.data_utils import MerlinDataLoader
from transformers4rec.torch.utils.padding import pad_batch

from merlin_longseq.jagged import jagged_to_padded, lengths_from_padding, padded_to_jagged, padding_mask


@dataclasses.dataclass(frozen=True)
class RequestColumns:
    """Names of the request-grouped columns (the data contract's defaults)."""

    hist_item_id: str = "hist_item_id"
    hist_action: str = "hist_action"
    hist_timestamp: str = "hist_timestamp"
    request_time: str = "request_time"
    cand_item_id: str = "cand_item_id"
    user_id: str | None = "user_id"  # None: no user-id token

    @property
    def lists(self) -> list[str]:
        return [self.hist_item_id, self.hist_action, self.hist_timestamp, self.cand_item_id]


def _core_schema(schema):
    if schema is None or isinstance(schema, CoreSchema):
        return schema
    from transformers4rec.torch.utils.data_utils import to_core_schema  # a T4R (merlin_standard_lib) schema

    return to_core_schema(schema)


def _domain_max(schema: CoreSchema, column: str) -> int:
    if column not in schema.column_names:
        raise ValueError(f"column {column!r} is not in the schema (columns: {schema.column_names})")
    # read the property itself: int_domain is None whenever the dtype was not inferred (an empty first list)
    domain = schema[column].properties.get("domain") or {}
    if domain.get("max") is None:
        raise ValueError(f"column {column!r} has no int domain (properties['domain']['max']) in the schema; "
                         "pass num_items / num_actions / num_users explicitly")
    return int(domain["max"])


def columns_and_sizes(schema, columns: RequestColumns | None, use_user_id: bool, config_fields: dict):
    """The from_schema step every request block shares -> (core schema, columns, table sizes).

    Sizes come from the schema's int domains (num_items: both item columns; num_actions; num_users, 0 when the
    user column is absent or use_user_id is False); a size given in config_fields wins and is not returned.
    """
    schema = _core_schema(schema)
    columns = columns or RequestColumns()
    if not use_user_id or (columns.user_id is not None and columns.user_id not in schema.column_names):
        columns = dataclasses.replace(columns, user_id=None)
    missing = [c for c in [*columns.lists, columns.request_time] if c not in schema.column_names]
    if missing:
        raise ValueError(f"the schema lacks the request columns {missing} (columns: {schema.column_names})")
    sizes = {}
    if "num_items" not in config_fields:
        sizes["num_items"] = max(_domain_max(schema, columns.hist_item_id), _domain_max(schema, columns.cand_item_id))
    if "num_actions" not in config_fields:
        sizes["num_actions"] = _domain_max(schema, columns.hist_action)
    if "num_users" not in config_fields:
        sizes["num_users"] = _domain_max(schema, columns.user_id) if columns.user_id else 0
    return schema, columns, sizes


class RequestInputs(NamedTuple):
    """One batch of request rows, jagged (what the models take) plus the padded candidate layout."""

    hist_item_ids: torch.Tensor  # [N]
    hist_actions: torch.Tensor  # [N]
    hist_timestamps: torch.Tensor  # [N]
    hist_offsets: torch.Tensor  # [B + 1]
    request_time: torch.Tensor  # [B]
    user_ids: torch.Tensor | None  # [B]
    cand_item_ids: torch.Tensor  # [C]
    cand_offsets: torch.Tensor  # [B + 1]
    cand_lengths: torch.Tensor  # [B]
    cand_width: int  # the padded candidate width of the batch

    @property
    def history(self) -> dict:
        """The keyword arguments of a model's encode_user."""
        return dict(hist_item_ids=self.hist_item_ids, hist_actions=self.hist_actions,
                    hist_timestamps=self.hist_timestamps, hist_offsets=self.hist_offsets,
                    request_time=self.request_time, user_ids=self.user_ids)


class RequestBlock(BlockBase):
    """Base of the request blocks: request dict in, per-candidate vectors [B, C, hidden_dim] out.

    Subclasses set `columns` (RequestColumns), `schema` and `model`: a headless core model with
    encode_user(**history) -> user state and candidate_hidden(state, cand_item_ids, cand_offsets) -> [C, hidden]
    (STCA, LONGER, mean pooling). After every forward `candidate_mask` [B, C] (bool, True on real candidates)
    describes the output, which is what RequestBinaryClassificationTask reads.
    """

    candidate_mask: torch.Tensor | None = None

    @property
    def hidden_dim(self) -> int:
        return self.model.hidden_dim

    def forward(self, inputs, training=False, testing=False, **kwargs):
        request = self.request_inputs(inputs)
        state = self.model.encode_user(**request.history)  # the user side, once per request (RLB)
        hidden = self.model.candidate_hidden(state, request.cand_item_ids, request.cand_offsets)  # [C, hidden]
        self._record_mask(request)
        return jagged_to_padded(hidden, request.cand_offsets, request.cand_width)  # [B, C, hidden]

    @property
    def inputs(self):
        # tr.Model.input_schema reads body.inputs.schema
        return self

    @property
    def schema(self):
        """The request columns this block reads (a merlin Schema), when it was given one."""
        return self._core_schema

    @schema.setter
    def schema(self, value):
        value = _core_schema(value)
        if value is not None:
            wanted = [*self.columns.lists, self.columns.request_time] + ([self.columns.user_id] if self.columns.user_id
                                                                          else [])
            value = value.select_by_name([c for c in wanted if c in value.column_names])
        self._core_schema = value

    def output_size(self, input_size=None):
        return self.forward_output_size(input_size)

    def forward_output_size(self, input_size):
        return [None, None, self.hidden_dim]

    def _column(self, inputs, name):
        if name not in inputs:
            if f"{name}__values" in inputs:
                raise ValueError(f"{name} arrives ragged ({name}__values / __offsets): load the data with "
                                 "request_dataloader, which pads every list column")
            raise KeyError(f"{type(self).__name__} needs the input column {name!r}; got {sorted(inputs)}")
        return inputs[name]

    def _padded_list(self, inputs, name):
        values = self._column(inputs, name)
        if values.dim() != 2:
            raise ValueError(f"{name} must be a padded list column [batch, length], got shape {tuple(values.shape)}")
        if values.is_floating_point():
            raise TypeError(f"{name} must hold integers, got {values.dtype} (an NVTabular float pad value turns "
                            "list<int64> into list<double>: pass pad_value=0)")
        return values

    def history_inputs(self, inputs) -> dict:
        """The history columns of a padded request dict -> the keyword arguments of a model's encode_user."""
        cols = self.columns
        hist_items = self._padded_list(inputs, cols.hist_item_id)  # [B, L], 0 = padding
        history_lengths = lengths_from_padding(hist_items)
        hist_items, hist_offsets = padded_to_jagged(hist_items, history_lengths)
        hist_actions = padded_to_jagged(self._padded_list(inputs, cols.hist_action), history_lengths)[0]
        hist_times = padded_to_jagged(self._padded_list(inputs, cols.hist_timestamp), history_lengths)[0]
        request_time = self._column(inputs, cols.request_time).reshape(-1)  # [B] (the loader may give [B, 1])
        user_ids = self._column(inputs, cols.user_id).reshape(-1) if cols.user_id else None
        return dict(hist_item_ids=hist_items, hist_actions=hist_actions, hist_timestamps=hist_times,
                    hist_offsets=hist_offsets, request_time=request_time, user_ids=user_ids)

    def request_inputs(self, inputs) -> RequestInputs:
        """The padded request dict of request_dataloader -> jagged tensors (item id 0 = padding)."""
        history = self.history_inputs(inputs)
        cand_padded = self._padded_list(inputs, self.columns.cand_item_id)  # [B, C]
        cand_lengths = lengths_from_padding(cand_padded)
        cand_items, cand_offsets = padded_to_jagged(cand_padded, cand_lengths)
        return RequestInputs(**history, cand_item_ids=cand_items, cand_offsets=cand_offsets,
                             cand_lengths=cand_lengths, cand_width=cand_padded.shape[1])

    def _record_mask(self, request: RequestInputs):
        self.candidate_mask = padding_mask(request.cand_lengths, request.cand_width)


def _find_request_block(body) -> RequestBlock:
    found = [m for m in body.modules() if isinstance(m, RequestBlock)]
    if len(found) != 1:
        raise ValueError("RequestBinaryClassificationTask needs exactly one request block (STCABlock, LONGERBlock) "
                         f"in the body, found {len(found)}")
    return found[0]


class RequestBinaryClassificationTask(BinaryClassificationTask):
    """BinaryClassificationTask over the candidates of request-grouped rows, padded candidates left out.

    Training/testing: loss, predictions and labels cover the real candidates only (1-D, request order), so
    T4R's metrics and the Trainer's evaluation see no padding. Inference: [B, C] probabilities, padded
    candidates set to 0. Default metrics: fresh binary Precision, Recall, Accuracy and AUROC per task (the
    stock default shares one set of metric objects among all tasks) on probabilities, not rounded scores.
    """

    def __init__(self, target_name: str, task_name: str | None = None, task_block=None,
                 loss: torch.nn.Module | None = None, metrics: Sequence[tm.Metric] | None = None):
        if metrics is None:
            metrics = (tm.Precision(task="binary"), tm.Recall(task="binary"), tm.Accuracy(task="binary"),
                       tm.AUROC(task="binary"))
        super().__init__(target_name=target_name, task_name=task_name, task_block=task_block,
                         loss=loss if loss is not None else torch.nn.BCELoss(), metrics=metrics, summary_type=None)
        self.forward_to_prediction_fn = _identity
        self._request_block: tuple = ()  # a tuple, so the block is not registered as a second parent

    def build(self, body, input_size, inputs=None, device=None, task_block=None, pre=None):
        self._request_block = (_find_request_block(body),)
        return super().build(body, input_size, inputs=inputs, device=device, task_block=task_block, pre=pre)

    def forward(self, inputs, targets=None, training=False, testing=False, **kwargs):
        if not self._request_block:
            raise RuntimeError("RequestBinaryClassificationTask is not built: put it in a tr.Head with a request "
                               "block (STCABlock, LONGERBlock)")
        x = inputs
        if self.task_block:
            x = self.task_block(x)
        probabilities = self.pre(x)  # [B, C]
        mask = self._request_block[0].candidate_mask
        if mask is None or mask.shape != probabilities.shape:
            raise RuntimeError("the request block's candidate mask does not match these outputs; call the block "
                               "first")
        if not (training or testing):
            return probabilities * mask.to(probabilities.dtype)
        if targets is None:
            raise ValueError(f"task {self.task_name!r} needs the {self.target_name!r} labels in training/testing")
        if targets.shape != mask.shape:
            raise ValueError(f"labels {self.target_name!r} have shape {tuple(targets.shape)} but the candidates "
                             f"{tuple(mask.shape)}: a label list must be aligned with cand_item_id")
        predictions, labels = probabilities[mask], targets[mask].to(probabilities.dtype)
        return {"loss": self.loss(predictions, labels), "labels": labels, "predictions": predictions}

    def calculate_metrics(self, predictions, targets):
        # every metric here is binary: give all of them int labels (the stock code does it only for its defaults)
        return {self.metric_name(m): m(predictions, targets.int()) for m in self.metrics}


def _identity(x):
    return x


class RequestBatchPadding:
    """A merlin Loader map step: pads each list column to its own batch maximum, moves labels to targets.

    It runs inside the merlin Loader (Loader.map), so it applies both when the T4R MerlinDataLoader is
    iterated and when tr.Model.fit / evaluate iterate its `.dataset` directly.
    """

    def __init__(self, label_columns: Sequence[str]):
        self.label_columns = list(label_columns)

    def __call__(self, inputs, targets=None):
        widths = {}
        for key, offsets in inputs.items():
            if key.endswith("__offsets"):
                row_lengths = offsets.reshape(-1).diff()
                # width >= 1: a batch of empty histories still gives a [B, 1] padded tensor
                widths[key[: -len("__offsets")]] = max(1, int(row_lengths.max()) if row_lengths.numel() else 1)
        padded = pad_batch(inputs, widths)
        labels = {}
        for name in self.label_columns:
            if name not in padded:
                raise KeyError(f"label column {name!r} is not in the batch; got {sorted(padded)}")
            labels[name] = padded.pop(name)
        return padded, labels


def request_dataloader(paths_or_dataset, batch_size: int, label_columns: Sequence[str], *,
                       columns: RequestColumns | None = None, schema=None, shuffle: bool = False,
                       drop_last: bool = False, **loader_kwargs) -> MerlinDataLoader:
    """A Transformers4Rec MerlinDataLoader over request-grouped parquet: (inputs, {label: [B, C]}) batches.

    Lists come padded with 0 to their own batch maximum (history and candidates separately, nothing
    truncated); labels are aligned with cand_item_id. Works with a plain loop and with tr.Trainer
    (pass it as train_dataloader / eval_dataloader).
    """
    import merlin.io

    columns = columns or RequestColumns()
    if isinstance(paths_or_dataset, merlin.io.Dataset):
        dataset = copy.copy(paths_or_dataset)  # the loader rewrites the schema: leave the caller's alone
    else:
        dataset = merlin.io.Dataset(paths_or_dataset, engine="parquet")
    schema = _core_schema(schema) or dataset.schema
    # the merlin Loader pops TARGET-tagged columns as labels and fails on ragged lists: untag them here
    cleaned = []
    for col in schema:
        if col.name in label_columns and Tags.TARGET in col.tags:
            untagged = TagSet([t for t in col.tags if t != Tags.TARGET])
            col = dataclasses.replace(col, tags=untagged, dims=col.shape.as_tuple)
        cleaned.append(col)
    schema = CoreSchema(cleaned)
    lists = columns.lists + list(label_columns)
    scalars = [columns.request_time] + ([columns.user_id] if columns.user_id and columns.user_id in schema.column_names
                                         else [])
    missing = [c for c in lists + scalars if c not in schema.column_names]
    if missing:
        raise ValueError(f"the dataset lacks the columns {missing} (columns: {schema.column_names})")
    dataset.schema = schema
    loader = MerlinDataLoader(dataset, batch_size, max_sequence_length=None, cats=scalars, conts=[], labels=[],
                              lists=lists, shuffle=shuffle, drop_last=drop_last, schema=schema, **loader_kwargs)
    loader.dataset.map(RequestBatchPadding(label_columns))  # loader.dataset: the merlin Loader it wraps
    return loader


__all__ = [
    "RequestBatchPadding",
    "RequestBinaryClassificationTask",
    "RequestBlock",
    "RequestColumns",
    "RequestInputs",
    "columns_and_sizes",
    "request_dataloader",
]
