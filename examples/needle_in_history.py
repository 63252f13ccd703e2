"""Needle in the history: can a ranking model still find one matching event when the history is longer than
the ones it was trained on? (issue 14: why ULTRA-HSTU's AUC stays flat with the history length)

Writes needle.json and report.md to --out. Data: every history is `length` uniformly random items out of `num_items`; half the candidates are an item of
their own request's history (label 1), half random (label 0, unless drawn from the history). Each model is
trained on histories of --train-len events and evaluated, untouched, on histories of 1x, 4x and 16x that length:
the needle stays one event while the background grows.

  stca         softmax target attention: the weights are normalised, so the needle keeps its share
  ultra-hstu   pointwise SiLU(q.k) / N attention: every background event adds its own term to the sum
  ultra-hstu-linear   the same with qk_activation="linear" (Q, K without SiLU)

One layer each, d_model 32, Adam 3e-3, 16 requests x 4 candidates per step, CPU (PyTorch references).

    python examples/needle_in_history.py --out runs/needle            # 2,000 steps, about 30 s per model
    python examples/needle_in_history.py --out /tmp/needle --quick    # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from merlin_longseq.metrics import binary_metrics
from merlin_longseq.models.stca import STCAConfig, STCAModel
from merlin_longseq.models.ultra_hstu import ULTRAHSTUConfig, ULTRAHSTUModel
from merlin_longseq.request import RequestBatch

CANDIDATES = 4


def make_model(name: str, num_items: int, max_len: int):
    if name == "stca":
        return STCAModel(STCAConfig(num_items=num_items, d_model=32, n_layers=1, mlp_dims=(64,), backend="pytorch"))
    activation = {"ultra-hstu": "silu", "ultra-hstu-linear": "linear"}[name]
    return ULTRAHSTUModel(ULTRAHSTUConfig(num_items=num_items, d_model=32, n_layers=1, max_seq_len=max_len,
                                          num_time_buckets=0, qk_activation=activation, backend="pytorch"))


MODELS = ("stca", "ultra-hstu", "ultra-hstu-linear")


def needle_batch(requests: int, length: int, num_items: int, seed: int):
    """(RequestBatch, labels [C]): even candidates come from their request's history, odd ones are random."""
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, num_items + 1, (requests, length), generator=g)
    cands = torch.randint(1, num_items + 1, (requests, CANDIDATES), generator=g)
    cands[:, ::2] = hist.gather(1, torch.randint(length, (requests, CANDIDATES // 2), generator=g))
    labels = (cands[:, :, None] == hist[:, None, :]).any(-1).float().flatten()
    times = torch.arange(length, dtype=torch.int64).repeat(requests) * 60
    batch = RequestBatch.from_arrays(
        hist_item_ids=hist.flatten(), hist_offsets=torch.arange(requests + 1) * length,
        cand_item_ids=cands.flatten(), cand_offsets=torch.arange(requests + 1) * CANDIDATES,
        hist_actions=torch.ones(requests * length, dtype=torch.int64), hist_timestamps=times,
        request_time=torch.full((requests,), length * 60 + 30))
    return batch, labels


def run(name: str, train_len: int, steps: int, num_items: int, eval_requests: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    lengths = (train_len, 4 * train_len, 16 * train_len)
    model = make_model(name, num_items, max(lengths))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        batch, labels = needle_batch(16, train_len, num_items, seed=step)
        loss = F.binary_cross_entropy_with_logits(model(**batch.model_inputs)[:, 0], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    row = {"model": name, "train_len": train_len, "steps": steps, "loss_last": round(float(loss.detach()), 4)}
    with torch.no_grad():
        for length in lengths:
            batch, labels = needle_batch(eval_requests, length, num_items, seed=1_000_000 + length)
            scores = model(**batch.model_inputs)[:, 0]
            row[f"auc@{length}"] = round(binary_metrics(torch.sigmoid(scores).numpy(), labels.numpy())["auc"], 4)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", action="append", choices=MODELS, help="repeatable; default all")
    parser.add_argument("--train-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--num-items", type=int, default=2000)
    parser.add_argument("--eval-requests", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="8-event training histories, 30 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_len, args.steps, args.eval_requests = 8, 30, 16
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.model or MODELS:
        rows.append(run(name, args.train_len, args.steps, args.num_items, args.eval_requests))
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "needle.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lengths = [k for k in rows[0] if k.startswith("auc@")]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(f"Needle in the history: trained on {args.train_len} events, {args.steps} steps; click AUC\n\n")
        f.write("| model | final loss | " + " | ".join(lengths) + " |\n|---|---|" + "---|" * len(lengths) + "\n")
        for r in rows:
            f.write(f"| {r['model']} | {r['loss_last']:.4f} | " + " | ".join(f"{r[k]:.4f}" for k in lengths) + " |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
