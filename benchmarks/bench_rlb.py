"""Training throughput of STCA with Request Level Batching (RLB) against the per-target layout.

    python benchmarks/bench_rlb.py --device cpu                                   # CPU defaults
    python benchmarks/bench_rlb.py --device cuda --requests 64 --history 1024 4096 --candidates 64 256
    python benchmarks/bench_rlb.py --device cpu --json rlb.json                    # also write the numbers

Same model (one initial state, copied), same batches, same loss: one training step = forward + binary
cross-entropy + backward + Adam step.
  rlb         STCAModel.forward: the user side (history tokens, per-layer K/V) once per request, every
              candidate of the request attends to it.
  per-target  STCAModel.forward_per_target: every candidate is its own sample with its own copy of the history
              (the naive layout RLB replaces).
Reported: candidates trained per second (median step time over --steps timed steps after --warmup steps) and
the RLB speed-up. Histories are drawn uniformly in [history/2, 3*history/2] per request. On CUDA the timer
synchronises the device around every step. A configuration whose per-target layout would exceed --max-tokens
history tokens per step is skipped (it is the layout that multiplies memory by the candidate count).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from merlin_longseq.jagged import offsets_from_lengths  # noqa: E402
from merlin_longseq.models.stca import STCAConfig, STCAModel  # noqa: E402


def make_batches(num_batches, requests, history, candidates, num_items, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        lengths = torch.randint(max(1, history // 2), history + history // 2 + 1, (requests,), generator=g)
        total = int(lengths.sum())
        times = torch.cumsum(torch.randint(1, 3600, (total,), generator=g), 0)
        batch = dict(
            hist_item_ids=torch.randint(1, num_items + 1, (total,), generator=g),
            hist_actions=torch.randint(1, 4, (total,), generator=g),
            hist_timestamps=times,
            hist_offsets=offsets_from_lengths(lengths),
            request_time=torch.full((requests,), int(times[-1]) + 60),
            cand_item_ids=torch.randint(1, num_items + 1, (requests * candidates,), generator=g),
            cand_offsets=torch.arange(requests + 1) * candidates,
        )
        labels = (torch.rand(requests * candidates, 1, generator=g) < 0.3).float()
        batches.append(({k: v.to(device) for k, v in batch.items()}, labels.to(device)))
    return batches


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layout(model, batches, layout, steps, warmup, lr, device, amp):
    model = copy.deepcopy(model)  # both layouts start from the same weights
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step_fn = model.forward if layout == "rlb" else model.forward_per_target
    times = []
    for i in range(warmup + steps):
        batch, labels = batches[i % len(batches)]
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = step_fn(**batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), float(loss.detach())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--requests", type=int, default=4, help="requests per batch (R)")
    parser.add_argument("--history", type=int, nargs="+", default=[256, 1024], help="mean history length(s)")
    parser.add_argument("--candidates", type=int, nargs="+", default=[16, 64], help="candidates per request")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--num-items", type=int, default=10_000)
    parser.add_argument("--backend", default="auto", choices=["auto", "pytorch", "triton"])
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="skip configs whose per-target layout holds more history tokens per step "
                             "(default 300k on CPU, 50M on CUDA)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    max_tokens = args.max_tokens or (300_000 if device.type == "cpu" else 50_000_000)
    torch.manual_seed(0)
    model = STCAModel(STCAConfig(num_items=args.num_items, d_model=args.d_model, n_heads=args.heads,
                                 n_layers=args.layers, tasks=("click",), backend=args.backend)).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"STCA training step (fwd + BCE + bwd + Adam), d_model={args.d_model}, heads={args.heads}, "
          f"layers={args.layers}, backend={args.backend}, amp={args.amp}, R={args.requests} requests/batch, "
          f"median of {args.steps} steps; {where}, torch {torch.__version__}")
    header = (f"{'history':>8} {'cands/req':>9} {'RLB cands/s':>12} {'per-target cands/s':>19} {'speed-up':>9} "
              f"{'RLB ms/step':>12} {'per-target ms/step':>19}")
    print(header)
    print("-" * len(header))
    rows = []
    for history in args.history:
        for candidates in args.candidates:
            batches = make_batches(max(2, min(args.steps, 4)), args.requests, history, candidates, args.num_items,
                                   device)
            per_target_tokens = max(int(b["hist_offsets"][-1]) for b, _ in batches) * candidates
            rlb_s, _ = time_layout(model, batches, "rlb", args.steps, args.warmup, 1e-3, device, args.amp)
            total = args.requests * candidates
            row = dict(history=history, candidates=candidates, requests=args.requests,
                       rlb_candidates_per_s=total / rlb_s, rlb_ms=rlb_s * 1e3)
            if per_target_tokens <= max_tokens:
                naive_s, _ = time_layout(model, batches, "per-target", args.steps, args.warmup, 1e-3, device, args.amp)
                row.update(per_target_candidates_per_s=total / naive_s, per_target_ms=naive_s * 1e3,
                           speedup=naive_s / rlb_s)
                print(f"{history:>8} {candidates:>9} {row['rlb_candidates_per_s']:>12.0f} "
                      f"{row['per_target_candidates_per_s']:>19.0f} {row['speedup']:>8.1f}x {row['rlb_ms']:>12.1f} "
                      f"{row['per_target_ms']:>19.1f}")
            else:
                print(f"{history:>8} {candidates:>9} {row['rlb_candidates_per_s']:>12.0f} "
                      f"{'skipped (>' + str(max_tokens) + ' tokens)':>19} {'-':>9} {row['rlb_ms']:>12.1f} {'-':>19}")
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
