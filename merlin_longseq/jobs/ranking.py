"""The main job, ranking part: synthetic impressions -> request-grouped NVTabular ETL -> Transformers4Rec
training -> AUC / GAUC / logloss against the history length -> report.

Data: `generate_impressions` with session_order="weighted": every user has many interests, most of them
revisited rarely, and click / like labels come from the user's TRUE profile, so reading more of the history
recovers more of what decides the label. Each user's last request comes after the whole history (the eval
split, one request per user); the earlier requests are the train split (same users, earlier in time).
No user-id feature: the history is the only thing that tells users apart.

ETL (workflows.request_grouping.build_request_workflow: RequestGrouping + joint Categorify of the item lists):
  train split  histories capped at train_max_history (1,024) and cut to a Beta-drawn recent suffix
               (BetaLengthSampler, paper-style small alpha: mean 256) -- length-extrapolative training;
               window_at="loader" instead draws a fresh window per epoch in the T4R loader (RecentHistoryWindow)
  eval split   full histories up to eval_max_history (4,096), same item vocabulary as the train split
Training: for each arch, a Transformers4Rec model tr.Model(tr.Head(<block>, [RequestBinaryClassificationTask
per label])) trained by tr.Trainer (merlin_longseq.t4r.training.fit: Adam at a constant learning rate, the
Trainer's progress bar) on the T4R request loader (request_dataloader), reshuffled every epoch.
  stca       STCABlock (stacked target-to-history cross attention, request level batching)
  mean-pool  MeanPoolBlock (mean of the history tokens + target -> MLP; the no-attention baseline)
  longer     LONGERBlock (one registry entry, like the others)
Evaluation: trainer.evaluate (merlin_longseq.t4r.training.evaluate) on the eval split with each history capped
at the most recent L events, L in eval_lengths; AUC, GAUC (per-user AUC averaged over users with both classes)
and logloss per label, as the tasks' metrics (merlin_longseq.t4r.metrics). A seeded random scorer gives the
chance level. Report: table (report.md), plot of AUC against history length (ranking_auc_vs_length.png,
one line per arch), and ranking_metrics.json with every number.

Run: python -m merlin_longseq.jobs.ranking [--quick] [--arch stca ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from merlin_longseq import registry
from merlin_longseq.jobs import job_scope
from merlin_longseq.data.synthetic import SyntheticConfig, generate_impressions
from merlin_longseq.extrapolation import BetaLengthSampler

ARCHS = registry.names(registry.RANKING)
# the demo's comparison; din on request
DEFAULT_ARCHS = ("stca", "mean-pool", "longer", "ultra-hstu")
WINDOW_AT = ("etl", "loader")


def _default_data() -> SyntheticConfig:
    # 48 interests with Zipf(1.3) revisit weights: a window of 256 events shows about half of them, 4,096 nearly
    # all; every history is long enough for the 4,096-event evaluation
    return SyntheticConfig(num_users=200, num_items=1200, num_topics=300, interests_per_user=48,
                           favorites_per_topic=1, p_favorite=0.5, p_noise=0.0, mean_session_len=4.0,
                           min_history=4200, max_history=4800, session_order="weighted", interest_skew=1.3, seed=0)


def _default_arch_options() -> dict:
    return {
        "stca": dict(d_model=32, n_heads=2, n_layers=2, mlp_dims=(64, 32)),
        "mean-pool": dict(d_model=32, mlp_dims=(64, 32)),
        "din": dict(d_model=32, mlp_dims=(64, 32)),
        # issue 14's ablations (docs/RESULTS.md): merged tokens of 2 events x 16 dims (d_model 32, as STCA's), one
        # hybrid layer; the second (self-attention) layer and narrower event tokens kept it from reading the history
        "longer": dict(token_dim=16, merge_size=2, n_heads=2, n_layers=1, num_recent_queries=16, head_hidden=64),
        # the paper's semi-local attention for the history rows (K1 = 128 recent events, K2 = 32 first ones; the
        # candidates still attend to the whole history): O(L (K1 + K2)), so a CPU runs it in minutes, where the
        # full causal attention took half an hour per run (docs/RESULTS.md)
        "ultra-hstu": dict(d_model=32, n_heads=2, n_layers=2, max_seq_len=4096, mlp_dims=(64, 32), local_window=128,
                           global_prefix=32),
    }


@dataclass
class RankingJobConfig:
    data: SyntheticConfig = field(default_factory=_default_data)
    requests_per_user: int = 9  # the last one is the eval request, after the whole history
    candidates_per_request: int = 32
    labels: tuple = ("click", "like")
    train_max_history: int = 1024
    eval_max_history: int = 4096
    eval_lengths: tuple = (64, 256, 1024, 4096)
    beta_alpha: float = 0.5  # BetaLengthSampler defaults: small alpha, mean = max * 0.25 = 256 events
    beta_beta: float = 1.5
    window_at: str = "etl"  # where the Beta windows are drawn: "etl" (RequestGrouping) or "loader" (per epoch)
    archs: tuple = DEFAULT_ARCHS
    arch_options: dict = field(default_factory=_default_arch_options)
    use_user_id: bool = False
    epochs: int = 4
    batch_size: int = 16
    eval_batch_size: int = 32
    learning_rate: float = 5e-3
    seed: int = 0
    progress: bool = True
    # intra-op threads while the job runs (None: leave torch's setting). The batches are small: on the 2-core CI
    # machine, shared with other jobs, 30 STCA steps took 2.4 s on 1 thread and 41.6 s on 2 (oversubscription)
    torch_threads: int | None = 1

    def __post_init__(self):
        unknown = [a for a in self.archs if a not in ARCHS]
        if unknown or not self.archs:
            raise ValueError(f"unknown arch(s) {unknown}; choose from {ARCHS}")
        if self.window_at not in WINDOW_AT:
            raise ValueError(f"window_at must be one of {WINDOW_AT}, got {self.window_at!r}")
        if self.requests_per_user < 2:
            raise ValueError("requests_per_user must be >= 2 (the last request of each user is held out)")
        if not self.labels:
            raise ValueError("need at least one label column")
        if not self.eval_lengths or min(self.eval_lengths) < 1 or max(self.eval_lengths) > self.eval_max_history:
            raise ValueError(f"eval_lengths must lie in [1, eval_max_history={self.eval_max_history}]")
        if self.data.min_history < max(self.eval_lengths):
            warnings.warn(f"min_history={self.data.min_history} < the longest eval length {max(self.eval_lengths)}: "
                          "some eval requests have shorter histories than the cap")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        self.archs, self.labels, self.eval_lengths = tuple(self.archs), tuple(self.labels), tuple(self.eval_lengths)

    @property
    def sampler(self) -> BetaLengthSampler:
        return BetaLengthSampler(max_train_len=self.train_max_history, alpha=self.beta_alpha, beta=self.beta_beta)

    @classmethod
    def quick(cls, **overrides) -> "RankingJobConfig":
        """Tiny sizes for CI: seconds per arch, same code path."""
        values = dict(
            data=SyntheticConfig(num_users=64, num_items=120, num_topics=30, interests_per_user=8,
                                 favorites_per_topic=1, p_favorite=0.5, p_noise=0.0, mean_session_len=3.0,
                                 min_history=150, max_history=200, session_order="weighted", interest_skew=1.0,
                                 seed=0),
            requests_per_user=6, candidates_per_request=16, train_max_history=64, eval_max_history=128,
            eval_lengths=(16, 128), epochs=3, batch_size=16, learning_rate=1e-2, progress=False,
            arch_options={
                "stca": dict(d_model=16, n_heads=2, n_layers=1, mlp_dims=(16,)),
                "mean-pool": dict(d_model=16, mlp_dims=(16,)),
                "longer": dict(token_dim=4, merge_size=4, n_heads=2, n_layers=2, num_recent_queries=4,
                               head_hidden=16),
                "ultra-hstu": dict(d_model=16, n_heads=2, n_layers=1, max_seq_len=128, mlp_dims=(16,)),
            })
        values.update(overrides)
        return cls(**values)


# ---- data and ETL -----------------------------------------------------------------------------------------------
def make_data(cfg: RankingJobConfig):
    """(events, train impressions, eval impressions): the eval split is every user's last request."""
    events, impressions = generate_impressions(cfg.data, requests_per_user=cfg.requests_per_user,
                                               candidates_per_request=cfg.candidates_per_request,
                                               last_request_at_end=True)
    last = impressions.groupby("user_id")["request_id"].transform("max") == impressions["request_id"]
    return events, impressions[~last].reset_index(drop=True), impressions[last].reset_index(drop=True)


def _categorify_node(workflow):
    import nvtabular as nvt

    found = [node.op for node in _walk(workflow.output_node) if isinstance(node.op, nvt.ops.Categorify)]
    if len(found) != 1:
        raise RuntimeError(f"expected one Categorify in the request workflow, found {len(found)}")
    return found[0]


def _walk(node, seen=None):
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    yield node
    for parent in list(node.parents) + list(getattr(node, "dependencies", []) or []):
        if hasattr(parent, "op"):
            yield from _walk(parent, seen)


def run_request_etl(events, train, evaluation, out_dir: str, cfg: RankingJobConfig) -> dict:
    """Request-grouped parquet folders `train/` and `eval/` under out_dir (one item vocabulary for both)."""
    import merlin.io

    from merlin_longseq.workflows.request_grouping import build_request_workflow

    os.makedirs(out_dir, exist_ok=True)
    labels = list(cfg.labels)
    sampler = cfg.sampler if cfg.window_at == "etl" else None
    train_flow = build_request_workflow(events, label_columns=labels, max_history=cfg.train_max_history,
                                        out_path=os.path.join(out_dir, "train_categories"), length_sampler=sampler,
                                        seed=cfg.seed)
    # the vocabulary comes from every impression (train and eval candidates), so no eval item is out of vocabulary
    train_flow.fit(merlin.io.Dataset(_all_rows(train, evaluation)))
    paths = {"train": os.path.join(out_dir, "train"), "eval": os.path.join(out_dir, "eval")}
    train_flow.transform(merlin.io.Dataset(train)).to_parquet(paths["train"], output_files=1)
    # eval: full histories, and the train vocabulary handed over as a fixed vocab (no second fit of the codes)
    vocabs = dict(_categorify_node(train_flow).categories)
    eval_flow = build_request_workflow(events, label_columns=labels, max_history=cfg.eval_max_history,
                                       out_path=os.path.join(out_dir, "eval_categories"),
                                       categorify_options=dict(vocabs=vocabs))
    eval_flow.fit(merlin.io.Dataset(evaluation))
    eval_flow.transform(merlin.io.Dataset(evaluation)).to_parquet(paths["eval"], output_files=1)
    paths["workflow"] = os.path.join(out_dir, "workflow")
    eval_flow.save(paths["workflow"])  # the serving-side ETL: full histories
    return paths


def _all_rows(*frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


# ---- models -----------------------------------------------------------------------------------------------------
def build_block(arch: str, schema, cfg: RankingJobConfig):
    """The request block of `arch` from the request schema (the one changed line between archs); its sizes,
    num_actions included, come from the schema's int domains (RequestGrouping writes hist_action's)."""
    from merlin_longseq.t4r.request import block_for

    return block_for(arch).from_schema(schema, use_user_id=cfg.use_user_id, **cfg.arch_options.get(arch, {}))


def build_model(arch: str, schema, cfg: RankingJobConfig):
    """tr.Model with the block of `arch` and one task per label, scored by AUC, GAUC and logloss."""
    from merlin_longseq.t4r.training import request_model

    return request_model(build_block(arch, schema, cfg), cfg.labels)


def train_arch(model, train_path: str, cfg: RankingJobConfig) -> dict:
    """tr.Trainer training of one model; window_at="loader" draws a fresh Beta window per request and epoch."""
    from merlin_longseq.extrapolation import RecentHistoryWindow
    from merlin_longseq.t4r.training import fit

    window = RecentHistoryWindow(cfg.sampler, seed=cfg.seed) if cfg.window_at == "loader" else None
    # as this job's numbers were always made: Adam at a constant learning rate, no gradient clipping
    return fit(model, train_path, epochs=cfg.epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
               seed=cfg.seed, train_transform=window, progress=cfg.progress, lr_scheduler_type="constant",
               max_grad_norm=0.0)


# ---- the job ------------------------------------------------------------------------------------------------------
def run(run_dir: str, cfg: RankingJobConfig | None = None, log=print, models_out: dict | None = None) -> list[dict]:
    """Runs the ranking stage; returns one result dict per (arch, eval length) (ranking_metrics.json has more).

    models_out: a dict that receives each trained Transformers4Rec model under its arch (in eval mode; the core
    STCAModel / LONGERModel is the request block's `.model`), e.g. for serving them (jobs/serve_demo.py).
    Warnings are silenced and cfg.torch_threads set only while the job runs; both are restored on return.
    """
    if models_out is not None and not isinstance(models_out, dict):
        raise ValueError(f"models_out must be a dict (or None), got {type(models_out).__name__}")
    cfg = cfg or RankingJobConfig()
    os.makedirs(run_dir, exist_ok=True)
    with job_scope(cfg.torch_threads):
        return _run(run_dir, cfg, log, models_out)


def _run(run_dir: str, cfg: RankingJobConfig, log, models_out: dict | None = None) -> list[dict]:
    import merlin.io
    import torch

    from merlin_longseq.t4r.training import evaluate

    timings = {}
    started = time.perf_counter()
    log(f"[1/4] ranking data: {cfg.data.num_users} users ({cfg.data.min_history}-{cfg.data.max_history} events), "
        f"{cfg.requests_per_user} requests x {cfg.candidates_per_request} candidates each")
    events, train, evaluation = make_data(cfg)
    timings["data_seconds"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    window = (f"Beta({cfg.beta_alpha}, {cfg.beta_beta}) windows, mean {cfg.sampler.mean_length:.0f}, "
              f"max {cfg.train_max_history}, drawn in the {'ETL' if cfg.window_at == 'etl' else 'T4R loader'}")
    log(f"[2/4] NVTabular request grouping: train {train['request_id'].nunique()} requests ({window}), "
        f"eval {evaluation['request_id'].nunique()} requests (full history <= {cfg.eval_max_history})")
    paths = run_request_etl(events, train, evaluation, os.path.join(run_dir, "etl"), cfg)
    timings["etl_seconds"] = round(time.perf_counter() - started, 2)
    schema = merlin.io.Dataset(paths["train"], engine="parquet").schema

    results, train_stats = [], {}
    metric_names = [f"{m}_{label}" for label in cfg.labels for m in ("auc", "gauc", "logloss")]
    for i, arch in enumerate(cfg.archs):
        log(f"[3/4] training {arch} with the Transformers4Rec Trainer ({i + 1}/{len(cfg.archs)})")
        torch.manual_seed(cfg.seed)
        model = build_model(arch, schema, cfg)
        stats = train_arch(model, paths["train"], cfg)
        stats["parameters"] = sum(p.numel() for p in model.parameters())
        train_stats[arch] = stats
        started = time.perf_counter()
        for length in cfg.eval_lengths:  # trainer.evaluate with histories cut to the `length` most recent events
            metrics = evaluate(model, paths["eval"], batch_size=cfg.eval_batch_size, max_history=length,
                               progress=cfg.progress)
            results.append({"arch": arch, "history_len": length, **{k: metrics[k] for k in metric_names}})
        stats["eval_seconds"] = round(time.perf_counter() - started, 2)
        if models_out is not None:
            models_out[arch] = model.eval()
        log(f"      {arch}: loss {stats['train_loss_first']:.4f} -> {stats['train_loss_last']:.4f}, "
            f"{stats['train_seconds']} s, {stats['train_candidates_per_second']} candidates/s; "
            + ", ".join(f"AUC@{r['history_len']} {r['auc_' + cfg.labels[0]]:.4f}" for r in results
                        if r["arch"] == arch))
    # chance level on the same candidates (one draw; independent of the history length)
    reference = random_reference(paths["eval"], cfg)
    log("[4/4] report")
    summary = {"config": asdict(cfg), "timings": timings, "train": train_stats, "results": results,
               "random_scorer": reference}
    with open(os.path.join(run_dir, "ranking_metrics.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    write_ranking_report(run_dir, results, cfg, log=log)
    return results


def random_reference(eval_path: str, cfg: RankingJobConfig) -> dict:
    """Metrics of a seeded uniform random scorer on the eval candidates (the chance level), in file order."""
    import merlin.io

    from merlin_longseq.metrics import binary_metrics

    frame = merlin.io.Dataset(eval_path, engine="parquet").to_ddf().compute()
    users = np.repeat(frame["user_id"].to_numpy(), frame["cand_item_id"].map(len).to_numpy())
    rng = np.random.default_rng(cfg.seed)
    reference = {}
    for label in cfg.labels:
        labels = np.concatenate(frame[label].to_list()).astype(float)
        scores = rng.random(len(labels))
        reference.update({f"{name}_{label}": value for name, value in binary_metrics(scores, labels, users).items()})
    return reference


def write_ranking_report(run_dir: str, results: list[dict], cfg: RankingJobConfig, log=print):
    from merlin_longseq.reporting import write_report

    columns = ["arch", "history_len"] + [f"{m}_{label}" for label in cfg.labels for m in ("auc", "gauc", "logloss")]
    title = (f"Ranking (synthetic, eval on each user's last request; trained on Beta windows mean "
             f"{cfg.sampler.mean_length:.0f}, max {cfg.train_max_history})")
    report = write_report(run_dir, title, results, columns=columns, log=log)
    plot = "ranking_auc_vs_length.png"
    if plot_auc_vs_length(os.path.join(run_dir, plot), results, cfg):
        with open(report, "a") as f:
            f.write(f"![AUC vs history length]({plot})\n\n")
    return report


def plot_auc_vs_length(path: str, results: list[dict], cfg: RankingJobConfig) -> bool:
    from merlin_longseq.reporting import pyplot

    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(cfg.labels), figsize=(4.5 * len(cfg.labels), 3.5), squeeze=False)
    for ax, label in zip(axes[0], cfg.labels):
        for arch in dict.fromkeys(r["arch"] for r in results):
            rows = sorted((r for r in results if r["arch"] == arch), key=lambda r: r["history_len"])
            ax.plot([r["history_len"] for r in rows], [r[f"auc_{label}"] for r in rows], marker="o", label=arch)
        ax.axvline(cfg.train_max_history, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("history length at evaluation (events)")
        ax.set_ylabel(f"AUC ({label})")
        ax.set_title(f"AUC vs history length: {label}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    import datetime

    parser = argparse.ArgumentParser(prog="python -m merlin_longseq.jobs.ranking", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="run folder (default runs/ranking-<time>)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--arch", action="append", choices=ARCHS,
                        help=f"arch(s) to train (repeatable; default {', '.join(DEFAULT_ARCHS)})")
    parser.add_argument("--window-at", choices=WINDOW_AT, help="draw the Beta windows in the ETL or the loader")
    parser.add_argument("--epochs", type=int)
    args = parser.parse_args(argv)
    cfg = RankingJobConfig.quick() if args.quick else RankingJobConfig()
    changes = {k: v for k, v in (("archs", tuple(args.arch) if args.arch else None), ("window_at", args.window_at),
                                 ("epochs", args.epochs)) if v is not None}
    cfg = dataclasses.replace(cfg, **changes)
    run_dir = args.out or os.path.join("runs", datetime.datetime.now().strftime("ranking-%Y%m%d-%H%M%S"))
    print(f"ranking job -> {run_dir}")
    run(run_dir, cfg)
    print(f"report: {os.path.join(run_dir, 'report.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
