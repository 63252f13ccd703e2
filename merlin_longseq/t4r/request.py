"""The request-level ranking architectures in Transformers4Rec: one block class, the masked task, the loader.

One row per request (the request core's contract, merlin_longseq.request.RequestColumns): user_id,
request_time, hist_item_id / hist_action / hist_timestamp (lists, oldest first, may be empty), cand_item_id
(list, >= 1) and one list label column per task (click, like, ...) aligned with cand_item_id.

    loader = request_dataloader(dataset, batch_size=64, label_columns=["click", "like"])
    block = STCABlock.from_schema(dataset.schema, d_model=64)     # or LONGERBlock / MeanPoolBlock / DINBlock
    model = tr.Model(tr.Head(block, [RequestBinaryClassificationTask("click"),
                                     RequestBinaryClassificationTask("like")]))

Why each piece exists (Transformers4Rec 23.12 / merlin-dataloader 23.8):
- RequestBlock: a request block reads the request columns from the raw input dict (there is no
  TabularSequenceFeatures in front of it: its embeddings are its own), builds the one RequestBatch, checks it
  with the one validator (the same rules serving applies), runs the architecture's model with request level
  batching and returns one vector per candidate, [B, C, hidden], padded candidates as zeros. There is one
  class: STCABlock, LONGERBlock, MeanPoolBlock and DINBlock are its named forms, one per ranking entry of
  merlin_longseq.registry (a new architecture gets its block from its registry entry).
- RequestBinaryClassificationTask: the stock BinaryClassificationTask scores every padded candidate
  slot and counts it as a negative in the loss and the metrics (padded labels are 0, indistinguishable
  from a real negative). This subclass keeps only the real candidates, using the mask the block records
  on each forward (as T4R's own masking modules record theirs).
- request_dataloader / RequestDataLoader: the merlin Loader cannot pop ragged list columns as targets
  (KeyError on the label: they arrive as `name__values` / `name__offsets`), and T4R's padding pads every list
  to one length and truncates from the right, which would drop the MOST RECENT events. So the loader reads
  labels as ordinary list columns and a Loader.map step checks that every label list has one value per
  candidate, pads each list to its own batch maximum and moves the labels into the targets dict. An optional
  `transform` (e.g. extrapolation.RecentHistoryWindow) runs after it, on every batch of every epoch.
  RequestDataLoader is registered as the T4R data loader engine "merlin_request", so the stock
  `tr.Trainer(model, args, schema=schema, train_dataset_or_path=...)` builds it when
  `T4RecTrainingArguments(data_loader_engine="merlin_request")` (T4R's default engine, "merlin", fails on
  request data with `KeyError: '<label>'`, the untagging problem above).
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torchmetrics as tm
from merlin.core.dispatch import is_list_dtype
from merlin.dataloader.torch import Loader
from merlin.schema import Schema as CoreSchema
from merlin.schema import Tags, TagSet
from transformers4rec.torch.block.base import BlockBase
from transformers4rec.torch.model.prediction_task import BinaryClassificationTask
from transformers4rec.torch.utils.data_utils import DLDataLoader, T4RecDataLoader, dataloader_registry
from transformers4rec.torch.utils.padding import pad_batch

from merlin_longseq import registry
from merlin_longseq.jagged import jagged_to_padded, lengths_from_padding, padded_to_jagged, padding_mask
from merlin_longseq.request import RequestBatch, RequestColumns, RequestError, check_label_lengths, validate_request


def _core_schema(schema):
    if schema is None or isinstance(schema, CoreSchema):
        return schema
    from transformers4rec.torch.utils.data_utils import to_core_schema  # a T4R (merlin_standard_lib) schema

    return to_core_schema(schema)


def _domain_max(schema: CoreSchema, column: str) -> int | None:
    # read the property itself: int_domain is None whenever the dtype was not inferred (an empty first list)
    domain = schema[column].properties.get("domain") or {}
    return None if domain.get("max") is None else int(domain["max"])


def columns_and_sizes(schema, columns: RequestColumns | None, use_user_id: bool, config_fields: dict):
    """The from_schema step of every request block -> (core schema, columns, table sizes).

    Sizes come from the schema's int domains (num_items: both item columns; num_actions; num_users, 0 when the
    user column is absent or use_user_id is False); a size given in config_fields wins and is not returned.
    A user column without an int domain (RequestGrouping writes user_id raw: raw ids can be any size, so no
    embedding table is sized from them) also gives num_users = 0, with a warning that says how to get a user
    token (Categorify user_id after the grouping, or pass num_users=). An event log without actions has no
    hist_action column: num_actions = 0 and the block reads every action as 0.
    """
    schema = _core_schema(schema)
    columns = columns or RequestColumns()
    if not use_user_id or (columns.user_id is not None and columns.user_id not in schema.column_names):
        columns = columns.without("user_id")
    if (columns.user_id is not None and "num_users" not in config_fields
            and _domain_max(schema, columns.user_id) is None):
        warnings.warn(f"the schema's {columns.user_id!r} column has no int domain (raw ids, as RequestGrouping "
                      "writes them): the block gets no user token (num_users=0). Categorify the user column "
                      "after the grouping to learn one, pass num_users=, or use_user_id=False to silence this",
                      UserWarning, stacklevel=3)
        columns = columns.without("user_id")
    if columns.hist_action is not None and columns.hist_action not in schema.column_names:
        columns = columns.without("hist_action")  # an event log without actions: every action is 0
    missing = [c for c in [columns.hist_item_id, columns.cand_item_id, columns.hist_timestamp,
                           columns.request_time] if c is None or c not in schema.column_names]
    if missing:
        raise ValueError(f"the schema lacks the request columns {missing} (columns: {schema.column_names})")

    def size(field, column_names, fallback=None):
        if field in config_fields:
            return
        found = [_domain_max(schema, c) for c in column_names if c]
        if any(v is None for v in found) or not found:
            if fallback is not None:
                sizes[field] = fallback
                return
            raise ValueError(f"column(s) {column_names} have no int domain (properties['domain']['max']) in the "
                             f"schema; pass {field}= explicitly (or Categorify the column in the workflow)")
        sizes[field] = max(found)

    sizes: dict = {}
    size("num_items", [columns.hist_item_id, columns.cand_item_id])
    size("num_actions", [columns.hist_action] if columns.hist_action else [], fallback=0)
    size("num_users", [columns.user_id] if columns.user_id else [], fallback=0)
    return schema, columns, sizes


_FROM_COLUMNS = object()  # RequestBlock's default user_column: the user column of its columns


class RequestBlock(BlockBase):
    """A registered ranking architecture as a Transformers4Rec body: request dict in, [B, C, hidden] out.

    Args:
        config: the architecture's config (STCAConfig, LONGERConfig, ...); the model is built headless, the
            heads are the T4R prediction tasks (RequestBinaryClassificationTask).
        columns: request column names (RequestColumns defaults).
        schema: the request schema (what tr.Model.input_schema reports).
        user_column: the input column of the requests' user ids, recorded for per-user metrics (GAUC) even
            when the model does not read users; default columns.user_id ("user_id"). None: not recorded.
    After every forward `candidate_mask` [B, C] (bool, True on real candidates) describes the output and
    `request_user_ids` [B] holds the batch's user ids (None when the inputs have no user column); both are
    what RequestBinaryClassificationTask reads. Training-only behaviour (the length sampler) follows the
    module's train()/eval() mode.
    """

    arch: str = ""  # the registry name; set by the named subclasses (STCABlock, ...)

    def __init__(self, config, columns: RequestColumns | None = None, schema=None, arch: str | None = None,
                 user_column=_FROM_COLUMNS):
        super().__init__()
        spec = self._spec(config, arch)
        columns = columns or RequestColumns()
        self.user_column = columns.user_id if user_column is _FROM_COLUMNS else user_column
        if config.uses_users and columns.user_id is None:
            raise ValueError(f"this {spec.name} config reads user ids (num_users={config.num_users}), but "
                             "columns.user_id is None")
        if not config.uses_users:
            columns = columns.without("user_id")  # nothing reads it: do not load it
        self.arch = spec.name
        self.columns = columns
        self.config = config.headless()  # the T4R tasks are the heads
        self.model = spec.model_class(self.config)
        self.candidate_mask = None
        self.request_user_ids = None
        self.schema = schema

    @classmethod
    def _spec(cls, config, arch):
        name = arch or cls.arch
        if name:
            spec = registry.get(name)
            if not isinstance(config, spec.config_class):
                raise TypeError(f"{spec.name} needs a {spec.config}, got {type(config).__name__}")
            return spec
        for spec in registry.ARCHITECTURES.values():  # RequestBlock(config): the architecture of the config
            if spec.kind == registry.RANKING and type(config) is spec.config_class:
                return spec
        raise TypeError(f"{type(config).__name__} is not the config of a registered ranking architecture")

    @classmethod
    def from_schema(cls, schema, columns: RequestColumns | None = None, use_user_id: bool = True,
                    arch: str | None = None, **config_fields) -> "RequestBlock":
        """Sizes from the schema's int domains (num_items: both item columns; num_actions; num_users).

        config_fields: any field of the architecture's config (d_model, n_layers, length_sampler, ...); an
        explicit num_items, num_actions or num_users wins over the schema. Without a user column (or with
        use_user_id=False) num_users is 0.
        """
        spec = registry.get(arch or cls.arch) if (arch or cls.arch) else None
        if spec is None:
            raise ValueError(f"pass arch= (one of {registry.names(registry.RANKING)}) or use a named block")
        user_column = (columns or RequestColumns()).user_id  # kept for GAUC even when the model reads no users
        schema, columns, sizes = columns_and_sizes(schema, columns, use_user_id, config_fields)
        config = spec.config_class(**sizes, **config_fields)
        return cls(config.headless(), columns, schema=schema, arch=spec.name, user_column=user_column)

    # ---- T4R plumbing ---------------------------------------------------------------------------------
    @property
    def hidden_dim(self) -> int:
        return self.model.hidden_dim

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
            value = value.select_by_name([c for c in self.columns.all if c in value.column_names])
        self._core_schema = value

    def output_size(self, input_size=None):
        return self.forward_output_size(input_size)

    def forward_output_size(self, input_size):
        return [None, None, self.hidden_dim]

    # ---- forward --------------------------------------------------------------------------------------
    def request_batch(self, inputs, targets=None) -> RequestBatch:
        """The padded request dict of request_dataloader -> the checked jagged RequestBatch."""
        batch = RequestBatch.from_padded(inputs, self.columns, targets)
        if batch.hist_actions is None:  # a log without actions: every event has the "unknown" action 0
            batch = dataclasses.replace(batch, hist_actions=torch.zeros_like(batch.hist_item_ids))
        validate_request(batch, dataclasses.replace(self.model.limits, needs_actions=False))
        return batch

    def forward(self, inputs, training=False, testing=False, **kwargs):
        if torch.jit.is_tracing():
            # the padded <-> jagged conversion reads lengths as Python ints, which a trace would freeze into a
            # graph that silently fails on other shapes: refuse here instead
            raise RuntimeError(f"{type(self).__name__} cannot be traced with torch.jit.trace (the trace would keep "
                               "this batch's lengths); serve the trained model with "
                               "merlin_longseq.serving.export(repo, workflow, model) instead")
        batch = self.request_batch(inputs)
        state = self.model.encode_user(**batch.history)  # the user side, once per request (RLB)
        hidden = self.model.candidate_hidden(state, batch.cand_item_ids, batch.cand_offsets)  # [C, hidden]
        width = inputs[self.columns.cand_item_id].shape[1]  # the task's labels are padded to this width
        self.candidate_mask = padding_mask(batch.candidate_counts, width)
        self._record_user_ids(inputs)
        return jagged_to_padded(hidden, batch.cand_offsets, width)  # [B, C, hidden]

    def _record_user_ids(self, inputs):
        users = inputs.get(self.user_column) if self.user_column else None
        self.request_user_ids = None if users is None else users.reshape(-1)

    # ---- serving halves: encode a batch of requests once, score candidates against it as often as needed
    def encode_user(self, inputs):
        """The history columns of a padded request dict [B, ...] -> the model's user state of those B requests
        (candidate columns, if present, are not read)."""
        columns = self.columns
        if columns.cand_item_id not in inputs:
            any_list = inputs[columns.hist_item_id]
            inputs = {**inputs, columns.cand_item_id: torch.ones(any_list.shape[0], 1, dtype=any_list.dtype,
                                                                 device=any_list.device)}
        return self.model.encode_user(**self.request_batch(inputs).history)

    def score_candidates(self, state, cand_item_id: torch.Tensor) -> torch.Tensor:
        """Padded candidates [B, C] (0 = padding) of the encoded requests -> [B, C, hidden]; sets
        candidate_mask like forward, so the T4R tasks can be applied to the result."""
        requests = getattr(state, "num_requests", None)
        if cand_item_id.dim() != 2 or (requests is not None and cand_item_id.shape[0] != requests):
            raise ValueError(f"cand_item_id must be [B, C] with B = {requests} encoded requests, got "
                             f"{tuple(cand_item_id.shape)}")
        lengths = lengths_from_padding(cand_item_id)
        cand_items, cand_offsets = padded_to_jagged(cand_item_id, lengths)
        hidden = self.model.candidate_hidden(state, cand_items, cand_offsets)
        self.candidate_mask = padding_mask(lengths, cand_item_id.shape[1])
        self.request_user_ids = None  # the encoded state does not say whose it is
        return jagged_to_padded(hidden, cand_offsets, cand_item_id.shape[1])


def _named_block(spec: registry.Architecture) -> type:
    """STCABlock, LONGERBlock, ...: RequestBlock bound to one registry entry (picklable by module path)."""
    cls = type(spec.block, (RequestBlock,), {
        "arch": spec.name, "__module__": __name__,
        "__doc__": f"RequestBlock for {spec.name!r}: {spec.summary}. See RequestBlock."})
    cls.__qualname__ = spec.block
    return cls


# one named block per ranking registry entry, as module attributes (tr.Model.save pickles them by name)
BLOCKS: dict[str, type] = {spec.name: _named_block(spec) for spec in registry.ARCHITECTURES.values()
                           if spec.kind == registry.RANKING}
globals().update({cls.__name__: cls for cls in BLOCKS.values()})


def block_for(arch: str) -> type:
    """The T4R block class of a registered ranking architecture."""
    if arch not in BLOCKS:
        raise ValueError(f"{arch!r} has no request block; ranking architectures: {sorted(BLOCKS)}")
    return BLOCKS[arch]


def find_request_block(body) -> RequestBlock:
    found = [m for m in body.modules() if isinstance(m, RequestBlock)]
    if len(found) != 1:
        raise ValueError("a request model needs exactly one request block (STCABlock, LONGERBlock, ...) in its "
                         f"body, found {len(found)}")
    return found[0]


class RequestBinaryClassificationTask(BinaryClassificationTask):
    """BinaryClassificationTask over the candidates of request-grouped rows, padded candidates left out.

    Training/testing: loss, predictions and labels cover the real candidates only (1-D, request order), so
    T4R's metrics and the Trainer's evaluation see no padding. Inference: [B, C] probabilities, padded
    candidates set to 0. Default metrics: fresh binary Precision, Recall, Accuracy and AUROC per task (the
    stock default shares one set of metric objects among all tasks) on probabilities, not rounded scores.
    Per-user metrics (merlin_longseq.t4r.metrics.GAUC, any metric with `needs_groups`) also get the user id of
    every real candidate: T4R's metric call passes predictions and labels only, so the task keeps the user ids
    of its last forward beside those predictions and hands them over when the same predictions come back to
    calculate_metrics (tr.Trainer.evaluate, tr.Model.evaluate and tr.Model.fit call it right after forward).
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
        self._last_output: tuple = ()  # (predictions, user id per prediction or None) of the last forward

    def build(self, body, input_size, inputs=None, device=None, task_block=None, pre=None):
        self._request_block = (find_request_block(body),)
        return super().build(body, input_size, inputs=inputs, device=device, task_block=task_block, pre=pre)

    def forward(self, inputs, targets=None, training=False, testing=False, **kwargs):
        if not self._request_block:
            raise RuntimeError("RequestBinaryClassificationTask is not built: put it in a tr.Head with a request "
                               "block (STCABlock, LONGERBlock, ...)")
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
            raise RequestError(f"labels {self.target_name!r} have shape {tuple(targets.shape)} but the candidates "
                               f"{tuple(mask.shape)}: a label list must be aligned with cand_item_id")
        predictions, labels = probabilities[mask], targets[mask].to(probabilities.dtype)
        users = self._request_block[0].request_user_ids
        groups = None if users is None else users.reshape(-1, 1).expand_as(mask)[mask]
        self._last_output = (predictions.detach(), groups)
        return {"loss": self.loss(predictions, labels), "labels": labels, "predictions": predictions}

    def calculate_metrics(self, predictions, targets):
        # every metric here is binary: give all of them int labels (the stock code does it only for its defaults)
        targets = targets.int()
        return {self.metric_name(m): (m(predictions, targets, self._groups_of(predictions, m))
                                      if getattr(m, "needs_groups", False) else m(predictions, targets))
                for m in self.metrics}

    def _groups_of(self, predictions, metric) -> torch.Tensor:
        """The user ids of `predictions`, which must be the predictions of this task's last forward."""
        last = self._last_output
        # detach() and T4R's nested_detach share storage: the same data pointer means the same batch
        if not last or last[0].shape != predictions.shape or last[0].data_ptr() != predictions.data_ptr():
            raise RuntimeError(f"{type(metric).__name__} needs the user ids of the predictions it gets: call "
                               "calculate_metrics with the predictions of the task's last forward (as tr.Trainer "
                               "and tr.Model.evaluate / fit do)")
        if last[1] is None:
            column = self._request_block[0].user_column
            where = (f"the batch has no {column!r} column (request_dataloader loads it when the data has it)"
                     if column else "the request block records none (user_column=None)")
            raise ValueError(f"{type(metric).__name__} needs the user id of every request, but {where}")
        return last[1]

    def head_linear(self) -> torch.nn.Linear:
        """The Linear(hidden, 1) under the sigmoid: what a served model computes as this task's logit."""
        if getattr(self, "task_block", None) is not None:
            raise ValueError(f"task {self.task_name!r} has a task_block; only the plain Linear + sigmoid head "
                             "folds into a served model")
        modules = list(self.pre.modules()) if getattr(self, "pre", None) is not None else []
        linears = [m for m in modules if isinstance(m, torch.nn.Linear)]
        if len(linears) != 1 or linears[0].out_features != 1 or not any(isinstance(m, torch.nn.Sigmoid)
                                                                        for m in modules):
            raise ValueError(f"task {self.task_name!r}: expected one Linear(hidden, 1) followed by a sigmoid, "
                             f"found {[type(m).__name__ for m in modules]}")
        return linears[0]


def _identity(x):
    return x


def headed_core_model(model, labels: Sequence[str] | None = None):
    """(core model with one logit head per task, in eval mode, task names) for a trained request tr.Model.

    The core model computes the T4R model's pre-sigmoid scores: the request block's model with the task
    heads' Linear(hidden, 1) weights stacked into its own task head (row t = task t). labels: the task
    order (target names); default: the model's own order.
    """
    core = find_request_block(model).model
    tasks = {task.target_name: task for head in model.heads for task in head.prediction_task_dict.values()}
    names = tuple(labels) if labels else tuple(tasks)
    missing = [name for name in names if name not in tasks]
    if missing or not names:
        raise ValueError(f"the model has no task for label(s) {list(missing or names)}; its tasks: {sorted(tasks)}")
    linears = []
    for name in names:
        if not isinstance(tasks[name], RequestBinaryClassificationTask):
            raise ValueError(f"task {name!r} is a {type(tasks[name]).__name__}; a served request model needs "
                             "RequestBinaryClassificationTask heads")
        linears.append(tasks[name].head_linear())
    spec = registry.of_model(core)
    headed = spec.model_class(core.cfg.with_tasks(names))
    result = headed.load_state_dict(core.state_dict(), strict=False)
    head = headed.task_head
    head_params = {id(p) for p in head.parameters()}
    head_keys = {name for name, p in headed.named_parameters() if id(p) in head_params}
    if result.unexpected_keys or set(result.missing_keys) != head_keys:  # only the heads may be new
        raise RuntimeError(f"headed copy of {type(core).__name__} does not line up with the trained one: missing "
                           f"{result.missing_keys}, unexpected {result.unexpected_keys}")
    with torch.no_grad():
        head.weight.copy_(torch.cat([linear.weight for linear in linears]))
        head.bias.copy_(torch.cat([linear.bias if linear.bias is not None else torch.zeros(1)
                                   for linear in linears]))
    return headed.eval(), names


class RequestBatchPadding:
    """A merlin Loader map step: checks label lengths, pads each list column to its own batch maximum, moves
    labels to targets.

    It runs inside the merlin Loader (Loader.map), so it applies both when RequestDataLoader is iterated and
    when tr.Model.fit / evaluate iterate its `.dataset` directly.
    """

    def __init__(self, label_columns: Sequence[str], candidate_column: str = "cand_item_id"):
        self.label_columns = list(label_columns)
        self.candidate_column = candidate_column

    def __call__(self, inputs, targets=None):
        widths, lengths = {}, {}
        for key in list(inputs):
            if key.endswith("__offsets"):
                name = key[: -len("__offsets")]
                row_lengths = inputs[key].reshape(-1).diff()
                lengths[name] = row_lengths
                # width >= 1: a batch of empty histories still gives a [B, 1] padded tensor
                widths[name] = max(1, int(row_lengths.max()) if row_lengths.numel() else 1)
        if self.candidate_column in lengths:
            check_label_lengths(lengths[self.candidate_column].cpu().numpy(),
                                {n: lengths[n].cpu().numpy() for n in self.label_columns if n in lengths})
        padded = pad_batch(inputs, widths)
        labels = {}
        for name in self.label_columns:
            if name not in padded:
                raise KeyError(f"label column {name!r} is not in the batch; got {sorted(padded)}")
            labels[name] = padded.pop(name)
        return padded, labels


class _RequestLoader(Loader):
    """The merlin torch Loader, able to load a chunk in which a list column is empty in every row.

    merlin-dataloader 23.8 converts a chunk's list columns with `leaves[0]` on the flattened values, which
    raises `KeyError: 0` when every list of the column is empty: a partition of requests that all have empty
    histories (a day of new users). Here such a column gets one placeholder value in its first row for the
    conversion, removed again from the tensors. (pandas chunks, the CPU path; cudf chunks are left as they are.)
    """

    def _convert_df_to_tensors(self, gdf):
        emptied = []
        if isinstance(gdf, pd.DataFrame) and len(gdf):
            for name in gdf.columns:
                column = gdf[name]
                if column.dtype != object or not is_list_dtype(column) or len(column.iat[0]):
                    continue  # a scalar column, or a list column with a value in its first row
                if int(column.map(len).sum()) == 0:
                    column = column.copy()
                    column.iat[0] = np.zeros(1, dtype=self._element_dtype(name))
                    gdf[name] = column
                    emptied.append(name)
        tensors = super()._convert_df_to_tensors(gdf)
        for name in emptied:
            values, offsets = tensors[name]
            tensors[name] = (values[:0], offsets * 0)  # numpy arrays here (the Loader makes tensors later)
        return tensors

    def _element_dtype(self, name):
        schema = self.input_schema
        if name in schema.column_names and schema[name].dtype.element_type.value != "unknown":
            return schema[name].dtype.to_numpy
        return np.int64  # request lists hold integer ids, actions and times


def _first_item(batch):
    return batch[0]  # the merlin Loader yields whole batches: the torch DataLoader around it collates one item


@dataloader_registry.register_with_multiple_names("merlin_request")
class RequestDataLoader(T4RecDataLoader, DLDataLoader):
    """A Transformers4Rec data loader over request-grouped parquet: (inputs, {label: [B, C]}) batches.

    Lists come padded with 0 to their own batch maximum (history and candidates separately, nothing
    truncated); labels are aligned with cand_item_id; `transform(inputs, targets) -> (inputs, targets)`, if
    given, runs on every padded batch (a merlin Loader.map step, so it also runs when tr.Model.fit / evaluate
    iterate `.dataset`). Build it with request_dataloader, or let the stock tr.Trainer build it from a schema:
    it is the T4R engine "merlin_request" (T4RecTrainingArguments(data_loader_engine="merlin_request")).
    """

    def __init__(self, paths_or_dataset, batch_size: int, label_columns: Sequence[str], *,
                 columns: RequestColumns | None = None, schema=None, shuffle: bool = False, drop_last: bool = False,
                 transform: Callable | None = None, seed_fn=None, parts_per_chunk: int = 1, device=None,
                 global_size=None, global_rank=None):
        import merlin.io

        T4RecDataLoader.__init__(self)
        label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
        if not label_columns:
            raise ValueError("a request loader needs at least one label column (list, aligned with the candidates)")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable as transform(inputs, targets), got {type(transform).__name__}")
        columns = columns or RequestColumns()
        if isinstance(paths_or_dataset, merlin.io.Dataset):
            dataset = copy.copy(paths_or_dataset)  # the loader rewrites the schema: leave the caller's alone
        else:
            dataset = merlin.io.Dataset(paths_or_dataset, engine="parquet")
        schema = _core_schema(schema) or dataset.schema
        if columns.hist_action and columns.hist_action not in schema.column_names:
            columns = columns.without("hist_action")
        history = [c for c in columns.lists if c != columns.cand_item_id]
        cleaned = []
        for col in schema:
            # the merlin Loader pops TARGET-tagged columns as labels and fails on ragged lists: untag them here
            if col.name in label_columns and Tags.TARGET in col.tags:
                untagged = TagSet([t for t in col.tags if t != Tags.TARGET])
                col = dataclasses.replace(col, tags=untagged, dims=col.shape.as_tuple)
            # merlin infers no type for a list column that is empty in every row of the first file (requests of
            # new users only); history lists are integer by the request contract
            if col.name in history and col.dtype.element_type.value == "unknown":
                col = col.with_dtype(np.int64)
            cleaned.append(col)
        schema = CoreSchema(cleaned)
        lists = columns.lists + label_columns
        scalars = [c for c in columns.scalars if c == columns.request_time or c in schema.column_names]
        missing = [c for c in lists + scalars if c not in schema.column_names]
        if missing:
            raise ValueError(f"the dataset lacks the columns {missing} (columns: {schema.column_names})")
        dataset.schema = schema.select_by_name(lists + scalars)
        loader = _RequestLoader(dataset, batch_size, shuffle=shuffle, seed_fn=seed_fn, parts_per_chunk=parts_per_chunk,
                                global_size=global_size, global_rank=global_rank, drop_last=drop_last, device=device)
        loader = loader.map(RequestBatchPadding(label_columns, columns.cand_item_id))
        if transform is not None:
            loader = loader.map(transform)
        DLDataLoader.__init__(self, loader, collate_fn=_first_item, batch_size=batch_size, drop_last=drop_last)
        # (torch's DataLoader owns batch_size / drop_last; DLDataLoader keeps the batch size as _batch_size)
        self.paths_or_dataset, self.columns, self.label_columns = paths_or_dataset, columns, label_columns
        self.transform, self.schema = transform, schema

    @classmethod
    def from_schema(cls, schema, paths_or_dataset, batch_size, max_sequence_length=None, shuffle=True,
                    drop_last=False, columns: RequestColumns | None = None, transform: Callable | None = None,
                    global_rank=None, global_size=None, device=None, **unused):
        """What tr.Trainer calls to build its loaders: the labels are the schema's TARGET-tagged columns.

        max_sequence_length must stay None (T4RecTrainingArguments' default): T4R pads every list to it and
        cuts from the right, which would drop the most recent events; cap histories in the ETL (max_history)
        or with RecentHistoryWindow(max_len=...) instead. `unused` takes T4R's other arguments
        (shuffle_buffer_size), which this loader does not need.
        """
        if max_sequence_length:
            raise ValueError(f"max_sequence_length={max_sequence_length}: request data is padded per batch and "
                             "never cut from the right (that would drop the most recent events); leave it None and "
                             "cap histories in the ETL or with extrapolation.RecentHistoryWindow(max_len=...)")
        schema = _core_schema(schema)
        if schema is None:
            raise ValueError("the request loader needs the dataset's schema")
        labels = schema.select_by_tag(Tags.TARGET).column_names
        if not labels:
            raise ValueError("the schema tags no TARGET column: pass the dataset's schema (RequestGrouping tags the "
                             f"label lists TARGET), not the model's input schema; columns: {schema.column_names}")
        return cls(paths_or_dataset, batch_size, labels, columns=columns, schema=schema, shuffle=shuffle,
                   drop_last=drop_last, transform=transform, global_rank=global_rank, global_size=global_size,
                   device=device)

    @property
    def output_schema(self):
        return self.dataset.output_schema


def request_dataloader(paths_or_dataset, batch_size: int, label_columns: Sequence[str], *,
                       columns: RequestColumns | None = None, schema=None, shuffle: bool = False,
                       drop_last: bool = False, transform: Callable | None = None,
                       **loader_kwargs) -> RequestDataLoader:
    """A Transformers4Rec data loader over request-grouped parquet (see RequestDataLoader).

    transform: a step run on every padded batch after the padding, e.g.
    `extrapolation.RecentHistoryWindow(BetaLengthSampler(...))` on the TRAINING loader (a fresh recent window
    per request and epoch) or `RecentHistoryWindow(max_len=L)` to evaluate at history length L. Works with a
    plain loop, tr.Model.fit / evaluate and tr.Trainer (train_dataloader= / eval_dataloader=).
    loader_kwargs: seed_fn, parts_per_chunk, device, global_size, global_rank (the merlin Loader's).
    """
    return RequestDataLoader(paths_or_dataset, batch_size, label_columns, columns=columns, schema=schema,
                             shuffle=shuffle, drop_last=drop_last, transform=transform, **loader_kwargs)


STCABlock, LONGERBlock, MeanPoolBlock, DINBlock, ULTRAHSTUBlock = (
    BLOCKS[a] for a in ("stca", "longer", "mean-pool", "din", "ultra-hstu"))

__all__ = [
    "BLOCKS",
    "DINBlock",
    "LONGERBlock",
    "MeanPoolBlock",
    "RequestBatchPadding",
    "RequestBinaryClassificationTask",
    "RequestDataLoader",
    "RequestBlock",
    "STCABlock",
    "ULTRAHSTUBlock",
    "block_for",
    "columns_and_sizes",
    "find_request_block",
    "headed_core_model",
    "request_dataloader",
]
