"""Request-level ranking on real data: ULTRA-HSTU, STCA, LONGER, DIN and mean pooling against references.

One job, two datasets (`dataset`); each has a reader and a request definition in workflows/, and the rest of
the job (split, ETL, training, metrics, report) is shared.

ml-100k (workflows.movielens, the default): a request is one user's ratings of one calendar day (UTC); its
candidates are the items rated that day, label `positive` = rating >= 4; its history is the user's ratings
strictly before the day's first rating, most recent last, capped at max_history, with the rating bucket (1..5)
as the event's action.

taobao (workflows.taobao; Taobao UserBehavior, the 814-user head beside the repository): a request is one
user's calendar day in Beijing time (UTC+8); its candidates are the distinct items the user page-viewed that
day, label `positive` = the user carted, favourited or bought the item that same day; its history is every
event of the user (any behaviour; action = pv 1, cart 2, fav 3, buy 4) strictly before the day's first event,
most recent last, capped at max_history. Rows outside 2017-11-25 .. 2017-12-03 (Beijing) are dropped.
item_key="category" writes every event and candidate as its category id instead of its item id (55K items,
three quarters of them seen once, against 2.9K categories); candidates are still one per distinct item.

Shared rules. Split in time per user: each user's last ceil(eval_fraction * days) request days (at least one,
for users with two or more days) are the eval split, the earlier ones the train split; a user with a single
day is train only (its one request has an empty history). Leakage: nothing of a request's own day is in its
history (request_time = the day's first event, RequestGrouping keeps events strictly before it); the eval
days come after every train day of their user; the references are fitted on the train split only. Item ids
(or category ids) are Categorified jointly over history and candidates, one vocabulary fitted on every request
(ids only: no label reaches it; eval-only ids get an embedding row that training never updates).
Tuning (tune=True): the same time rule applied INSIDE the train split makes a validation split (each user's
last train days); the eval split is not read. The settings in docs/RESULTS.md were picked that way.

Models: tr.Model(tr.Head(<request block>, RequestBinaryClassificationTask("positive"))) (merlin_longseq.t4r.training
.request_model), trained with tr.Trainer (training.fit) on the request loader and scored by trainer.evaluate
(training.evaluate: AUC, GAUC, logloss as the task's metrics). Every arch has the same item embedding size,
epochs, batch, optimiser (Adam) and learning rate; no user-id feature (the history is the only thing that
tells users apart).
    stca, longer, mean-pool, din, ultra-hstu     (the registry's ranking blocks, merlin_longseq.t4r.request)
ULTRA-HSTU's max_seq_len (the N of its 1/N attention normaliser and the longest history it accepts) is
max_history unless arch_options set it.
References, so the numbers can be judged: a popularity scorer (each item's -- or category's, with
item_key="category" -- positive rate on the train split, shrunk towards the global rate by `prior_weight`
pseudo-candidates, fixed before any eval run), the user's positive-behaviour rate over the request's history
(ml-100k: ratings >= 4; taobao: cart, fav or buy events; same shrinkage; it only changes between a user's
requests, so its GAUC says little), on taobao a repeat scorer (the train split's positive rate of candidates
whose item/category occurs k times in the request's history, k capped at 10; same shrinkage) and a seeded
random scorer.
Metrics: AUC, GAUC (per USER: the AUC of every eval user with both labels, plain mean over those users) and
logloss, per arch and seed, with eval histories cut to the most recent L events for L in eval_lengths; mean
and sample std over seeds.

Run: python examples/movielens.py ranking [--quick] [--out DIR]        (ML-100K)
     python examples/taobao.py [--quick] [--out DIR] [--data CSV]      (Taobao)
     python -m merlin_longseq.jobs.request_ranking --dataset {ml-100k,taobao} ...
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

ARCHS = ("stca", "longer", "mean-pool", "din", "ultra-hstu")
LABEL = "positive"
REPEAT_CAP = 10  # the repeat reference pools candidates seen >= 10 times in the history


# ---- datasets -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankingData:
    """What differs between the datasets: the reader, the request definition and a few labels."""

    name: str
    title: str  # report heading and plot title
    output: str  # file stem: <output>.json and <output>_auc.png in the run folder
    default_out: str  # default run folder
    num_actions: int  # history actions are 1..num_actions
    positive_action: int  # a history action >= this is the user's positive behaviour (user history rate)
    label_text: str  # what `positive` means (plot axis)
    read: Callable  # (path or None, download) -> (events with `action`, source path)
    requests: Callable  # events -> impressions (user_id, request_id, request_time, item_id, ..., positive)
    item_keys: dict  # item_key -> token column (None: the item id itself)
    default_archs: tuple
    repeat_reference: bool  # items come back in the history (taobao), unlike ML ratings

    @property
    def plot_name(self) -> str:
        return f"{self.output}_auc.png"


def _read_ml100k(path, download):
    from merlin_longseq.workflows import movielens as ml

    path = path or ml.default_ml100k_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shared copy is one line short of 100,000 (u.info says so)
        return ml.read_movielens(path, download=download), str(path)


def _ml100k_requests(events):
    from merlin_longseq.workflows.movielens import daily_requests

    return daily_requests(events)


def _read_taobao(path, download):
    from merlin_longseq.workflows import taobao

    if download:
        raise ValueError("the Taobao data cannot be downloaded by this job (research-only, no redistribution): "
                         f"pass a local copy with --data or ${taobao.ENV_TAOBAO}")
    path = path or taobao.default_taobao_path()
    return taobao.read_taobao(path), str(path)


def _taobao_requests(events):
    from merlin_longseq.workflows.taobao import daily_requests

    return daily_requests(events)


DATASETS = {
    "ml-100k": RankingData("ml-100k", "MovieLens-100K", "movielens_ranking", "runs/movielens-ranking", 5, 4,
                           "rating >= 4", _read_ml100k, _ml100k_requests, {"item": None},
                           ("stca", "longer", "mean-pool", "din"), repeat_reference=False),
    "taobao": RankingData("taobao", "Taobao UserBehavior", "taobao_ranking", "runs/taobao-ranking", 4, 2,
                          "cart / fav / buy", _read_taobao, _taobao_requests, {"item": None, "category": "category_id"},
                          ARCHS, repeat_reference=True),
}


def _default_arch_options() -> dict:
    # one item embedding width (32) everywhere; towers end at 32 wide
    return {
        "stca": dict(d_model=32, n_heads=2, n_layers=2, mlp_dims=(64, 32)),
        "longer": dict(token_dim=32, d_model=32, merge_size=4, n_heads=2, n_layers=2, num_recent_queries=16,
                       head_hidden=32),
        "mean-pool": dict(d_model=32, mlp_dims=(64, 32)),
        "din": dict(d_model=32, attention_dims=(32, 16), mlp_dims=(64, 32)),
        "ultra-hstu": dict(d_model=32, n_heads=2, n_layers=2, mlp_dims=(64, 32)),  # max_seq_len: max_history
    }


def _quick_arch_options() -> dict:
    return {
        "stca": dict(d_model=8, n_heads=2, n_layers=1, mlp_dims=(8,)),
        "longer": dict(token_dim=8, d_model=8, merge_size=4, n_heads=2, n_layers=2, num_recent_queries=4,
                       head_hidden=8),
        "mean-pool": dict(d_model=8, mlp_dims=(8,)),
        "din": dict(d_model=8, attention_dims=(8,), mlp_dims=(8,)),
        "ultra-hstu": dict(d_model=8, n_heads=2, n_layers=1, mlp_dims=(8,)),
    }


# the settings a dataset changes from the config's defaults (picked on its validation split: docs/RESULTS.md), and
# those of its --quick smoke run (a few hundred users, one epoch, one seed, small models: the pipeline, not accuracy)
PRESETS = {
    "ml-100k": {},
    # picked on the validation split (one seed, mean AUC@512 over the five archs; docs/RESULTS.md): category
    # tokens over item ids, lr 1e-3 over 3e-3 and 1e-2, 4 epochs over 2 and 8
    "taobao": dict(item_key="category", learning_rate=1e-3, epochs=4, seeds=(0, 1, 2, 3, 4)),
}
QUICK = {
    "ml-100k": dict(max_users=300, max_history=64, eval_lengths=(8, 64), seeds=(0,), epochs=1, learning_rate=1e-2),
    "taobao": dict(max_users=150, max_history=64, eval_lengths=(8, 64), seeds=(0,), epochs=1, learning_rate=1e-2),
}


@dataclass
class RequestRankingConfig:
    dataset: str = "ml-100k"  # a key of DATASETS
    data_dir: str | None = None  # the dataset's folder or file; default: the dataset's copy beside the repo
    download: bool = False  # ml-100k only: fetch it from GroupLens when missing
    item_key: str = "item"  # taobao: "item" or "category" (the token of every event and candidate)
    max_users: int | None = None  # keep the first N users (by id) for a smoke run; None = all
    max_history: int = 512  # events kept per request (most recent), both splits
    eval_fraction: float = 0.2
    eval_lengths: tuple = (8, 32, 128, 512)
    archs: tuple | None = None  # None: the dataset's default (ml-100k: the four of its published table)
    seeds: tuple = (0, 1, 2)
    arch_options: dict = field(default_factory=_default_arch_options)
    epochs: int = 4
    batch_size: int = 16  # requests per batch (all candidates of a request go together: RLB)
    eval_batch_size: int = 32
    learning_rate: float = 1e-2  # picked on the validation split (--tune), see docs/RESULTS.md
    prior_weight: float = 5.0  # pseudo-candidates at the global positive rate in the rate references
    tune: bool = False  # True: evaluate on a validation split carved from the train split (eval never read)
    torch_threads: int = 1  # the CPU is shared; one thread keeps the runs polite and their timings comparable
    progress: bool = False

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {sorted(DATASETS)}")
        if self.item_key not in self.data.item_keys:
            raise ValueError(f"item_key {self.item_key!r} is not available for {self.dataset}; choose from "
                             f"{sorted(self.data.item_keys)}")
        if self.archs is None:
            self.archs = self.data.default_archs
        unknown = [a for a in self.archs if a not in ARCHS]
        if unknown or not self.archs:
            raise ValueError(f"unknown arch(s) {unknown}; choose from {ARCHS}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if not self.eval_lengths or min(self.eval_lengths) < 1 or max(self.eval_lengths) > self.max_history:
            raise ValueError(f"eval_lengths must lie in [1, max_history={self.max_history}], got {self.eval_lengths}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1 and learning_rate > 0")
        if self.prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if self.max_users is not None and self.max_users < 2:
            raise ValueError(f"max_users must be >= 2 (or None), got {self.max_users}")
        self.archs, self.seeds, self.eval_lengths = tuple(self.archs), tuple(self.seeds), tuple(self.eval_lengths)

    @property
    def data(self) -> RankingData:
        return DATASETS[self.dataset]

    @property
    def item_token(self) -> str | None:
        """The column written as the item id (None: the item id itself)."""
        return self.data.item_keys[self.item_key]

    @classmethod
    def preset(cls, dataset: str = "ml-100k", quick: bool = False, **overrides) -> "RequestRankingConfig":
        """The dataset's settings (PRESETS), or its smoke run (QUICK: small models too), with `overrides`."""
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
        values = dict(PRESETS[dataset])
        if quick:
            values.update(QUICK[dataset], arch_options=_quick_arch_options())
        values.update(overrides)
        return cls(dataset=dataset, **values)

    @classmethod
    def quick(cls, dataset: str = "ml-100k", **overrides) -> "RequestRankingConfig":
        """A few hundred users, one epoch, one seed, small models: the pipeline end to end, not the accuracy."""
        return cls.preset(dataset, quick=True, **overrides)

    def block_options(self, arch: str) -> dict:
        """The config fields of `arch`'s request block (the history's action ids are 1..num_actions)."""
        options = {"num_actions": self.data.num_actions, **self.arch_options.get(arch, {})}
        if arch == "ultra-hstu":
            options.setdefault("max_seq_len", self.max_history)
        return options


# ---- data and ETL -------------------------------------------------------------------------------------------------
def load_events(cfg: RequestRankingConfig):
    """(the dataset's event log, with its `action` column, source path)."""
    events, source = cfg.data.read(cfg.data_dir, cfg.download)
    if cfg.max_users is not None:
        keep = sorted(events["user_id"].unique())[: cfg.max_users]
        events = events[events["user_id"].isin(keep)].reset_index(drop=True)
    return events, source


def later_days(requests, fraction: float):
    """Boolean mask over the impression rows: each user's last ceil(fraction * days) request days (at least one
    for a user with two or more days, none for a user with one) -- the rule of workflows.movielens.run_request_etl."""
    per_user = requests.drop_duplicates("request_id")[["user_id", "request_id"]]
    rank_from_end = per_user.groupby("user_id").cumcount(ascending=False).to_numpy()
    days = per_user.groupby("user_id")["request_id"].transform("size").to_numpy()
    held = np.where(days >= 2, np.maximum(1, np.ceil(fraction * days)), 0)
    return requests["request_id"].isin(set(per_user["request_id"].to_numpy()[rank_from_end < held])).to_numpy()


def run_ranking_etl(events, out_dir: str, cfg: RequestRankingConfig) -> dict:
    """Request-grouped parquet `train/` and `eval/` (with tune=True: `train/` and `valid/` inside the train split).

    The requests are the dataset's (cfg.data.requests); on ml-100k the rows are those of
    workflows.movielens.run_request_etl (the rating bucket rides along as hist_action, what a rating model most
    needs to read from the history). This job adds the tuning split inside train, the spreading of the
    empty-history requests over the batches (spread_first_days) and the item_key token (build_request_workflow's
    item_token).
    """
    import merlin.io

    from merlin_longseq.workflows.request_grouping import build_request_workflow

    os.makedirs(out_dir, exist_ok=True)
    requests = cfg.data.requests(events)
    held = later_days(requests, cfg.eval_fraction)
    if cfg.tune:
        requests = requests[~held].reset_index(drop=True)  # the eval split is never read while tuning
        held = later_days(requests, cfg.eval_fraction)
    held_name = "valid" if cfg.tune else "eval"
    if not held.any() or held.all():
        raise ValueError(f"the {held_name} split is empty or takes every request ({len(requests)} requests): use more "
                         "users (max_users) or another eval_fraction")
    requests = spread_first_days(requests, cfg.batch_size, seed=0)
    token = cfg.item_token
    log = events[["user_id", "item_id", "timestamp", "action"] + ([token] if token else [])]
    workflow = build_request_workflow(log, label_columns=[LABEL], max_history=cfg.max_history,
                                      out_path=os.path.join(out_dir, "categories"), item_token=token)
    workflow.fit(merlin.io.Dataset(requests))  # one vocabulary for both splits
    paths = {"categories": os.path.join(out_dir, "categories"), "held_out": held_name}
    for split, rows in (("train", requests[~held]), (held_name, requests[held])):
        paths[split] = os.path.join(out_dir, split)
        workflow.transform(merlin.io.Dataset(rows.reset_index(drop=True))).to_parquet(paths[split], output_files=1)
    paths["evaluate"] = paths[held_name]
    return paths


def spread_first_days(requests, batch_size: int, seed: int = 0):
    """Renumber request_id so that the requests with an empty history (each user's first day) are spread evenly
    among the others, in a seeded random order.

    Why: on ML-100K most train requests are first days (a user with one day has nothing else), and RequestGrouping
    writes rows in request_id order, so without the spread whole partitions held empty histories only, which the
    merlin loader could not read (KeyError: 0) before request_dataloader learnt to. Kept so that the splits and
    the eval batches stay those of the published numbers. Nothing else reads request_id: times and the split are
    set before this.
    """
    firsts = requests.drop_duplicates("request_id")
    first_day = (firsts["user_id"] != firsts["user_id"].shift()).to_numpy()  # rows are in (user, time) order
    ids = firsts["request_id"].to_numpy()
    rng = np.random.default_rng(seed)
    empty, other = rng.permutation(ids[first_day]), rng.permutation(ids[~first_day])
    if len(other) == 0 or len(empty) / len(other) >= batch_size - 1:
        raise ValueError(f"{len(empty)} of {len(ids)} requests have an empty history: too few with one for batches "
                         f"of {batch_size} (the merlin loader fails on a batch whose histories are all empty); use "
                         "more users or a smaller batch_size")
    # evenly spaced keys in [0, 1) for each group, merged: an even interleave
    keys = np.r_[(np.arange(len(empty)) + 0.5) / len(empty), (np.arange(len(other)) + 0.25) / len(other)]
    order = np.r_[empty, other][np.argsort(keys, kind="mergesort")]
    new_id = dict(zip(order.tolist(), range(len(order))))
    return requests.assign(request_id=requests["request_id"].map(new_id).astype("int64"))


# ---- references -----------------------------------------------------------------------------------------------------
def _candidates_and_labels(batches):
    """Flat (request index, item id, label, user id) of every real candidate, plus each request's history actions
    and history item ids."""
    requests, items, labels, users, histories, hist_items = [], [], [], [], [], []
    for inputs, targets in batches:
        real = inputs["cand_item_id"] != 0
        start = len(histories)
        requests.append(np.broadcast_to(np.arange(real.shape[0])[:, None] + start, real.shape)[real.numpy()])
        items.append(inputs["cand_item_id"][real].numpy())
        labels.append(targets[LABEL][real].numpy())
        users.append(inputs["user_id"].reshape(-1, 1).expand_as(real)[real].numpy())
        for row in inputs["hist_action"].numpy():
            histories.append(row[row != 0])
        for row in inputs["hist_item_id"].numpy():
            hist_items.append(row[row != 0])
    return (np.concatenate(requests), np.concatenate(items), np.concatenate(labels).astype(float),
            np.concatenate(users), histories, hist_items)


def repeat_counts(request, items, hist_items, cap: int = REPEAT_CAP) -> np.ndarray:
    """Per candidate: how often its id occurs in its request's history, capped at `cap`."""
    counts = np.zeros(len(items), dtype=np.int64)
    for r in np.unique(request):
        at = np.flatnonzero(request == r)
        history = np.sort(hist_items[r])
        counts[at] = np.searchsorted(history, items[at], side="right") - np.searchsorted(history, items[at])
    return np.minimum(counts, cap)


def _shrunk_rate(keys, labels, size, base, prior_weight):
    """Positive rate per key value 0..size-1, shrunk towards `base` by prior_weight pseudo-candidates."""
    shown = np.bincount(keys, minlength=size)
    liked = np.bincount(keys, weights=labels, minlength=size)
    return (liked + prior_weight * base) / (shown + prior_weight)


def reference_scores(train_batches, eval_batches, cfg: RequestRankingConfig) -> dict:
    """{name: metrics} of the popularity, user-history-rate, (taobao) repeat and random scorers on the held-out
    candidates; every rate is fitted on the train split."""
    from merlin_longseq.metrics import binary_metrics

    train_request, train_items, train_labels, _, _, train_hist_items = _candidates_and_labels(train_batches)
    request, items, labels, users, histories, hist_items = _candidates_and_labels(eval_batches)
    base = float(train_labels.mean())
    size = int(max(train_items.max(), items.max())) + 1
    popularity = _shrunk_rate(train_items, train_labels, size, base, cfg.prior_weight)
    # ml-100k: the history's actions are rating buckets 1..5, positive = 4 or 5 (the label's rule); taobao:
    # cart, fav or buy (2..4)
    positive = cfg.data.positive_action
    user_rate = np.array([((h >= positive).sum() + cfg.prior_weight * base) / (len(h) + cfg.prior_weight)
                          for h in histories])
    rng = np.random.default_rng(0)
    scorers = {"popularity": popularity[items], "user history rate": user_rate[request]}
    if cfg.data.repeat_reference:
        rate = _shrunk_rate(repeat_counts(train_request, train_items, train_hist_items), train_labels,
                            REPEAT_CAP + 1, base, cfg.prior_weight)
        scorers["repeat"] = rate[repeat_counts(request, items, hist_items)]
    scorers["random"] = rng.random(len(items))
    return {name: {f"{metric}_{LABEL}": value for metric, value in binary_metrics(p, labels, users).items()}
            for name, p in scorers.items()}


# ---- the job ------------------------------------------------------------------------------------------------------
def run(run_dir: str, cfg: RequestRankingConfig | None = None, log=print) -> dict:
    """ETL once, then every (arch, seed); writes <dataset output>.json (movielens_ranking.json,
    taobao_ranking.json), report.md and the AUC-vs-length plot."""
    import torch

    cfg = cfg or RequestRankingConfig()
    os.makedirs(run_dir, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merlin / T4R deprecation noise
            return _run(run_dir, cfg, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run(run_dir: str, cfg: RequestRankingConfig, log) -> dict:
    import merlin.io
    import torch

    from merlin_longseq.t4r.request import block_for, request_dataloader
    from merlin_longseq.t4r.training import evaluate, fit, request_model

    started_all = time.perf_counter()
    events, source = load_events(cfg)
    log(f"[1/4] {len(events):,} events of {events['user_id'].nunique()} users from {source}")
    paths = run_ranking_etl(events, os.path.join(run_dir, "etl"), cfg)
    schema = merlin.io.Dataset(paths["train"], engine="parquet").schema
    # one pass of the request loader over each split, for the counts and the reference scorers
    train_batches = list(request_dataloader(paths["train"], cfg.batch_size, [LABEL]))
    eval_batches = list(request_dataloader(paths["evaluate"], cfg.eval_batch_size, [LABEL]))
    counts = {split: {"requests": sum(int(b[0]["cand_item_id"].shape[0]) for b in batches),
                      "candidates": sum(int((b[0]["cand_item_id"] != 0).sum()) for b in batches),
                      "positive_rate": float(np.mean(np.concatenate(
                          [b[1][LABEL][b[0]["cand_item_id"] != 0].numpy() for b in batches])))}
              for split, batches in (("train", train_batches), (paths["held_out"], eval_batches))}
    log(f"[2/4] request ETL -> {paths['train']}, {paths['evaluate']}: " + "; ".join(
        f"{split} {c['requests']} requests, {c['candidates']} candidates, {c['positive_rate']:.3f} positive"
        for split, c in counts.items()))
    references = reference_scores(train_batches, eval_batches, cfg)
    log("      references: " + "; ".join(f"{name} AUC {m['auc_' + LABEL]:.4f} GAUC {m['gauc_' + LABEL]:.4f}"
                                        for name, m in references.items()))
    runs = []
    jobs = [(arch, seed) for arch in cfg.archs for seed in cfg.seeds]
    for i, (arch, seed) in enumerate(jobs):
        torch.manual_seed(seed)
        model = request_model(block_for(arch).from_schema(schema, use_user_id=False, **cfg.block_options(arch)),
                              [LABEL])
        # Adam at a constant learning rate, no gradient clipping: the settings the published numbers were made with
        stats = fit(model, paths["train"], epochs=cfg.epochs, batch_size=cfg.batch_size,
                    learning_rate=cfg.learning_rate, seed=seed, progress=cfg.progress,
                    lr_scheduler_type="constant", max_grad_norm=0.0)
        row = {"arch": arch, "seed": seed, "parameters": int(sum(p.numel() for p in model.parameters())), **stats}
        for length in cfg.eval_lengths:
            metrics = evaluate(model, paths["evaluate"], batch_size=cfg.eval_batch_size, max_history=length,
                               progress=cfg.progress)
            row.update({f"{name}@{length}": metrics[name] for name in
                        (f"auc_{LABEL}", f"gauc_{LABEL}", f"logloss_{LABEL}")})
        runs.append(row)
        longest = max(cfg.eval_lengths)
        log(f"[3/4] {arch} seed {seed} ({i + 1}/{len(jobs)}): loss {stats['train_loss_first']:.4f} -> "
            f"{stats['train_loss_last']:.4f} in {stats['train_seconds']} s; AUC "
            + ", ".join(f"@{L} {row[f'auc_{LABEL}@{L}']:.4f}" for L in cfg.eval_lengths)
            + f"; GAUC@{longest} {row[f'gauc_{LABEL}@{longest}']:.4f}, logloss@{longest} "
              f"{row[f'logloss_{LABEL}@{longest}']:.4f}")
    summary = summarize(runs, cfg)
    out = {"config": asdict(cfg), "source": source, "counts": counts, "references": references, "runs": runs,
           "summary": summary, "wall_seconds": round(time.perf_counter() - started_all, 1)}
    with open(os.path.join(run_dir, f"{cfg.data.output}.json"), "w") as f:
        json.dump(out, f, indent=2, default=str)
    log("[4/4] report")
    write_report(run_dir, out, cfg, log)
    return out


def summarize(runs: list[dict], cfg: RequestRankingConfig) -> list[dict]:
    """Per arch: mean and sample std over seeds of every metric at every eval length."""
    keys = [f"{m}_{LABEL}@{L}" for L in cfg.eval_lengths for m in ("auc", "gauc", "logloss")]
    out = []
    for arch in dict.fromkeys(r["arch"] for r in runs):
        mine = [r for r in runs if r["arch"] == arch]
        row = {"arch": arch, "seeds": len(mine), "parameters": mine[0]["parameters"],
               "train_seconds": round(float(np.mean([r["train_seconds"] for r in mine])), 1)}
        for key in keys:
            values = np.array([r[key] for r in mine], dtype=float)
            row[key] = float(values.mean())
            row[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(row)
    return out


def _cell(row, key) -> str:
    return f"{row[key]:.4f} ± {row[key + '_std']:.4f}"


def tables(out: dict, cfg: RequestRankingConfig) -> str:
    """The markdown tables: metrics at the longest eval length (with the references), then AUC per length."""
    longest = max(cfg.eval_lengths)
    split = "validation split (carved from train)" if cfg.tune else "eval split"
    lines = [f"Metrics on the {split}, histories of at most {longest} events; mean ± std over "
             f"{len(cfg.seeds)} seed(s); GAUC = per-user AUC averaged over users with both labels.", "",
             "| model | AUC | GAUC | logloss | parameters | train s / seed |", "|---|---|---|---|---|---|"]
    for row in out["summary"]:
        lines.append(f"| {row['arch']} | " + " | ".join(_cell(row, f"{m}_{LABEL}@{longest}")
                                                        for m in ("auc", "gauc", "logloss"))
                     + f" | {row['parameters']:,} | {row['train_seconds']} |")
    for name, metrics in out["references"].items():
        lines.append(f"| {name} (reference) | " + " | ".join(f"{metrics[f'{m}_{LABEL}']:.4f}"
                                                            for m in ("auc", "gauc", "logloss")) + " | - | - |")
    lines += ["", "AUC by eval history length (the most recent L events):", "",
              "| model | " + " | ".join(f"L={L}" for L in cfg.eval_lengths) + " |",
              "|---|" + "---|" * len(cfg.eval_lengths)]
    for row in out["summary"]:
        lines.append(f"| {row['arch']} | " + " | ".join(_cell(row, f"auc_{LABEL}@{L}") for L in cfg.eval_lengths)
                     + " |")
    return "\n".join(lines)


def write_report(run_dir: str, out: dict, cfg: RequestRankingConfig, log=print) -> str:
    text = tables(out, cfg)
    title = f"{cfg.data.title} ranking"
    log(f"\n{title}\n" + text + "\n")
    path = os.path.join(run_dir, "report.md")
    with open(path, "a") as f:
        f.write(f"## {title}\n\n" + text + "\n\n")
        if plot_auc_vs_length(os.path.join(run_dir, cfg.data.plot_name), out, cfg):
            f.write(f"![AUC vs history length]({cfg.data.plot_name})\n\n")
    return path


def plot_auc_vs_length(path: str, out: dict, cfg: RequestRankingConfig) -> bool:
    from merlin_longseq.reporting import pyplot

    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    lengths = list(cfg.eval_lengths)
    for row in out["summary"]:
        ax.errorbar(lengths, [row[f"auc_{LABEL}@{L}"] for L in lengths],
                    yerr=[row[f"auc_{LABEL}@{L}_std"] for L in lengths], marker="o", capsize=3, label=row["arch"])
    for (name, metrics), style in zip(out["references"].items(), (":", "--", "-.", (0, (1, 3)))):
        if name != "random":
            ax.axhline(metrics[f"auc_{LABEL}"], color="gray", linestyle=style, linewidth=1, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("history length at evaluation (most recent events)")
    ax.set_ylabel(f"AUC ({cfg.data.label_text})")
    split = "validation" if cfg.tune else "eval"
    ax.set_title(f"{cfg.data.title} day requests, {split} split, mean ± std over {len(cfg.seeds)} seed(s)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, never on them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None, dataset: str | None = None) -> int:
    """The command line; `dataset` fixes the dataset (the example scripts), else --dataset picks it."""
    from merlin_longseq.jobs.movielens import apply_arguments, movielens_parser

    parser = movielens_parser(__doc__, ARCHS, None, "a few hundred users, one epoch, one seed, small models",
                              data_help="the dataset's folder or file (default: its copy beside the repo)")
    if dataset is None:
        parser.add_argument("--dataset", choices=sorted(DATASETS), default="ml-100k")
    parser.add_argument("--item-key", choices=sorted({k for d in DATASETS.values() for k in d.item_keys}),
                        help="taobao: the token of each event and candidate, its category (the preset) or its "
                             "item id")
    parser.add_argument("--lr", type=float, help="learning rate (all archs)")
    parser.add_argument("--eval-lengths", type=int, nargs="+", help="eval history lengths (each <= max history)")
    parser.add_argument("--max-users", type=int, help="keep the first N users (by id)")
    parser.add_argument("--tune", action="store_true",
                        help="evaluate on a validation split carved from the train split (never the eval split)")
    args = parser.parse_args(argv)
    dataset = dataset or args.dataset
    cfg = apply_arguments(RequestRankingConfig.preset(dataset, quick=args.quick), args, learning_rate=args.lr,
                          tune=args.tune or None, item_key=args.item_key, max_users=args.max_users,
                          eval_lengths=tuple(args.eval_lengths) if args.eval_lengths else None)
    run(args.out or DATASETS[dataset].default_out, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
