"""Architecture ablations on the main job's synthetic ranking data (issue 14: why LONGER did not read the
history, and what makes each architecture's AUC rise with the history length).

Each variant is the ranking job's model of --arch (jobs/ranking.py: same data, ETL, learning rate, batch, epochs
and evaluation lengths) with a few options changed; the data and ETL are made once (or read from --etl, the
etl/ folder of a ranking run) and shared. Two engines train the same model on the same request parquet:
  t4r    the job's own path, tr.Trainer over the request loader (needs the Merlin stack);
  torch  a plain loop (Adam, the same shuffled batches of requests, BCE per task) over RequestBatch tensors,
         for the GPU machine, which cannot install Transformers4Rec; it reads the parquet with pyarrow only.
Writes ablation.json and report.md (training loss first/last epoch, click AUC at each evaluation length).

    python examples/ranking_ablation.py --out runs/longer-ablation --etl runs/ranking/etl   # every variant
    python examples/ranking_ablation.py --arch ultra-hstu --engine torch --etl etl --out out --variant base
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

# LONGER as the job ran it before issue 14: the job's sizes, then the model's old defaults
OLD_JOB = {"token_dim": 8, "merge_size": 4, "n_layers": 2}
OLD_MODEL = {"target_product": False, "aligned_init": False, "layer1_global_keys": True,
             "global_tokens": ("target", "cls", "target_x_history")}
BEFORE = {**OLD_JOB, **OLD_MODEL}
# the two init / head changes on, the rest as before
FIXED = {**OLD_JOB, "layer1_global_keys": True, "global_tokens": OLD_MODEL["global_tokens"]}
# one layer, the target's layer-1 query over the merged history only, target as the only global token
SIMPLE = {"global_tokens": ("target",), "layer1_global_keys": False, "n_layers": 1}

# arch -> name -> (what it tests, model option overrides of the job's, job overrides)
VARIANTS = {
    "longer": {
        "before": ("the job's LONGER before issue 14 (K = 4, width 8, 2 layers)", BEFORE, {}),
        "lr-1e-3": ("learning rate 1e-3 instead of 5e-3", BEFORE, {"learning_rate": 1e-3}),
        "k1-d32": ("no merge: K = 1, token width 32", {**BEFORE, "merge_size": 1, "token_dim": 32}, {}),
        "d32": ("token width 32 (d_model 128)", {**BEFORE, "token_dim": 32}, {}),
        "mean": ("merge mode mean", {**BEFORE, "merge_mode": "mean", "d_model": 32}, {}),
        "concat": ("merge mode concat", {**BEFORE, "merge_mode": "concat"}, {}),
        "target-only": ("global tokens: target only", {**BEFORE, "global_tokens": ("target",)}, {}),
        "one-layer": ("one layer (cross attention only)", {**BEFORE, "n_layers": 1}, {}),
        "no-recent": ("one recent query (k = 1)", {**BEFORE, "num_recent_queries": 1}, {}),
        "product": ("+ target product in the head", {**BEFORE, "target_product": True}, {}),
        "aligned": ("+ aligned init (keys = queries, target in the merged item subspace)",
                    {**BEFORE, "aligned_init": True}, {}),
        "fixed": ("+ product + aligned init", FIXED, {}),
        "fixed-k1-d32": ("fixed, no merge (K = 1, width 32)", {**FIXED, "merge_size": 1, "token_dim": 32}, {}),
        "fixed-d32": ("fixed, token width 32 (d_model 128)", {**FIXED, "token_dim": 32}, {}),
        "fixed-history-keys": ("fixed, layer-1 global queries see the merged history only",
                               {**FIXED, "layer1_global_keys": False}, {}),
        "fixed-d32-history-keys": ("fixed-history-keys, token width 32 (d_model 128)",
                                   {**FIXED, "layer1_global_keys": False, "token_dim": 32}, {}),
        "simple-k1": ("fixed, K = 1, width 32, target token only, history keys, one layer",
                      {**SIMPLE, "merge_size": 1, "token_dim": 32}, {}),
        "simple-k1-2l": ("simple-k1 with two layers (the self-attention layer over globals and recent tokens)",
                         {**SIMPLE, "merge_size": 1, "token_dim": 32, "n_layers": 2}, {}),
        "simple-k1-cls": ("simple-k1, global tokens target and cls", {**SIMPLE, "merge_size": 1, "token_dim": 32,
                                                                       "global_tokens": ("target", "cls")}, {}),
        "simple-k1-globals": ("simple-k1, global tokens target, cls, target_x_history",
                              {**SIMPLE, "merge_size": 1, "token_dim": 32,
                               "global_tokens": OLD_MODEL["global_tokens"]}, {}),
        "simple-k1-global-keys": ("simple-k1, global queries also see the global tokens",
                                  {**SIMPLE, "merge_size": 1, "token_dim": 32, "layer1_global_keys": True}, {}),
        "simple-k2-d16": ("simple-k1 with K = 2, width 16 (d_model 32)", {**SIMPLE, "merge_size": 2, "token_dim": 16},
                          {}),
        "simple-k4-d8": ("simple-k1 with K = 4, width 8 (d_model 32)", {**SIMPLE, "merge_size": 4, "token_dim": 8}, {}),
        "simple-k4-dm32": ("simple-k1 with K = 4, width 32, merged tokens projected to 32",
                           {**SIMPLE, "merge_size": 4, "token_dim": 32, "d_model": 32}, {}),
        "job": ("the job's LONGER after issue 14 (K = 2, width 16, one layer, target + cls)", {}, {}),
        "job-2l": ("the job's LONGER with a second (self-attention) layer", {"n_layers": 2}, {}),
        "job-global-keys": ("the job's LONGER, layer-1 global queries also see the global tokens",
                            {"layer1_global_keys": True}, {}),
        "job-x-history": ("the job's LONGER + the target_x_history global token",
                          {"global_tokens": OLD_MODEL["global_tokens"]}, {}),
    },
    "ultra-hstu": {
        "base": ("the job's ULTRA-HSTU", {}, {}),
        "local": ("history rows semi-local (window 64)", {"local_window": 64}, {}),
        "one-layer": ("one layer", {"n_layers": 1}, {}),
        "qk-linear": ("Q and K without SiLU (qk_activation linear): SiLU(q.k) can vanish on unrelated events",
                      {"qk_activation": "linear"}, {}),
        "qk-linear-1l": ("qk-linear, one layer", {"qk_activation": "linear", "n_layers": 1}, {}),
        "qk-linear-d64": ("qk-linear, d_model 64", {"qk_activation": "linear", "d_model": 64}, {}),
        "qk-linear-lr1e-3": ("qk-linear, learning rate 1e-3", {"qk_activation": "linear"}, {"learning_rate": 1e-3}),
        "bf16": ("mixed precision (bf16 autocast)", {"mixed_precision": True}, {}),
    },
    "stca": {
        "base": ("the job's STCA", {}, {}),
    },
    "mean-pool": {
        "base": ("the job's mean pooling", {}, {}),
    },
    "din": {
        "base": ("the job's DIN (d_model 32, MLP 64, 32)", {}, {}),
    },
}


def _t4r_engine(cfg, arch, paths):
    """(train, evaluate(length) -> metrics) through the job's tr.Trainer path."""
    import merlin.io

    from merlin_longseq.jobs import ranking
    from merlin_longseq.t4r.training import evaluate

    schema = merlin.io.Dataset(paths["train"], engine="parquet").schema
    model = ranking.build_model(arch, schema, cfg)
    stats = ranking.train_arch(model, paths["train"], cfg)

    def score(length):
        metrics = evaluate(model, paths["eval"], batch_size=cfg.eval_batch_size, max_history=length, progress=False)
        return {k: metrics[k] for k in ("auc_click", "gauc_click", "logloss_click")}

    return stats["train_loss_first"], stats["train_loss_last"], score


def _torch_engine(cfg, arch, paths, device):
    """The same model and data in a plain loop (no Transformers4Rec): see the module docstring."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from merlin_longseq import registry
    from merlin_longseq.metrics import binary_metrics
    from merlin_longseq.train_ddp import read_request_parquet

    labels = list(cfg.labels)
    train = read_request_parquet(paths["train"], labels)
    evaluation = read_request_parquet(paths["eval"], labels)
    entry = registry.get(arch)
    options = dict(cfg.arch_options.get(arch, {}))
    if "length_sampler" in {f.name for f in dataclasses.fields(entry.config_class)} and cfg.window_at == "loader":
        options["length_sampler"] = cfg.sampler
    model_cfg = entry.config_class(num_items=max(train.num_items, evaluation.num_items),
                                   num_actions=max(train.num_actions, evaluation.num_actions), **options)
    model = entry.model_class(model_cfg.with_tasks(labels)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    gen = torch.Generator().manual_seed(cfg.seed)
    epoch_losses = []
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(train.num_requests, generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            batch = train.select(order[start:start + cfg.batch_size]).to(device)
            logits = model(**batch.model_inputs).float()
            # one BCE per task (mean over candidates), summed over tasks, as the T4R head sums its tasks' losses
            loss = sum(F.binary_cross_entropy_with_logits(logits[:, i], batch.labels[:, i]) for i in range(len(labels)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss), count + 1
        epoch_losses.append(total / max(count, 1))

    @torch.no_grad()
    def score(length):
        model.eval()
        data = evaluation.recent(length)
        probs, truth, users = [], [], []
        for start in range(0, data.num_requests, cfg.eval_batch_size):
            batch = data.select(torch.arange(start, min(start + cfg.eval_batch_size, data.num_requests))).to(device)
            probs.append(torch.sigmoid(model(**batch.model_inputs).float()[:, 0]).cpu().numpy())
            truth.append(batch.labels[:, 0].cpu().numpy())
            users.append(np.repeat(batch.user_ids.cpu().numpy(), batch.candidate_counts.cpu().numpy()))
        metrics = binary_metrics(np.concatenate(probs), np.concatenate(truth), np.concatenate(users))
        return {f"{k}_click": v for k, v in metrics.items()}

    return epoch_losses[0], epoch_losses[-1], score


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--arch", default="longer", choices=sorted(VARIANTS))
    parser.add_argument("--variant", action="append", help="repeatable; default every variant of --arch")
    parser.add_argument("--engine", choices=("t4r", "torch"), default="t4r")
    parser.add_argument("--device", default="cuda", help="torch engine: cuda (when available) or cpu")
    parser.add_argument("--quick", action="store_true", help="the job's tiny preset (a smoke run)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, action="append", help="repeatable; default 0")
    parser.add_argument("--etl", help="reuse the etl/ folder of an earlier ranking run (same data and seed)")
    args = parser.parse_args(argv)
    names = args.variant or list(VARIANTS[args.arch])
    unknown = [n for n in names if n not in VARIANTS[args.arch]]
    if unknown:
        parser.error(f"unknown variant(s) {unknown} of {args.arch}; choose from {sorted(VARIANTS[args.arch])}")

    import torch

    from merlin_longseq.jobs import job_scope
    from merlin_longseq.jobs.ranking import RankingJobConfig

    base = (RankingJobConfig.quick if args.quick else RankingJobConfig)(archs=(args.arch,), progress=False)
    if args.epochs:
        base = dataclasses.replace(base, epochs=args.epochs)
    device = torch.device(args.device if args.device == "cpu" or torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "ablation.json")
    rows = json.load(open(results_path)) if os.path.exists(results_path) else []
    with job_scope(base.torch_threads if device.type == "cpu" else None):
        if args.etl:
            paths = {name: os.path.join(args.etl, name) for name in ("train", "eval")}
        else:
            from merlin_longseq.jobs import ranking

            events, train, evaluation = ranking.make_data(base)
            paths = ranking.run_request_etl(events, train, evaluation, os.path.join(args.out, "etl"), base)
        for name in names:
            for seed in args.seed or [0]:
                what, options, job = VARIANTS[args.arch][name]
                cfg = dataclasses.replace(base, seed=seed, **job)
                cfg.arch_options = {**cfg.arch_options, args.arch: {**cfg.arch_options.get(args.arch, {}), **options}}
                torch.manual_seed(seed)
                started = time.perf_counter()
                if args.engine == "t4r":
                    first, last, score = _t4r_engine(cfg, args.arch, paths)
                else:
                    first, last, score = _torch_engine(cfg, args.arch, paths, device)
                row = {"arch": args.arch, "variant": name, "seed": seed, "engine": args.engine, "what": what,
                       "options": {**options, **job}, "loss_first": round(first, 4), "loss_last": round(last, 4),
                       "train_seconds": round(time.perf_counter() - started, 1)}
                for length in cfg.eval_lengths:
                    row[f"auc@{length}"] = round(score(length)["auc_click"], 4)
                print(json.dumps(row, default=str), flush=True)
                key = (row["arch"], name, seed, args.engine)
                rows = [r for r in rows if (r["arch"], r["variant"], r["seed"], r["engine"]) != key] + [row]
                with open(results_path, "w") as f:
                    json.dump(rows, f, indent=1, default=str)
    lengths = [k for k in rows[0] if k.startswith("auc@")] if rows else []
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("| arch | variant | engine | seed | what | loss first -> last | " + " | ".join(lengths) + " |\n")
        f.write("|---|---|---|---|---|---|" + "---|" * len(lengths) + "\n")
        for r in rows:
            f.write(f"| {r['arch']} | {r['variant']} | {r['engine']} | {r['seed']} | {r['what']} | "
                    f"{r['loss_first']:.4f} -> {r['loss_last']:.4f} | " + " | ".join(f"{r[k]:.4f}" for k in lengths)
                    + " |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
