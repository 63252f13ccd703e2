"""MovieLens ranking: STCA, LONGER, mean pooling and a DIN-style baseline on ML-100K day requests.

Data (workflows.movielens): a request is one user's ratings of one calendar day (UTC); its candidates are the
items rated that day, label `positive` = rating >= 4; its history is the user's ratings strictly before the
day's first rating, most recent last, capped at max_history, with the rating bucket (1..5) as the event's
action. Each user's last ceil(eval_fraction * days) request days (at least one, for users with two or more
days) are the eval split, the earlier ones the train split; a user with a single day is train only (its one
request has an empty history). Item ids are Categorified jointly over history and candidates, one vocabulary
fitted on every request.
Tuning (tune=True): the same time rule applied INSIDE the train split makes a validation split (each user's
last train days); the eval split is not read. The table in docs/RESULTS.md uses settings picked that way.

Models: tr.Model(tr.Head(<request block>, RequestBinaryClassificationTask("positive"))) (merlin_longseq.t4r.training
.request_model), trained with tr.Trainer (training.fit) on the request loader and scored by trainer.evaluate
(training.evaluate: AUC, GAUC, logloss as the task's metrics). Every arch has the same item embedding size,
epochs, batch, optimiser (Adam) and learning rate; no user-id feature (the history is the only thing that
tells users apart).
    stca, longer, mean-pool, din     (din: merlin_longseq.t4r.din.DINBlock)
References, so the numbers can be judged: a popularity scorer (each item's positive rate on the train split,
shrunk towards the global rate by `prior_weight` pseudo-ratings, fixed before any eval run), the user's
positive rate over the request's history (same shrinkage; it only changes between a user's requests, so its
GAUC says little) and a seeded random scorer.
Metrics: AUC, GAUC (per USER: the AUC of every eval user with both labels, plain mean over those users) and
logloss, per arch and seed, with eval histories cut to the most recent L events for L in eval_lengths; mean
and sample std over seeds.

Run: python examples/movielens.py ranking [--quick] [--out DIR]   (or python -m merlin_longseq.jobs.movielens_ranking)
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

ARCHS = ("stca", "longer", "mean-pool", "din")
LABEL = "positive"
PLOT_NAME = "movielens_ranking_auc.png"


def _default_arch_options() -> dict:
    # one item embedding width (32) everywhere; towers end at 32 wide
    return {
        "stca": dict(d_model=32, n_heads=2, n_layers=2, mlp_dims=(64, 32)),
        "longer": dict(token_dim=32, d_model=32, merge_size=4, n_heads=2, n_layers=2, num_recent_queries=16,
                       head_hidden=32),
        "mean-pool": dict(d_model=32, mlp_dims=(64, 32)),
        "din": dict(d_model=32, attention_dims=(32, 16), mlp_dims=(64, 32)),
    }


@dataclass
class MovieLensRankingConfig:
    data_dir: str | None = None  # default: workflows.movielens.default_ml100k_dir()
    download: bool = False
    max_users: int | None = None  # keep the first N users (by id) for a smoke run; None = all
    max_history: int = 512  # events kept per request (most recent), both splits
    eval_fraction: float = 0.2
    eval_lengths: tuple = (8, 32, 128, 512)
    archs: tuple = ARCHS
    seeds: tuple = (0, 1, 2)
    arch_options: dict = field(default_factory=_default_arch_options)
    epochs: int = 4
    batch_size: int = 16  # requests per batch (all candidates of a request go together: RLB)
    eval_batch_size: int = 32
    learning_rate: float = 1e-2  # picked on the validation split (--tune), see docs/RESULTS.md
    prior_weight: float = 5.0  # pseudo-ratings at the global positive rate in the two rate references
    tune: bool = False  # True: evaluate on a validation split carved from the train split (eval never read)
    torch_threads: int = 1  # the CPU is shared; one thread keeps the runs polite and their timings comparable
    progress: bool = False

    def __post_init__(self):
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

    @classmethod
    def quick(cls, **overrides) -> "MovieLensRankingConfig":
        """A few hundred users, one epoch, one seed, small models: the pipeline end to end, not the accuracy."""
        values = dict(max_users=300, max_history=64, eval_lengths=(8, 64), seeds=(0,), epochs=1, learning_rate=1e-2,
                      arch_options={
                          "stca": dict(d_model=8, n_heads=2, n_layers=1, mlp_dims=(8,)),
                          "longer": dict(token_dim=8, d_model=8, merge_size=4, n_heads=2, n_layers=2,
                                         num_recent_queries=4, head_hidden=8),
                          "mean-pool": dict(d_model=8, mlp_dims=(8,)),
                          "din": dict(d_model=8, attention_dims=(8,), mlp_dims=(8,)),
                      })
        values.update(overrides)
        return cls(**values)

    def block_options(self, arch: str) -> dict:
        """The config fields of `arch`'s request block (the rating bucket 1..5 is the history's action)."""
        return {"num_actions": 5, **self.arch_options.get(arch, {})}


# ---- data and ETL -------------------------------------------------------------------------------------------------
def load_events(cfg: MovieLensRankingConfig):
    """(event log with the rating bucket as `action`, source path)."""
    from merlin_longseq.workflows import movielens as ml

    path = cfg.data_dir or ml.default_ml100k_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shared copy is one line short of 100,000 (u.info says so)
        events = ml.read_movielens(path, download=cfg.download)
    if cfg.max_users is not None:
        keep = sorted(events["user_id"].unique())[: cfg.max_users]
        events = events[events["user_id"].isin(keep)].reset_index(drop=True)
    return events, str(path)


def later_days(requests, fraction: float):
    """Boolean mask over the impression rows: each user's last ceil(fraction * days) request days (at least one
    for a user with two or more days, none for a user with one) -- the rule of workflows.movielens.run_request_etl."""
    per_user = requests.drop_duplicates("request_id")[["user_id", "request_id"]]
    rank_from_end = per_user.groupby("user_id").cumcount(ascending=False).to_numpy()
    days = per_user.groupby("user_id")["request_id"].transform("size").to_numpy()
    held = np.where(days >= 2, np.maximum(1, np.ceil(fraction * days)), 0)
    return requests["request_id"].isin(set(per_user["request_id"].to_numpy()[rank_from_end < held])).to_numpy()


def run_ranking_etl(events, out_dir: str, cfg: MovieLensRankingConfig) -> dict:
    """Request-grouped parquet `train/` and `eval/` (with tune=True: `train/` and `valid/` inside the train split).

    The rows are those of workflows.movielens.run_request_etl (the rating bucket rides along as hist_action, what
    a rating model most needs to read from the history); this job adds the tuning split inside train and the
    spreading of the empty-history requests over the batches (spread_first_days).
    """
    import merlin.io

    from merlin_longseq.workflows.movielens import daily_requests
    from merlin_longseq.workflows.request_grouping import build_request_workflow

    os.makedirs(out_dir, exist_ok=True)
    requests = daily_requests(events)
    held = later_days(requests, cfg.eval_fraction)
    if cfg.tune:
        requests = requests[~held].reset_index(drop=True)  # the eval split is never read while tuning
        held = later_days(requests, cfg.eval_fraction)
    held_name = "valid" if cfg.tune else "eval"
    if not held.any() or held.all():
        raise ValueError(f"the {held_name} split is empty or takes every request ({len(requests)} requests): use more "
                         "users (max_users) or another eval_fraction")
    requests = spread_first_days(requests, cfg.batch_size, seed=0)
    log = events[["user_id", "item_id", "timestamp", "action"]]
    workflow = build_request_workflow(log, label_columns=[LABEL], max_history=cfg.max_history,
                                      out_path=os.path.join(out_dir, "categories"))
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
    """Flat (request index, item id, label, user id) of every real candidate, plus each request's history actions."""
    requests, items, labels, users, histories = [], [], [], [], []
    for inputs, targets in batches:
        real = inputs["cand_item_id"] != 0
        start = len(histories)
        requests.append(np.broadcast_to(np.arange(real.shape[0])[:, None] + start, real.shape)[real.numpy()])
        items.append(inputs["cand_item_id"][real].numpy())
        labels.append(targets[LABEL][real].numpy())
        users.append(inputs["user_id"].reshape(-1, 1).expand_as(real)[real].numpy())
        for row in inputs["hist_action"].numpy():
            histories.append(row[row != 0])
    return (np.concatenate(requests), np.concatenate(items), np.concatenate(labels).astype(float),
            np.concatenate(users), histories)


def reference_scores(train_batches, eval_batches, cfg: MovieLensRankingConfig) -> dict:
    """{name: metrics} of the popularity, user-history-rate and random scorers on the held-out candidates."""
    from merlin_longseq.metrics import binary_metrics

    _, train_items, train_labels, _, _ = _candidates_and_labels(train_batches)
    request, items, labels, users, histories = _candidates_and_labels(eval_batches)
    base = float(train_labels.mean())
    size = int(max(train_items.max(), items.max())) + 1
    shown = np.bincount(train_items, minlength=size)
    liked = np.bincount(train_items, weights=train_labels, minlength=size)
    popularity = (liked + cfg.prior_weight * base) / (shown + cfg.prior_weight)
    # the history's actions are rating buckets 1..5: positive = 4 or 5, the label's rule
    user_rate = np.array([((h >= 4).sum() + cfg.prior_weight * base) / (len(h) + cfg.prior_weight)
                          for h in histories])
    rng = np.random.default_rng(0)
    scorers = {"popularity": popularity[items], "user history rate": user_rate[request],
               "random": rng.random(len(items))}
    return {name: {f"{metric}_{LABEL}": value for metric, value in binary_metrics(p, labels, users).items()}
            for name, p in scorers.items()}


# ---- the job ------------------------------------------------------------------------------------------------------
def run(run_dir: str, cfg: MovieLensRankingConfig | None = None, log=print) -> dict:
    """ETL once, then every (arch, seed); writes movielens_ranking.json, report.md and the AUC-vs-length plot."""
    import torch

    cfg = cfg or MovieLensRankingConfig()
    os.makedirs(run_dir, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merlin / T4R deprecation noise
            return _run(run_dir, cfg, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run(run_dir: str, cfg: MovieLensRankingConfig, log) -> dict:
    import merlin.io
    import torch

    from merlin_longseq.t4r.request import block_for, request_dataloader
    from merlin_longseq.t4r.training import evaluate, fit, request_model

    started_all = time.perf_counter()
    events, source = load_events(cfg)
    log(f"[1/4] {len(events):,} ratings of {events['user_id'].nunique()} users from {source}")
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
    with open(os.path.join(run_dir, "movielens_ranking.json"), "w") as f:
        json.dump(out, f, indent=2, default=str)
    log("[4/4] report")
    write_report(run_dir, out, cfg, log)
    return out


def summarize(runs: list[dict], cfg: MovieLensRankingConfig) -> list[dict]:
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


def tables(out: dict, cfg: MovieLensRankingConfig) -> str:
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


def write_report(run_dir: str, out: dict, cfg: MovieLensRankingConfig, log=print) -> str:
    text = tables(out, cfg)
    log("\nMovieLens-100K ranking\n" + text + "\n")
    path = os.path.join(run_dir, "report.md")
    with open(path, "a") as f:
        f.write("## MovieLens-100K ranking\n\n" + text + "\n\n")
        if plot_auc_vs_length(os.path.join(run_dir, PLOT_NAME), out, cfg):
            f.write(f"![AUC vs history length]({PLOT_NAME})\n\n")
    return path


def plot_auc_vs_length(path: str, out: dict, cfg: MovieLensRankingConfig) -> bool:
    from merlin_longseq.reporting import pyplot

    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    lengths = list(cfg.eval_lengths)
    for row in out["summary"]:
        ax.errorbar(lengths, [row[f"auc_{LABEL}@{L}"] for L in lengths],
                    yerr=[row[f"auc_{LABEL}@{L}_std"] for L in lengths], marker="o", capsize=3, label=row["arch"])
    for (name, metrics), style in zip(out["references"].items(), (":", "--", "-.")):
        if name != "random":
            ax.axhline(metrics[f"auc_{LABEL}"], color="gray", linestyle=style, linewidth=1, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("history length at evaluation (most recent events)")
    ax.set_ylabel("AUC (rating >= 4)")
    split = "validation" if cfg.tune else "eval"
    ax.set_title(f"ML-100K day requests, {split} split, mean ± std over {len(cfg.seeds)} seed(s)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    from merlin_longseq.jobs.movielens import apply_arguments, movielens_parser

    parser = movielens_parser(__doc__, ARCHS, "runs/movielens-ranking", "300 users, one epoch, one seed, small models")
    parser.add_argument("--lr", type=float, help="learning rate (all archs)")
    parser.add_argument("--tune", action="store_true",
                        help="evaluate on a validation split carved from the train split (never the eval split)")
    args = parser.parse_args(argv)
    cfg = apply_arguments(MovieLensRankingConfig.quick() if args.quick else MovieLensRankingConfig(), args,
                          learning_rate=args.lr, tune=args.tune or None)
    run(args.out, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
