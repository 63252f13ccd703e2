"""MovieLens next-item experiment: HSTU vs a SASRec-style baseline vs XLNet, all inside Transformers4Rec.

Protocol (the one of the HSTU reference code, ../shared/docs/PAPERS.md): leave-one-out per user (last event =
test, second-to-last = validation, the rest = training), full ranking of the held-out item against every item,
HR@K and NDCG@K for K in top_ks, each architecture trained with several seeds.

Every model is one Transformers4Rec model in which only the sequence block differs:
    TabularSequenceFeatures(item id embedding, causal "clm" masking)
      -> <block>
      -> NextItemPredictionTask(weight tying, sampled softmax with `num_negatives` log-uniform negatives)
  hstu     merlin_longseq.t4r.HSTUBlock (pointwise SiLU attention, relative position bias, causal)
  sasrec   tr.TransformerBlock(GPT2Config): causal softmax self-attention with learned absolute positions,
           the SASRec recipe in Transformers4Rec's own blocks
  xlnet    tr.TransformerBlock(XLNetConfig) made causal with a perm_mask (XLNetCausalPrepare). XLNet's
           default attn_type="bi" gets no causal mask from T4R under clm masking, so position i would read
           item i+1 -- its own target (`check_causal` measures it); attn_type="uni" crashes in the pinned
           transformers 4.30.2 (XLNetModel.create_mask passes a device as a size).
Same embedding size, layers, heads, dropout, sequence length, epochs, batch, optimiser and loss for all.
The item embedding is the only input (no rating or time feature), as in SASRec and the reference's ML runs.

`l2_normalize` (on in the published recipe, `--recipe published`) puts every item embedding and every sequence
output on the unit sphere, so a logit is a cosine divided by `softmax_temperature`, as the HSTU reference scores:
a torch parametrization on T4R's item-id nn.Embedding (read by the input lookup and, through weight tying, by
the output layer) and an L2Normalize block after the sequence block; applied identically to every arch.

Run: python examples/movielens.py next-item [--quick] [--recipe published] [--out DIR]
     (or python -m merlin_longseq.jobs.movielens)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

from merlin_longseq.jobs import job_scope

ARCHS = ("hstu", "sasrec", "xlnet")
SPLIT_PREFIX = {"valid": "valid", "test": "test"}


@dataclass
class MovieLensJobConfig:
    data_dir: str | None = None  # default: workflows.movielens.default_ml100k_dir()
    download: bool = False
    max_users: int | None = None  # keep the first N users (by id) for a smoke run; None = all
    # 100 covers the whole history of 62% of ML-100K users (median 65 ratings); the reference uses 200 on ML-1M
    max_seq_len: int = 100
    min_user_events: int = 5
    d_model: int = 50
    n_heads: int = 1
    n_layers: int = 2
    dropout: float = 0.2
    # sized for a shared 2-core CPU: one thread, a few seconds per epoch per model at these sizes
    epochs: int = 25
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    sampled_softmax: bool = True  # False: full softmax over every item
    num_negatives: int = 128
    # T4R draws its negatives log-uniformly over frequency-sorted ids (ids near 1,000 have p ~ 1e-4, so the tail
    # is almost never a negative); "uniform" swaps in equal probabilities, as the HSTU reference samples
    negative_sampler: str = "log-uniform"
    softmax_temperature: float = 1.0  # logits are divided by it (with l2_normalize: cosine / temperature)
    # unit-norm item embeddings (input and tied output: padding row kept zero) and unit-norm sequence outputs
    l2_normalize: bool = False
    archs: tuple = ARCHS
    seeds: tuple = (0, 1, 2)
    top_ks: tuple = (10, 50)
    arch_options: dict = field(default_factory=dict)  # per-arch overrides, e.g. {"hstu": {"dropout": 0.1}}
    torch_threads: int = 1  # the CPU is shared; one thread keeps the runs polite and their timings comparable

    def __post_init__(self):
        unknown = [a for a in self.archs if a not in ARCHS]
        if unknown:
            raise ValueError(f"unknown arch(s) {unknown}; choose from {ARCHS}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.epochs < 1 or self.batch_size < 1 or self.max_seq_len < 2:
            raise ValueError("epochs and batch_size must be >= 1 and max_seq_len >= 2")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.negative_sampler not in ("log-uniform", "uniform"):
            raise ValueError(f"negative_sampler must be 'log-uniform' or 'uniform', got {self.negative_sampler!r}")
        if self.softmax_temperature <= 0:
            raise ValueError(f"softmax_temperature must be > 0, got {self.softmax_temperature}")

    @classmethod
    def quick(cls, **overrides) -> "MovieLensJobConfig":
        """A few hundred users, one epoch, one seed: the pipeline end to end, not the accuracy."""
        return cls(**{**QUICK_SIZES, **overrides})

    @classmethod
    def published(cls, **overrides) -> "MovieLensJobConfig":
        """The HSTU reference's MovieLens recipe (PUBLISHED_RECIPE), with `overrides` on top."""
        return cls(**{**PUBLISHED_RECIPE, **overrides})


QUICK_SIZES = dict(max_users=200, max_seq_len=50, d_model=16, epochs=1, batch_size=64, seeds=(0,), num_negatives=32)

# The HSTU reference's ML-1M / ML-20M setup (../shared/docs/PAPERS.md; its configs/ml-1m/*.gin): 200 events,
# embedding 50, 2 layers x 1 head, dropout 0.2, AdamW lr 1e-3 without weight decay, batch 128, sampled softmax
# with 128 uniform negatives, temperature 0.05 on L2-normalised embeddings, ~100 epochs. On ml-latest-small
# (610 users: 5 steps an epoch) an epoch takes ~3.5 s for HSTU or SASRec and ~5 s for XLNet on one CPU thread.
PUBLISHED_RECIPE = dict(max_seq_len=200, d_model=50, n_heads=1, n_layers=2, dropout=0.2, learning_rate=1e-3,
                        weight_decay=0.0, batch_size=128, sampled_softmax=True, num_negatives=128,
                        negative_sampler="uniform", softmax_temperature=0.05, l2_normalize=True, epochs=100)
RECIPES = {"published": PUBLISHED_RECIPE}


def build_model(schema, arch: str, cfg: MovieLensJobConfig):
    """The Transformers4Rec model; `arch` picks the sequence block, nothing else changes."""
    import transformers4rec.torch as tr
    from transformers4rec.torch.ranking_metric import NDCGAt, RecallAt

    from merlin_longseq.t4r import HSTUBlock
    from merlin_longseq.t4r.causal import xlnet_causal_prepare
    from merlin_longseq.t4r.normalize import L2Normalize, l2_normalize_embedding

    opts = {"dropout": cfg.dropout, **cfg.arch_options.get(arch, {})}
    dropout = opts.pop("dropout")
    input_module = tr.TabularSequenceFeatures.from_schema(
        schema, max_sequence_length=cfg.max_seq_len, aggregation="concat", masking="clm",
        embedding_dim_default=cfg.d_model)
    # one item-id feature and no d_output: the block sees the raw d_model item embeddings (no ReLU projection)
    if arch == "hstu":
        config = tr.XLNetConfig.build(d_model=cfg.d_model, n_head=cfg.n_heads, n_layer=cfg.n_layers,
                                      total_seq_length=cfg.max_seq_len)
        opts.setdefault("num_position_buckets", 128)
        block = HSTUBlock(config, masking=input_module.masking, dropout=dropout, max_seq_len=cfg.max_seq_len,
                          **opts)
    elif arch == "sasrec":
        config = tr.GPT2Config.build(d_model=cfg.d_model, n_head=cfg.n_heads, n_layer=cfg.n_layers,
                                     total_seq_length=cfg.max_seq_len, dropout=dropout, **opts)
        block = tr.TransformerBlock(config, masking=input_module.masking)
    elif arch == "xlnet":
        causal = opts.pop("causal", True)
        config = tr.XLNetConfig.build(d_model=cfg.d_model, n_head=cfg.n_heads, n_layer=cfg.n_layers,
                                      total_seq_length=cfg.max_seq_len, dropout=dropout, **opts)
        block = tr.TransformerBlock(config, masking=input_module.masking,
                                    prepare_module=xlnet_causal_prepare() if causal else None)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    body = tr.SequentialBlock(input_module, block, L2Normalize()) if cfg.l2_normalize \
        else tr.SequentialBlock(input_module, block)
    top_ks = list(cfg.top_ks)
    metrics = [NDCGAt(top_ks=top_ks, labels_onehot=True), RecallAt(top_ks=top_ks, labels_onehot=True)]
    task = tr.NextItemPredictionTask(weight_tying=True, metrics=metrics, sampled_softmax=cfg.sampled_softmax,
                                     max_n_samples=cfg.num_negatives,
                                     softmax_temperature=cfg.softmax_temperature)
    model = tr.Model(tr.Head(body, task, inputs=input_module))
    if cfg.l2_normalize:
        # after the Head is built: the task holds the same nn.Embedding as the input lookup (weight tying)
        if task.item_embedding_table is not input_module.item_embedding_table:
            raise RuntimeError("the next-item task does not share the input's item embedding table")
        l2_normalize_embedding(input_module.item_embedding_table)
    if cfg.sampled_softmax and cfg.negative_sampler == "uniform":
        _make_negatives_uniform(model)
    return model


def _make_negatives_uniform(model) -> None:
    """Give T4R's LogUniformSampler equal probabilities over the ids it may draw (those above padding).

    The sampler keeps its distribution in two buffers; with equal probabilities its logQ correction is one
    constant for every logit and cancels in the softmax, leaving plain sampled softmax with uniform negatives.
    It also draws n_sample = 2 x max_n_samples ids, then keeps the first max_n_samples of `.unique()`, which
    SORTS them: the kept negatives are the lowest ids (the most popular ones). Drawing max_n_samples ids makes
    the cut a no-op, so the negatives stay uniform.
    """
    import torch
    from transformers4rec.torch.model.prediction_task import LogUniformSampler

    samplers = [m for m in model.modules() if isinstance(m, LogUniformSampler)]
    if not samplers:
        raise RuntimeError("no LogUniformSampler in the model: is sampled_softmax on?")
    for sampler in samplers:
        allowed = sampler.dist > 0  # the sampler zeroes the ids below its min_id (padding)
        dist = torch.where(allowed, 1.0 / allowed.sum(), 0.0).to(sampler.dist.dtype)
        sampler.dist = dist
        sampler.n_sample = sampler.max_n_samples
        sampler.unique_sampling_dist = sampler.get_unique_sampling_distr(dist, sampler.n_sample)


def _prepare_events(cfg: MovieLensJobConfig):
    from merlin_longseq.workflows import movielens as ml

    path = cfg.data_dir or ml.default_ml100k_dir()
    events = ml.read_movielens(path, download=cfg.download)
    if cfg.max_users is not None:
        keep = sorted(events["user_id"].unique())[: cfg.max_users]
        events = events[events["user_id"].isin(keep)].reset_index(drop=True)
    return events, str(path)


def train_and_evaluate(paths: dict, schema, arch: str, seed: int, cfg: MovieLensJobConfig, run_dir: str) -> dict:
    """Train one (arch, seed) with tr.Trainer; evaluate on valid and test with full ranking."""
    import torch
    import transformers4rec.torch as tr
    from transformers4rec.config.trainer import T4RecTrainingArguments

    torch.manual_seed(seed)
    model = build_model(schema, arch, cfg)
    args = T4RecTrainingArguments(
        output_dir=os.path.join(run_dir, "trainer", f"{arch}-{seed}"), max_sequence_length=cfg.max_seq_len,
        data_loader_engine="merlin", num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=256, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        lr_scheduler_type="constant", warmup_steps=0, report_to=[], logging_steps=10 ** 9, save_strategy="no",
        no_cuda=True, seed=seed, data_seed=seed, disable_tqdm=True,
    )
    trainer = tr.Trainer(model=model, args=args, schema=schema, compute_metrics=True)
    trainer.train_dataset_or_path = paths["train"]
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started
    row = {"arch": arch, "seed": seed, "train_loss": float(result.training_loss),
           "train_seconds": round(train_seconds, 1),
           "params": int(sum(p.numel() for p in model.parameters()))}
    for split in ("valid", "test"):
        # T4R's eval loader reads eval_dataset_or_path (its evaluate() ignores an eval_dataset argument)
        trainer.eval_dataset_or_path = paths[split]
        metrics = trainer.evaluate(metric_key_prefix=split)
        for k in cfg.top_ks:
            row[f"{split}_hr@{k}"] = float(metrics[f"{split}_/next-item/recall_at_{k}"])
            row[f"{split}_ndcg@{k}"] = float(metrics[f"{split}_/next-item/ndcg_at_{k}"])
    row["model"] = model
    return row


def summarize(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Per arch: mean and sample standard deviation over seeds of each metric."""
    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = [r for r in rows if r["arch"] == arch]
        summary = {"arch": arch, "seeds": len(mine)}
        for m in metrics:
            values = [r[m] for r in mine]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            summary[m], summary[f"{m}_std"] = mean, std
        summary["train_seconds"] = round(sum(r["train_seconds"] for r in mine) / len(mine), 1)
        out.append(summary)
    return out


def markdown_table(summary: list[dict], metrics: list[str]) -> str:
    header = "| model | " + " | ".join(metrics) + " | train s / seed |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for s in summary:
        cells = [f"{s[m]:.4f} ± {s[m + '_std']:.4f}" for m in metrics]
        lines.append(f"| {s['arch']} | " + " | ".join(cells) + f" | {s['train_seconds']} |")
    return "\n".join(lines)


def plot_summary(path: str, summary: list[dict], metrics: list[str], title: str) -> bool:
    from merlin_longseq.reporting import pyplot

    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(summary)
    for i, s in enumerate(summary):
        xs = [x + i * width for x in range(len(metrics))]
        ax.bar(xs, [s[m] for m in metrics], width, yerr=[s[m + "_std"] for m in metrics], capsize=3,
               label=s["arch"])
    ax.set_xticks([x + width * (len(summary) - 1) / 2 for x in range(len(metrics))])
    ax.set_xticklabels(metrics)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(run_dir: str, cfg: MovieLensJobConfig | None = None, log=print) -> dict:
    """ETL once, then every (arch, seed); writes movielens_next_item.json, report.md and a plot."""
    cfg = cfg or MovieLensJobConfig()
    with job_scope(cfg.torch_threads):
        return _run(run_dir, cfg, log)


def _run(run_dir: str, cfg: MovieLensJobConfig, log) -> dict:
    import merlin.io

    from merlin_longseq.workflows.movielens import run_leave_one_out_etl

    os.makedirs(run_dir, exist_ok=True)
    events, source = _prepare_events(cfg)
    log(f"[1/3] {len(events):,} ratings of {events['user_id'].nunique()} users, {events['item_id'].nunique()} "
        f"items from {source}")
    paths = run_leave_one_out_etl(events, os.path.join(run_dir, "etl"), max_seq_len=cfg.max_seq_len,
                                  min_user_events=cfg.min_user_events)
    schema = merlin.io.Dataset(paths["train"], engine="parquet").schema.select_by_name(["item_id_seq"])
    log(f"[2/3] leave-one-out ETL -> {paths['train']} (+valid, test); item ids 0..{paths['num_items'] - 1}")
    rows = []
    runs = [(arch, seed) for arch in cfg.archs for seed in cfg.seeds]
    for i, (arch, seed) in enumerate(runs):
        log(f"[3/3] training {arch} seed {seed} ({i + 1}/{len(runs)}), {cfg.epochs} epoch(s)")
        row = train_and_evaluate(paths, schema, arch, seed, cfg, run_dir)
        row.pop("model")
        rows.append(row)
        log("      " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    metrics = [f"{split}_{m}@{k}" for split in ("test", "valid") for k in cfg.top_ks for m in ("hr", "ndcg")]
    summary = summarize(rows, metrics)
    test_metrics = [m for m in metrics if m.startswith("test_")]
    table = markdown_table(summary, test_metrics)
    log("\nMovieLens next-item, test split (mean ± std over seeds)\n" + table + "\n")
    out = {"config": asdict(cfg), "source": source, "num_items": paths["num_items"],
           "num_users": int(events["user_id"].nunique()), "runs": rows, "summary": summary}
    with open(os.path.join(run_dir, "movielens_next_item.json"), "w") as f:
        json.dump(out, f, indent=2, default=str)
    plotted = plot_summary(os.path.join(run_dir, "movielens_next_item.png"), summary, test_metrics,
                           f"MovieLens next-item (test, {len(cfg.seeds)} seed(s))")
    with open(os.path.join(run_dir, "report.md"), "a") as f:
        f.write("## MovieLens next-item (test split, mean ± std over seeds)\n\n" + table + "\n\n")
        f.write("Validation split:\n\n" + markdown_table(summary, [m for m in metrics if m.startswith("valid_")])
                + "\n\n")
        if plotted:
            f.write("![MovieLens next-item](movielens_next_item.png)\n\n")
    return out


def movielens_parser(doc: str, archs, default_out: str | None, quick_help: str,
                     data_help: str = "MovieLens folder or ratings file (default: ML-100K beside the repo)"
                     ) -> argparse.ArgumentParser:
    """The arguments every MovieLens job takes (this one and jobs/request_ranking.py, which also runs Taobao)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out, help="run folder")
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--download", action="store_true", help="fetch the dataset from GroupLens if missing")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--arch", action="append", choices=archs, help="repeatable; default: the job's preset")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the job's preset")
    parser.add_argument("--epochs", type=int)
    return parser


def apply_arguments(cfg, args, **job_changes):
    """cfg with the shared arguments (and the job's own changes) replaced wherever they were given."""
    changes = {"data_dir": args.data, "download": args.download or None,
               "archs": tuple(args.arch) if args.arch else None,
               "seeds": tuple(args.seeds) if args.seeds else None, "epochs": args.epochs, **job_changes}
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})


def job_preset(recipe: str | None = None, quick: bool = False) -> dict:
    """MovieLensJobConfig keyword arguments: the recipe's (none: the defaults), then --quick's sizes on top."""
    values = dict(RECIPES[recipe]) if recipe else {}
    if quick:
        values.update(QUICK_SIZES)
    return values


def main(argv=None) -> int:
    parser = movielens_parser(__doc__, ARCHS, "runs/movielens-next-item", "a few hundred users, one epoch, one seed")
    parser.add_argument("--uniform-negatives", action="store_true",
                        help="sampled softmax with uniform negatives instead of T4R's log-uniform ones")
    parser.add_argument("--full-softmax", action="store_true",
                        help="train with a full softmax over all items instead of T4R's sampled softmax")
    parser.add_argument("--max-seq-len", type=int,
                        help="most recent events per user the models read (default 100; 200 in the published recipe)")
    parser.add_argument("--recipe", choices=sorted(RECIPES),
                        help="start from a preset instead of the defaults: 'published' = the HSTU reference's "
                             "(200 events, L2-normalised embeddings, temperature 0.05, 128 uniform negatives, "
                             "lr 1e-3, batch 128, dropout 0.2, embedding 50); other flags apply on top")
    args = parser.parse_args(argv)
    cfg = MovieLensJobConfig(**job_preset(args.recipe, args.quick))
    cfg = apply_arguments(cfg, args, sampled_softmax=False if args.full_softmax else None,
                          max_seq_len=args.max_seq_len,
                          negative_sampler="uniform" if args.uniform_negatives else None)
    run(args.out, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
