"""Distributed training of any registered architecture with torch DistributedDataParallel (one entry point).

    torchrun --standalone --nproc_per_node 2 -m merlin_longseq.train_ddp --arch stca --device cuda \
        --history-len 2048 --batch-requests 32 --steps 200 --out runs/ddp.json
    python -m merlin_longseq.train_ddp --arch longer --device cpu --steps 5        # one process, no torchrun
    torchrun --standalone --nproc_per_node 2 -m merlin_longseq.train_ddp --device cpu ...   # gloo on CPU

Data (one table of requests, every rank holds all of it as one RequestBatch; the sampler gives each rank its
share). Every table is checked once with merlin_longseq.request.validate_request before training, so a request
that serving would refuse is refused here with the same RequestError:
  --data random       random requests (torch + numpy only: what GPU machines without Merlin run); history
                      lengths uniform in [min_history_frac * L, L]; half of the candidates come from the
                      request's own history and are clicked more often, so the loss has something to learn
  --data synthetic    merlin_longseq.data.synthetic impressions grouped per request by the NVTabular operator
                      RequestGrouping (needs the Merlin stack: merlin-core, pandas)
  --data DIR|FILE     request-grouped parquet as written by workflows.request_grouping (needs pyarrow):
                      hist_item_id, hist_timestamp, [hist_action], cand_item_id, request_time, label lists
Models (--arch: every name in merlin_longseq.registry): ranking architectures (stca, longer, mean-pool, din)
score each request's candidates (binary cross-entropy, one head per label); next-item architectures (hstu,
hstu-t4r) are trained on the request histories (every history position predicts the next event's item).

Steps: RequestGroupSampler (merlin_longseq.distributed) keeps every request whole on one rank and balances
the history work across ranks; the loss is the mean over the GLOBAL batch (global_mean_loss), so the DDP
step equals the single-process step on the union of the ranks' requests. Throughput is measured after
--warmup-steps (CUDA synchronised): samples = scored candidates (ranking) or predicted positions (next-item),
per rank and aggregated (sum of samples / the slowest rank's time). Rank 0 prints the summary and writes it
as JSON to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from merlin_longseq import registry
from merlin_longseq.distributed import (
    DistInfo,
    RequestGroupSampler,
    all_reduce_sum,
    destroy_distributed,
    global_mean_loss,
    init_distributed,
    request_costs,
)
from merlin_longseq.request import RequestBatch, RequestError, RequestLimits, check_label_lengths, validate_request

ARCHS = registry.names()


# ---- the training table ----------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """Every request of a training run as ONE RequestBatch (labels [C, K] inside it), plus what no batch
    carries: the vocabulary sizes the model is built with, where the requests came from, notes for the
    summary. A step's requests are `select(rows)`, a RequestBatch."""

    batch: RequestBatch
    num_items: int  # item ids lie in [1, num_items]
    num_actions: int  # actions lie in [0, num_actions]
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return self.batch.num_requests

    @property
    def label_names(self) -> tuple:
        return self.batch.label_names

    @property
    def history_lengths(self) -> torch.Tensor:
        return self.batch.history_lengths

    @property
    def candidate_counts(self) -> torch.Tensor:
        return self.batch.candidate_counts

    @property
    def limits(self) -> RequestLimits:
        """The request contract the data's own sizes imply (used where a model states none: next-item)."""
        return RequestLimits(num_items=self.num_items, num_actions=self.num_actions, needs_actions=True,
                             needs_timestamps=True, needs_request_time=True)

    def select(self, rows) -> RequestBatch:
        """The requests `rows` (in that order): one step's batch."""
        return self.batch.select(rows)

    def recent(self, max_len: int) -> "TrainingData":
        """Every history cut to its max_len most recent events."""
        return dataclasses.replace(self, batch=self.batch.recent(max_len), meta=dict(self.meta, capped_at=max_len))

    def to(self, device) -> "TrainingData":
        return dataclasses.replace(self, batch=self.batch.to(device))

    def summary(self) -> dict:
        lengths = self.history_lengths.double()
        return dict(source=self.source, requests=self.num_requests, history_events=self.batch.hist_item_ids.numel(),
                    candidates=self.batch.cand_item_ids.numel(),
                    mean_history=float(lengths.mean()) if lengths.numel() else 0.0,
                    max_history=int(lengths.max()) if lengths.numel() else 0, labels=list(self.label_names),
                    num_items=self.num_items, meta=self.meta)


def _owned(values, dtype=None) -> np.ndarray:
    # a writable copy (pyarrow hands out read-only buffers, which torch.from_numpy warns about); ids keep their
    # dtype so that RequestBatch.from_arrays refuses float or oversized ids instead of a silent cast here
    return np.array(values, dtype=dtype)


def _training_data(*, hist_item, hist_action, hist_time, hist_lengths, request_time, cand_item, cand_lengths, labels,
                   label_names, user_ids=None, source, meta=None, num_actions=None) -> TrainingData:
    """Flat numpy columns (one request after another) -> TrainingData; sizes read from the ids when not given."""
    hist_item, cand_item, hist_action = _owned(hist_item), _owned(cand_item), _owned(hist_action)
    label_names = tuple(label_names)
    batch = RequestBatch.from_lengths(
        hist_lengths=_owned(hist_lengths), cand_lengths=_owned(cand_lengths), hist_item_ids=hist_item,
        hist_actions=hist_action, hist_timestamps=_owned(hist_time), request_time=_owned(request_time),
        user_ids=None if user_ids is None else _owned(user_ids), cand_item_ids=cand_item,
        labels=torch.from_numpy(_owned(labels, np.float32).reshape(len(cand_item), len(label_names))),
        label_names=label_names)
    num_items = max(int(hist_item.max()) if hist_item.size else 0, int(cand_item.max()) if cand_item.size else 0, 1)
    if num_actions is None:
        num_actions = max(int(hist_action.max()) if hist_action.size else 0, 1)
    return TrainingData(batch=batch, num_items=num_items, num_actions=num_actions, source=source,
                        meta=dict(meta or {}))


def random_requests(num_requests: int, history_len: int, candidates: int = 32, num_items: int = 10_000,
                    num_tasks: int = 1, min_history_frac: float = 1.0, seed: int = 0) -> TrainingData:
    """Random requests with a learnable label: candidates taken from the request's own history are clicked
    with probability 0.7, random ones with 0.1 (label k > 0: click and a coin flip). torch + numpy only."""
    if num_requests < 1 or history_len < 1 or candidates < 1 or num_items < 2 or num_tasks < 1:
        raise ValueError("need num_requests, history_len, candidates, num_tasks >= 1 and num_items >= 2")
    if not 0.0 <= min_history_frac <= 1.0:
        raise ValueError(f"min_history_frac must be in [0, 1], got {min_history_frac}")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(int(math.ceil(min_history_frac * history_len)), history_len + 1, size=num_requests)
    total = int(lengths.sum())
    hist_item = rng.integers(1, num_items + 1, size=total)
    hist_action = rng.integers(1, 4, size=total)
    request_time = 1_800_000_000 + np.arange(num_requests, dtype=np.int64) * 3600
    starts = np.cumsum(lengths) - lengths
    segment = np.repeat(np.arange(num_requests), lengths)
    position = np.arange(total) - starts[segment]
    hist_time = request_time[segment] - (lengths[segment] - position) * 600  # increasing, all before the request
    # candidates: half from the request's own history (where it has one), the rest uniform
    from_history = (rng.random((num_requests, candidates)) < 0.5) & (lengths[:, None] > 0)
    offset_in_history = rng.random((num_requests, candidates)) * np.maximum(lengths, 1)[:, None]
    picked = starts[:, None] + offset_in_history.astype(np.int64)
    cand = np.where(from_history, hist_item[np.minimum(picked, max(total - 1, 0))],
                    rng.integers(1, num_items + 1, size=(num_requests, candidates)))
    click = rng.random((num_requests, candidates)) < np.where(from_history, 0.7, 0.1)
    labels = [click] + [click & (rng.random(click.shape) < 0.5) for _ in range(num_tasks - 1)]
    names = ["click"] + [f"label{k}" for k in range(1, num_tasks)]
    return _training_data(hist_item=hist_item, hist_action=hist_action, hist_time=hist_time, hist_lengths=lengths,
                          request_time=request_time, cand_item=cand.ravel(),
                          cand_lengths=np.full(num_requests, candidates),
                          labels=np.stack([label.ravel() for label in labels], axis=1), label_names=names,
                          source="random", meta=dict(seed=seed, min_history_frac=min_history_frac))


# ---- request-grouped rows (the RequestGrouping contract) -> TrainingData ---------------------------------
def _from_grouped(lists: dict, scalars: dict, label_columns, action_column: str | None, source: str,
                  meta=None) -> TrainingData:
    """Grouped rows -> TrainingData. lists: {column: (flat values, per-row lengths)} holding hist_item_id,
    hist_timestamp, cand_item_id, the labels and optionally the action column; scalars: {column: [R]} holding
    request_time and optionally user_id."""
    if not label_columns:
        raise ValueError("training data needs at least one label column (a list aligned with cand_item_id)")
    hist_item, hist_len = lists["hist_item_id"]
    for name in ("hist_timestamp", action_column):
        # totals can agree while single rows do not: check per row before the lists are glued together
        if name and not np.array_equal(lists[name][1], hist_len):
            row = int(np.nonzero(lists[name][1] != hist_len)[0][0])
            raise RequestError(f"row {row}: {name} holds {int(lists[name][1][row])} values but hist_item_id "
                               f"{int(hist_len[row])}: one value per history event")
    cand_item, cand_len = lists["cand_item_id"]
    check_label_lengths(cand_len, {name: lists[name][1] for name in label_columns})
    labels = np.stack([np.asarray(lists[name][0], dtype=np.float32) for name in label_columns], axis=1)
    return _training_data(
        hist_item=hist_item, hist_time=lists["hist_timestamp"][0],
        hist_action=lists[action_column][0] if action_column else np.zeros(len(hist_item), np.int64),
        hist_lengths=hist_len, request_time=scalars["request_time"], user_ids=scalars.get("user_id"),
        cand_item=cand_item, cand_lengths=cand_len, labels=labels.reshape(len(cand_item), len(label_columns)),
        label_names=label_columns, source=source, meta=meta)


def read_request_parquet(path: str, label_columns=None) -> TrainingData:
    """Request-grouped parquet (workflows.request_grouping contract) -> TrainingData; needs pyarrow.

    label_columns: None takes every list column that is neither hist_* nor cand_*. A label list whose length
    differs from its row's candidate list is refused (RequestError) here, before the lists are concatenated.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise ValueError(f"no parquet file at {path!r} (give a file or a folder of *.parquet)")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    names = table.column_names
    required = ["request_time", "hist_item_id", "hist_timestamp", "cand_item_id"]
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{path} lacks the request-grouped column(s) {missing}; found {names}")

    def is_list(name):
        return pa.types.is_list(table.schema.field(name).type) or pa.types.is_large_list(table.schema.field(name).type)

    if label_columns is None:
        label_columns = [c for c in names if is_list(c) and not c.startswith(("hist_", "cand_"))]
    if not label_columns:
        raise ValueError(f"no label columns found in {path}; pass label_columns")
    missing = [c for c in label_columns if c not in names]
    if missing:
        raise ValueError(f"{path} has no label column(s) {missing}; found {names}")

    def flat(name):
        column = table.column(name).combine_chunks()
        offsets = np.asarray(column.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
        return np.asarray(column.flatten().to_numpy(zero_copy_only=False)), offsets[1:] - offsets[:-1]

    action = "hist_action" if "hist_action" in names else None
    lists = {name: flat(name) for name in [*required[1:], *label_columns, *([action] if action else [])]}
    scalars = {name: table.column(name).to_numpy() for name in ("request_time", "user_id") if name in names}
    return _from_grouped(lists, scalars, list(label_columns), action, source=f"parquet:{path}")


def requests_from_logs(events, impressions, max_history: int, label_columns=("click",),
                       user_col="user_id", item_col="item_id", timestamp_col="timestamp", action_col="action",
                       request_col="request_id", request_time_col="request_time", source="logs") -> TrainingData:
    """Group pandas impression / event logs per request with the NVTabular operator RequestGrouping (the one
    implementation of the grouping rules), called directly on the frames without a Workflow; needs the Merlin
    stack (merlin-core). Requests come out in request-id order, as the operator emits them; the action column
    becomes hist_action when the events have it (else every action is 0)."""
    try:
        from merlin.dag import ColumnSelector

        from merlin_longseq.workflows.request_grouping import RequestGrouping
    except ImportError as err:
        raise ImportError("requests_from_logs groups requests with workflows.request_grouping.RequestGrouping, "
                          "which needs the Merlin stack (merlin-core); --data random needs torch + numpy only"
                          ) from err

    label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    actions = [action_col] if action_col and action_col in events.columns else []
    grouping = RequestGrouping(events, label_columns=label_columns, max_history=max_history, event_features=actions,
                               user_col=user_col, item_col=item_col, timestamp_col=timestamp_col,
                               request_col=request_col, request_time_col=request_time_col)
    selected = [user_col, request_col, request_time_col, item_col, *label_columns]
    grouped = grouping.transform(ColumnSelector(selected), impressions)

    def flat(name):
        rows = grouped[name].tolist()
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), lengths

    action = f"hist_{action_col}" if actions else None
    lists = {name: flat(name) for name in ["hist_item_id", "hist_timestamp", "cand_item_id", *label_columns,
                                          *([action] if action else [])]}
    scalars = {name: grouped[name].to_numpy() for name in ("request_time", "user_id")}
    return _from_grouped(lists, scalars, label_columns, action, source=source, meta=dict(max_history=max_history))


def synthetic_requests(num_users: int, history_len: int, requests_per_user: int = 4, candidates: int = 16,
                       num_items: int = 2000, seed: int = 0) -> TrainingData:
    """merlin_longseq.data.synthetic impressions (labels from the users' true profiles), grouped by
    requests_from_logs (needs the Merlin stack)."""
    from merlin_longseq.data.synthetic import SyntheticConfig, generate_impressions

    cfg = SyntheticConfig(num_users=num_users, num_items=num_items, min_history=max(1, history_len // 2),
                          max_history=history_len, seed=seed)
    events, impressions = generate_impressions(cfg, requests_per_user=requests_per_user,
                                               candidates_per_request=candidates)
    labels = [c for c in ("click", "like") if c in impressions.columns]
    return requests_from_logs(events, impressions, history_len, labels, source="synthetic")


# ---- models and losses -----------------------------------------------------------------------------------
# The per-architecture differences, in one place. Shared knobs (d_model, n_heads, n_layers, dropout, backend,
# mixed_precision) go to every config that has the field. Ranking: options beyond them (LONGER: event tokens
# d_model / 4 wide, merged 4 at a time into d_model). Next-item: the constructor sizes that live outside the
# config (the model class's from_constructor_args), read from the data.
_RANKING_OPTIONS = {"longer": lambda d_model: dict(token_dim=max(1, d_model // 4), merge_size=4)}
_NEXT_ITEM_SIZES = {
    "hstu": lambda data, d_model: dict(num_items=data.num_items, num_actions=data.num_actions),
    # the served form of a T4R model, trained from scratch here: its own item table, no action tokens
    "hstu-t4r": lambda data, d_model: dict(num_embeddings=data.num_items + 1, item_dim=d_model,
                                           uses_timestamps=True),
}


def build_model(arch: str, data: TrainingData, *, d_model: int = 64, n_heads: int = 2, n_layers: int = 2,
                backend: str = "auto", amp: bool = False, dropout: float = 0.0) -> nn.Module:
    """A model of the registered architecture `arch` sized for `data` (item and action vocabularies, labels as
    task heads for ranking, the longest history as HSTU's max_seq_len for next-item)."""
    entry = registry.get(arch)
    accepted = {f.name for f in dataclasses.fields(entry.config_class)}
    knobs = dict(d_model=d_model, n_heads=n_heads, n_layers=n_layers, dropout=dropout, backend=backend,
                 mixed_precision=amp)
    options = {k: v for k, v in knobs.items() if k in accepted}
    if entry.kind == registry.RANKING:
        options.update(_RANKING_OPTIONS.get(entry.name, lambda _: {})(d_model))
        cfg = entry.config_class(num_items=data.num_items, num_actions=data.num_actions, **options)
        return entry.model_class(cfg.with_tasks(data.label_names))
    if entry.name not in _NEXT_ITEM_SIZES:
        raise ValueError(f"train_ddp does not know the constructor sizes of the next-item architecture "
                         f"{entry.name!r}: add it to _NEXT_ITEM_SIZES")
    longest = int(data.history_lengths.max()) if data.num_requests else 1
    cfg = entry.config_class(max_seq_len=max(longest, 1), **options)
    return entry.model_class.from_constructor_args(cfg, _NEXT_ITEM_SIZES[entry.name](data, d_model))


def training_limits(arch: str, model: nn.Module, data: TrainingData) -> RequestLimits:
    """What every training request must satisfy: a ranking model's own contract (the one serving checks), or
    the data's sizes for next-item models (they state none)."""
    return model.limits if registry.get(arch).kind == registry.RANKING else data.limits


def _ranking_loss(model: nn.Module, batch: RequestBatch) -> tuple[torch.Tensor, int]:
    if batch.labels is None:
        raise ValueError("ranking training needs labels in the RequestBatch (one per candidate and task)")
    logits = model(**batch.model_inputs).float()
    return F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum"), batch.labels.numel()


def _next_item_loss(model: nn.Module, batch: RequestBatch) -> tuple[torch.Tensor, int]:
    offsets = batch.hist_offsets
    hidden = model(batch.hist_item_ids, offsets, action_ids=batch.hist_actions, timestamps=batch.hist_timestamps)
    # each history position predicts the next event of the same request (a request's last event predicts
    # nothing: its next event is not in the batch)
    is_last = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    nonempty = offsets[1:] > offsets[:-1]
    is_last[(offsets[1:] - 1)[nonempty]] = True
    source = torch.nonzero(~is_last).squeeze(1)
    logits = model.item_scores(hidden[source]).float()
    return F.cross_entropy(logits, batch.hist_item_ids[source + 1], reduction="sum"), source.numel()


_LOSSES = {registry.RANKING: _ranking_loss, registry.NEXT_ITEM: _next_item_loss}


def loss_terms(arch: str, model: nn.Module, batch: RequestBatch) -> tuple[torch.Tensor, int]:
    """(SUM of the per-sample losses, number of samples) of one batch; see global_mean_loss for why a sum."""
    return _LOSSES[registry.get(arch).kind](model, batch)


class ArchLoss(nn.Module):
    """model + its loss in one forward, so that DDP wraps the whole computation (HSTU's item scoring runs
    outside the model's forward; DDP only prepares gradient reduction around the wrapped forward)."""

    def __init__(self, arch: str, model: nn.Module):
        super().__init__()
        self.loss = _LOSSES[registry.get(arch).kind]  # unknown names fail here, with the registered ones
        self.arch, self.model = arch, model

    def forward(self, batch: RequestBatch):
        return self.loss(self.model, batch)


def costs_for(arch: str, data: TrainingData, d_model: int) -> np.ndarray:
    """Work per request for the sampler's balancing (see distributed.request_costs)."""
    lengths = data.history_lengths.cpu().numpy()
    if registry.get(arch).kind == registry.NEXT_ITEM:
        # causal attention ~ L^2 d against ~ L d^2 of projections per layer
        return lengths * (1.0 + lengths / (4.0 * d_model)) + 1.0
    return request_costs(lengths, data.candidate_counts.cpu().numpy(), pair_weight=1.0 / (2.0 * d_model))


# ---- training --------------------------------------------------------------------------------------------
def load_data(args) -> TrainingData:
    if args.data == "random":
        return random_requests(args.num_requests, args.history_len, args.candidates, args.num_items,
                               num_tasks=args.num_tasks, min_history_frac=args.min_history_frac, seed=args.seed)
    if args.data == "synthetic":
        users = max(1, math.ceil(args.num_requests / args.requests_per_user))
        return synthetic_requests(users, args.history_len, args.requests_per_user, args.candidates,
                                  num_items=args.num_items, seed=args.seed)
    data = read_request_parquet(args.data, args.labels)
    return data.recent(args.history_len) if args.history_len else data


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args, info: DistInfo | None = None, log=print) -> dict:
    """Run the training described by the parsed arguments; returns the summary (on every rank). Torch's thread
    count is changed for the run only (restored on return)."""
    info = info or init_distributed(args.device)
    previous_threads = torch.get_num_threads()
    try:
        return _train(args, info, log)
    finally:
        torch.set_num_threads(previous_threads)


def _train(args, info: DistInfo, log) -> dict:
    device = info.device
    if device.type == "cpu":
        # N processes with the default intra-op threads each oversubscribe the cores (measured on 2 shared
        # cores: 3 small STCA steps took 7.7 s with 2 threads, about 0.2 s with 1)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    kind = registry.get(args.arch).kind
    data = load_data(args)
    core = build_model(args.arch, data, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                       backend=args.backend, amp=args.amp)
    # once, on the host, before any step: a bad row fails here with the validator's RequestError
    validate_request(data.batch, training_limits(args.arch, core, data))
    costs = costs_for(args.arch, data, args.d_model)
    data = data.to(device)  # staged once: a step only gathers its rows on the device
    model = ArchLoss(args.arch, core.to(device))
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.find_unused_parameters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sampler = RequestGroupSampler(costs, batch_requests=args.batch_requests, num_replicas=info.world_size,
                                  rank=info.rank, seed=args.seed)
    # a model that runs its own autocast (LONGER's mixed_precision) is not wrapped in a second one
    own_autocast = getattr(core.cfg, "mixed_precision", False)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp and not own_autocast
                else contextlib.nullcontext())
    loads = sampler.rank_loads(0)
    if info.is_main:
        log(f"[train_ddp] arch={args.arch} world={info.world_size} backend={info.backend or 'none'} device={device} "
            f"data={data.summary()} steps/epoch={len(sampler)} rank-load imbalance (max/mean, epoch 0) "
            f"{float((loads.max(1) / loads.mean(1)).mean()):.3f}")
    model.train()
    losses, step, epoch = [], 0, 0
    timed = dict(samples=0, requests=0, history=0, seconds=0.0, steps=0)
    start = None
    while step < args.steps:
        sampler.set_epoch(epoch)
        for rows in sampler:
            if step == args.warmup_steps:
                _sync(device)
                start = time.perf_counter()
            batch = data.select(rows)
            with autocast:
                loss_sum, count = model(batch)
            loss = global_mean_loss(loss_sum, count)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if start is not None:
                # a sample: one scored candidate (all its labels), or one next-item prediction; shapes, no sync
                timed["samples"] += count if kind == registry.NEXT_ITEM else batch.cand_item_ids.shape[0]
                timed["requests"] += len(rows)
                timed["history"] += batch.hist_item_ids.shape[0]
                timed["steps"] += 1
            if step % args.log_every == 0 or step == args.steps:
                # the global mean: each rank's loss is world * its sum / global count
                value = all_reduce_sum(loss.detach().clone()) / info.world_size
                losses.append((step, float(value)))
                if info.is_main:
                    log(f"[train_ddp] step {step} loss {float(value):.4f}")
            if step >= args.steps:
                break
        epoch += 1
    _sync(device)
    if start is not None:
        timed["seconds"] = time.perf_counter() - start
    summary = _summarize(args, info, data, timed, losses, loads)
    if info.is_main:
        for r in summary["per_rank"]:
            log(f"[train_ddp] rank {r['rank']}: {r['samples_per_s']:.1f} samples/s ({r['requests']} requests, "
                f"{r['seconds']:.2f} s)")
        log(f"[train_ddp] aggregate: {summary['samples_per_s']:.1f} samples/s, "
            f"{summary['requests_per_s']:.1f} requests/s on {info.world_size} process(es)")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=2)
            log(f"[train_ddp] summary -> {args.out}")
    return summary


def _summarize(args, info: DistInfo, data: TrainingData, timed: dict, losses: list, loads: np.ndarray) -> dict:
    mine = dict(rank=info.rank, samples=timed["samples"], requests=timed["requests"], history_events=timed["history"],
                steps=timed["steps"], seconds=timed["seconds"],
                samples_per_s=timed["samples"] / timed["seconds"] if timed["seconds"] > 0 else 0.0)
    per_rank = [None] * info.world_size
    if info.distributed:
        dist.all_gather_object(per_rank, mine)
    else:
        per_rank = [mine]
    slowest = max(r["seconds"] for r in per_rank)
    total_samples = sum(r["samples"] for r in per_rank)
    total_requests = sum(r["requests"] for r in per_rank)
    device_name = (torch.cuda.get_device_name(info.device) if info.device.type == "cuda"
                   else platform.processor() or platform.machine())
    next_item = registry.get(args.arch).kind == registry.NEXT_ITEM
    return dict(
        arch=args.arch, world_size=info.world_size, dist_backend=info.backend, device=str(info.device),
        device_name=device_name, torch=torch.__version__, attention_backend=args.backend, amp=args.amp,
        steps=args.steps, warmup_steps=args.warmup_steps, timed_steps=timed["steps"],
        batch_requests_per_rank=args.batch_requests, history_len=args.history_len, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, data=data.summary(),
        samples_per_s=total_samples / slowest if slowest > 0 else 0.0,
        requests_per_s=total_requests / slowest if slowest > 0 else 0.0,
        per_rank=per_rank, losses=losses,
        rank_load_max_over_mean_epoch0=float((loads.max(1) / loads.mean(1)).mean()),
        sample_unit="next-item positions" if next_item else "scored candidates",
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m merlin_longseq.train_ddp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="stca",
                   help="; ".join(f"{a}: {registry.get(a).summary}" for a in ARCHS))
    p.add_argument("--data", default="random",
                   help="random (torch + numpy only) | synthetic (needs the Merlin stack) | path to "
                        "request-grouped parquet (needs pyarrow)")
    p.add_argument("--labels", type=lambda s: s.split(","), default=None, help="label columns (parquet)")
    p.add_argument("--history-len", type=int, default=1024,
                   help="longest history (random / synthetic data); parquet histories are cut to it (0: keep)")
    p.add_argument("--min-history-frac", type=float, default=1.0,
                   help="random data: history lengths uniform in [frac * L, L]")
    p.add_argument("--num-requests", type=int, default=2048, help="random / synthetic: requests in the table")
    p.add_argument("--requests-per-user", type=int, default=4, help="synthetic data")
    p.add_argument("--candidates", type=int, default=32, help="candidates per request (random / synthetic)")
    p.add_argument("--num-items", type=int, default=10_000)
    p.add_argument("--num-tasks", type=int, default=1, help="random data: labels per candidate")
    p.add_argument("--batch-requests", type=int, default=16, help="requests per rank per step (on average)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the throughput")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("auto", "triton", "pytorch"), default="auto",
                   help="attention kernels of every architecture that has a choice (auto: Triton on CUDA)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--find-unused-parameters", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="CPU: intra-op threads per process (0: cores / processes)")
    p.add_argument("--out", default=None, help="JSON summary (written by rank 0)")
    args = p.parse_args(argv)
    for name in ("num_requests", "candidates", "num_items", "batch_requests", "steps", "log_every", "d_model",
                 "n_heads", "n_layers", "requests_per_user", "num_tasks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0 or args.warmup_steps >= args.steps:
        p.error("--warmup-steps must be in [0, steps)")
    if args.history_len < 0 or (args.data in ("random", "synthetic") and args.history_len < 1):
        p.error("--history-len must be >= 1 for random / synthetic data")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    info = init_distributed(args.device)
    try:
        train(args, info)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
