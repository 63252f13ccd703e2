"""Distributed training of STCA, LONGER or HSTU with torch DistributedDataParallel (one entry point).

    torchrun --standalone --nproc_per_node 2 -m merlin_longseq.train_ddp --arch stca --device cuda \
        --history-len 2048 --batch-requests 32 --steps 200 --out runs/ddp.json
    python -m merlin_longseq.train_ddp --arch longer --device cpu --steps 5        # one process, no torchrun
    torchrun --standalone --nproc_per_node 2 -m merlin_longseq.train_ddp --device cpu ...   # gloo on CPU

Data (one table of requests, every rank holds all of it; the sampler gives each rank its share):
  --data random       random requests (torch + numpy only: what GPU machines without Merlin run); history
                      lengths uniform in [min_history_frac * L, L]; half of the candidates come from the
                      request's own history and are clicked more often, so the loss has something to learn
  --data synthetic    merlin_longseq.data.synthetic impressions grouped per request in numpy (needs pandas)
  --data DIR|FILE     request-grouped parquet as written by workflows.request_grouping (needs pyarrow):
                      hist_item_id, hist_timestamp, [hist_action], cand_item_id, request_time, label lists
Models: stca and longer score each request's candidates (binary cross-entropy, one head per label); hstu is
trained next-item on the request histories (every history position predicts the next event's item).

Steps: RequestGroupSampler (merlin_longseq.distributed) keeps every request whole on one rank and balances
the history work across ranks; the loss is the mean over the GLOBAL batch (global_mean_loss), so the DDP
step equals the single-process step on the union of the ranks' requests. Throughput is measured after
--warmup-steps (CUDA synchronised): samples = scored candidates (stca, longer) or predicted positions (hstu),
per rank and aggregated (sum of samples / the slowest rank's time). Rank 0 prints the summary and writes it
as JSON to --out.
"""
from __future__ import annotations

import argparse
import contextlib
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

from merlin_longseq.distributed import (
    DistInfo,
    RequestGroupSampler,
    all_reduce_sum,
    destroy_distributed,
    global_mean_loss,
    init_distributed,
    request_costs,
)
from merlin_longseq.jagged import offsets_from_lengths

ARCHS = ("stca", "longer", "hstu")


# ---- request table ---------------------------------------------------------------------------------------
@dataclass
class RequestData:
    """Requests back to back (jagged): histories by hist_offsets [R + 1], candidates by cand_offsets [R + 1]."""

    hist_item: torch.Tensor  # [N] int64, item ids 1..num_items (0 = padding, never a real event)
    hist_action: torch.Tensor  # [N] int64, 0..num_actions
    hist_time: torch.Tensor  # [N] int64, most recent last within a request
    hist_offsets: torch.Tensor  # [R + 1] int64
    request_time: torch.Tensor  # [R] int64
    cand_item: torch.Tensor  # [C] int64
    cand_offsets: torch.Tensor  # [R + 1] int64
    labels: torch.Tensor  # [C, K] float32
    label_names: tuple = ("click",)
    num_items: int = 0
    num_actions: int = 3
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.label_names = tuple(self.label_names)
        requests = self.hist_offsets.numel() - 1
        if self.cand_offsets.numel() != requests + 1 or self.request_time.shape != (requests,):
            raise ValueError("hist_offsets, cand_offsets and request_time must describe the same requests")
        if int(self.hist_offsets[-1]) != self.hist_item.numel() or int(self.cand_offsets[-1]) != self.cand_item.numel():
            raise ValueError("offsets do not match the number of history events / candidates")
        if not (self.hist_item.shape == self.hist_action.shape == self.hist_time.shape):
            raise ValueError("hist_item, hist_action and hist_time must have one entry per history event")
        if self.labels.shape != (self.cand_item.numel(), len(self.label_names)):
            raise ValueError(f"labels must be [candidates, {len(self.label_names)}], got {tuple(self.labels.shape)}")
        if requests and bool((self.cand_offsets[1:] == self.cand_offsets[:-1]).any()):
            raise ValueError("every request needs at least one candidate")

    @property
    def num_requests(self) -> int:
        return self.hist_offsets.numel() - 1

    @property
    def history_lengths(self) -> torch.Tensor:
        return self.hist_offsets[1:] - self.hist_offsets[:-1]

    @property
    def candidate_counts(self) -> torch.Tensor:
        return self.cand_offsets[1:] - self.cand_offsets[:-1]

    def to(self, device) -> "RequestData":
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        return RequestData(**moved, label_names=self.label_names, num_items=self.num_items,
                           num_actions=self.num_actions, source=self.source, meta=self.meta)

    def batch(self, rows) -> dict:
        """The requests `rows` (in that order) as STCAModel / LONGERModel keyword arguments plus 'labels'."""
        device = self.hist_offsets.device
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64)).to(device)
        hist_pos, hist_offsets = _gather_positions(self.hist_offsets, rows)
        cand_pos, cand_offsets = _gather_positions(self.cand_offsets, rows)
        return dict(hist_item_ids=self.hist_item[hist_pos], hist_actions=self.hist_action[hist_pos],
                    hist_timestamps=self.hist_time[hist_pos], hist_offsets=hist_offsets,
                    request_time=self.request_time[rows], cand_item_ids=self.cand_item[cand_pos],
                    cand_offsets=cand_offsets, labels=self.labels[cand_pos])

    def summary(self) -> dict:
        lengths = self.history_lengths.double()
        return dict(source=self.source, requests=self.num_requests, history_events=self.hist_item.numel(),
                    candidates=self.cand_item.numel(), mean_history=float(lengths.mean()) if lengths.numel() else 0.0,
                    max_history=int(lengths.max()) if lengths.numel() else 0, labels=list(self.label_names),
                    num_items=self.num_items, meta=self.meta)


_TENSOR_FIELDS = ("hist_item", "hist_action", "hist_time", "hist_offsets", "request_time", "cand_item",
                  "cand_offsets", "labels")


def _gather_positions(offsets: torch.Tensor, rows: torch.Tensor):
    """Flat positions of the segments `rows` of a jagged tensor, and the offsets of the gathered result."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new_offsets = offsets_from_lengths(lengths)
    total = int(new_offsets[-1])
    shift = torch.repeat_interleave(starts - new_offsets[:-1], lengths, output_size=total)
    return shift + torch.arange(total, device=offsets.device), new_offsets


def _from_numpy(hist_item, hist_action, hist_time, hist_lengths, request_time, cand_item, cand_lengths, labels,
                label_names, source, meta=None, num_actions=None) -> RequestData:
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.int64))  # noqa: E731  (a copy: pyarrow arrays are read-only)
    hist_item, cand_item = t(hist_item), t(cand_item)
    num_items = int(max(int(hist_item.max()) if hist_item.numel() else 0,
                        int(cand_item.max()) if cand_item.numel() else 0, 1))
    actions = t(hist_action)
    if num_actions is None:
        num_actions = max(int(actions.max()) if actions.numel() else 0, 1)
    return RequestData(hist_item=hist_item, hist_action=actions, hist_time=t(hist_time),
                       hist_offsets=offsets_from_lengths(t(hist_lengths)), request_time=t(request_time),
                       cand_item=cand_item, cand_offsets=offsets_from_lengths(t(cand_lengths)),
                       labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)).reshape(
                           len(cand_item), len(label_names)),
                       label_names=tuple(label_names), num_items=num_items, num_actions=num_actions,
                       source=source, meta=dict(meta or {}))


def random_requests(num_requests: int, history_len: int, candidates: int = 32, num_items: int = 10_000,
                    num_tasks: int = 1, min_history_frac: float = 1.0, seed: int = 0) -> RequestData:
    """Random requests with a learnable label: candidates taken from the request's own history are clicked
    with probability 0.7, random ones with 0.1 (label k > 0: click and a coin flip)."""
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
    return _from_numpy(hist_item, hist_action, hist_time, lengths, request_time, cand.ravel(),
                       np.full(num_requests, candidates), np.stack([label.ravel() for label in labels], axis=1), names,
                       source="random", meta=dict(seed=seed, min_history_frac=min_history_frac))


def requests_from_logs(events, impressions, max_history: int, label_columns=("click",),
                       user_col="user_id", item_col="item_id", timestamp_col="timestamp", action_col="action",
                       request_col="request_id", request_time_col="request_time", source="logs") -> RequestData:
    """Group pandas impression / event logs per request WITHOUT NVTabular (for machines without Merlin).

    Same rules as workflows.request_grouping.RequestGrouping: history = the user's events strictly before
    the request time, ordered by (timestamp, log order), the most recent max_history kept; candidates in
    order of their first row, a repeated (request, item) keeps its first row; requests in order of first
    appearance. tests/test_dask_etl.py checks it against the operator.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    missing = [c for c in (user_col, item_col, timestamp_col) if c not in events.columns]
    missing += [c for c in (user_col, request_col, request_time_col, item_col, *label_columns)
                if c not in impressions.columns]
    if missing:
        raise ValueError(f"missing column(s) {sorted(set(missing))} in the events / impressions")
    ev = events.reset_index(drop=True)
    order = np.lexsort((np.arange(len(ev)), ev[timestamp_col].to_numpy(), ev[user_col].to_numpy()))
    ev_user = ev[user_col].to_numpy(np.int64)[order]
    ev_time = ev[timestamp_col].to_numpy(np.int64)[order]
    ev_item = ev[item_col].to_numpy(np.int64)[order]
    ev_action = (ev[action_col].to_numpy(np.int64)[order] if action_col and action_col in ev.columns
                 else np.zeros(len(ev), np.int64))
    imp = impressions.drop_duplicates([request_col, item_col], keep="first")
    first_row = imp.groupby(request_col, sort=False).head(1)
    users = first_row[user_col].to_numpy(np.int64)
    times = first_row[request_time_col].to_numpy(np.int64)
    # within a user the events are time-sorted: the history ends just before the first event at >= time
    user_lo = np.searchsorted(ev_user, users, side="left")
    user_hi = np.searchsorted(ev_user, users, side="right")
    ends = np.array([lo + np.searchsorted(ev_time[lo:hi], t, side="left")
                     for lo, hi, t in zip(user_lo, user_hi, times)], dtype=np.int64)
    starts = np.maximum(user_lo, ends - max_history)
    lengths = ends - starts
    positions = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
    request_index = {key: i for i, key in enumerate(first_row[request_col].tolist())}
    slot = imp[request_col].map(request_index).to_numpy(np.int64)
    cand_order = np.argsort(slot, kind="stable")  # by request, each in impression order
    return _from_numpy(ev_item[positions], ev_action[positions], ev_time[positions], lengths, times,
                       imp[item_col].to_numpy(np.int64)[cand_order], np.bincount(slot, minlength=len(users)),
                       imp[label_columns].to_numpy(np.float32)[cand_order], label_columns, source=source,
                       meta=dict(max_history=max_history))


def synthetic_requests(num_users: int, history_len: int, requests_per_user: int = 4, candidates: int = 16,
                       num_items: int = 2000, seed: int = 0) -> RequestData:
    """merlin_longseq.data.synthetic impressions (labels from the users' true profiles), grouped in numpy."""
    from merlin_longseq.data.synthetic import SyntheticConfig, generate_impressions

    cfg = SyntheticConfig(num_users=num_users, num_items=num_items, min_history=max(1, history_len // 2),
                          max_history=history_len, seed=seed)
    events, impressions = generate_impressions(cfg, requests_per_user=requests_per_user,
                                               candidates_per_request=candidates)
    labels = [c for c in ("click", "like") if c in impressions.columns]
    return requests_from_logs(events, impressions, history_len, labels, source="synthetic")


def read_request_parquet(path: str, label_columns=None) -> RequestData:
    """Request-grouped parquet (workflows.request_grouping contract) -> RequestData; needs pyarrow.

    label_columns: None takes every list column that is neither hist_* nor cand_*.
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

    def flat(name):
        column = table.column(name).combine_chunks()
        offsets = np.asarray(column.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
        return np.asarray(column.flatten().to_numpy(zero_copy_only=False)), offsets[1:] - offsets[:-1]

    hist_item, hist_len = flat("hist_item_id")
    hist_time, _ = flat("hist_timestamp")
    hist_action = flat("hist_action")[0] if "hist_action" in names else np.zeros_like(hist_item)
    cand_item, cand_len = flat("cand_item_id")
    labels = []
    for name in label_columns:
        values, lengths = flat(name)
        if not np.array_equal(lengths, cand_len):
            raise ValueError(f"label list {name!r} does not have one value per candidate")
        labels.append(values.astype(np.float32))
    request_time = np.asarray(table.column("request_time").to_numpy(), dtype=np.int64)
    return _from_numpy(hist_item, hist_action, hist_time, hist_len, request_time, cand_item, cand_len,
                       np.stack(labels, axis=1), label_columns, source=f"parquet:{path}")


# ---- models and losses -----------------------------------------------------------------------------------
def build_model(arch: str, data: RequestData, *, d_model: int = 64, n_heads: int = 2, n_layers: int = 2,
                backend: str = "auto", amp: bool = False, dropout: float = 0.0) -> nn.Module:
    """A model of `arch` sized for `data` (item vocabulary, labels, longest history)."""
    if arch == "stca":
        from merlin_longseq.models.stca import STCAConfig, STCAModel

        return STCAModel(STCAConfig(num_items=data.num_items, num_actions=data.num_actions, d_model=d_model,
                                    n_heads=n_heads, n_layers=n_layers, tasks=data.label_names, backend=backend,
                                    dropout=dropout))
    if arch == "longer":
        from merlin_longseq.models.longer import LONGERConfig, LONGERModel

        merge = 4
        return LONGERModel(LONGERConfig(num_items=data.num_items, num_actions=data.num_actions,
                                        num_tasks=len(data.label_names), token_dim=max(1, d_model // merge),
                                        merge_size=merge, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                                        dropout=dropout, mixed_precision=amp))
    if arch == "hstu":
        from merlin_longseq.models.hstu import HSTUConfig, HSTUNextItemModel

        longest = int(data.history_lengths.max()) if data.num_requests else 1
        cfg = HSTUConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, max_seq_len=max(longest, 1),
                         dropout=dropout, backend=backend)
        return HSTUNextItemModel(data.num_items, cfg, num_actions=data.num_actions)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def loss_terms(arch: str, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(SUM of the per-sample losses, number of samples) of one batch; see global_mean_loss for why a sum."""
    if arch in ("stca", "longer"):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).float()
        loss = F.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="sum")
        return loss, batch["labels"].numel()
    if arch == "hstu":
        offsets = batch["hist_offsets"]
        hidden = model(batch["hist_item_ids"], offsets, action_ids=batch["hist_actions"],
                       timestamps=batch["hist_timestamps"])
        # each history position predicts the next event of the same request (a request's last event predicts
        # nothing: its next event is not in the batch)
        is_last = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        nonempty = offsets[1:] > offsets[:-1]
        is_last[(offsets[1:] - 1)[nonempty]] = True
        source = torch.nonzero(~is_last).squeeze(1)
        logits = model.item_scores(hidden[source]).float()
        return F.cross_entropy(logits, batch["hist_item_ids"][source + 1], reduction="sum"), source.numel()
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


class ArchLoss(nn.Module):
    """model + its loss in one forward, so that DDP wraps the whole computation (HSTU's item scoring runs
    outside the model's forward; DDP only prepares gradient reduction around the wrapped forward)."""

    def __init__(self, arch: str, model: nn.Module):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        self.arch, self.model = arch, model

    def forward(self, batch: dict):
        return loss_terms(self.arch, self.model, batch)


def costs_for(arch: str, data: RequestData, d_model: int) -> np.ndarray:
    """Work per request for the sampler's balancing (see distributed.request_costs)."""
    lengths = data.history_lengths.cpu().numpy()
    if arch == "hstu":
        # causal attention ~ L^2 d against ~ L d^2 of projections per layer
        return lengths * (1.0 + lengths / (4.0 * d_model)) + 1.0
    return request_costs(lengths, data.candidate_counts.cpu().numpy(), pair_weight=1.0 / (2.0 * d_model))


# ---- training --------------------------------------------------------------------------------------------
def load_data(args) -> RequestData:
    if args.data == "random":
        return random_requests(args.num_requests, args.history_len, args.candidates, args.num_items,
                               num_tasks=args.num_tasks, min_history_frac=args.min_history_frac, seed=args.seed)
    if args.data == "synthetic":
        users = max(1, math.ceil(args.num_requests / args.requests_per_user))
        return synthetic_requests(users, args.history_len, args.requests_per_user, args.candidates,
                                  num_items=args.num_items, seed=args.seed)
    data = read_request_parquet(args.data, args.labels)
    if args.history_len:
        data = _cap_history(data, args.history_len)
    return data


def _cap_history(data: RequestData, max_len: int) -> RequestData:
    """Keep the max_len most recent events of every history."""
    lengths = data.history_lengths
    kept_len = lengths.clamp(max=max_len)
    seg = torch.repeat_interleave(torch.arange(data.num_requests), lengths)
    position = torch.arange(seg.numel()) - data.hist_offsets[:-1][seg]
    keep = position >= (lengths - kept_len)[seg]
    return RequestData(hist_item=data.hist_item[keep], hist_action=data.hist_action[keep],
                       hist_time=data.hist_time[keep], hist_offsets=offsets_from_lengths(kept_len),
                       request_time=data.request_time, cand_item=data.cand_item, cand_offsets=data.cand_offsets,
                       labels=data.labels, label_names=data.label_names, num_items=data.num_items,
                       num_actions=data.num_actions, source=data.source, meta=dict(data.meta, capped_at=max_len))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args, info: DistInfo | None = None, log=print) -> dict:
    """Run the training described by the parsed arguments; returns the summary (on every rank)."""
    info = info or init_distributed(args.device)
    device = info.device
    if device.type == "cpu":
        # N processes with the default intra-op threads each oversubscribe the cores (measured on 2 shared
        # cores: 3 small STCA steps took 7.7 s with 2 threads, about 0.2 s with 1)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    data = load_data(args)
    costs = costs_for(args.arch, data, args.d_model)
    data = data.to(device)  # staged once: a step only gathers its rows on the device
    model = build_model(args.arch, data, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                        backend=args.backend, amp=args.amp).to(device)
    model = ArchLoss(args.arch, model)
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.find_unused_parameters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sampler = RequestGroupSampler(costs, batch_requests=args.batch_requests, num_replicas=info.world_size,
                                  rank=info.rank, seed=args.seed)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp and args.arch != "longer"
                else contextlib.nullcontext())  # LONGER runs its own autocast (mixed_precision)
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
            batch = data.batch(rows)
            with autocast:
                loss_sum, count = model(batch)
            loss = global_mean_loss(loss_sum, count)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if start is not None:
                # a sample: one scored candidate (all its labels), or one next-item prediction (hstu)
                timed["samples"] += count if args.arch == "hstu" else int(batch["cand_offsets"][-1])
                timed["requests"] += len(rows)
                timed["history"] += int(batch["hist_offsets"][-1])
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


def _summarize(args, info: DistInfo, data: RequestData, timed: dict, losses: list, loads: np.ndarray) -> dict:
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
        sample_unit="scored candidates" if args.arch != "hstu" else "next-item positions",
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m merlin_longseq.train_ddp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="stca")
    p.add_argument("--data", default="random", help="random | synthetic | path to request-grouped parquet")
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
                   help="attention kernels (auto: Triton on CUDA)")
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
