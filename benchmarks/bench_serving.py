"""Model time of one served request: a user with a long history and N candidates, with and without the
user-side cache (what PredictLongSeq runs inside the server, without the network and the workflow).

    python benchmarks/bench_serving.py --device cuda                      # 10,240 events, 512 candidates
    python benchmarks/bench_serving.py --device cpu --history 1024 --candidates 128 --repeats 20

Timing: wall clock around Scorer.score (its input checks included), after warm-up; on CUDA the scorer
returns CPU tensors, so every call ends synchronised. "cached" = the same user and history again (a hit).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from merlin_longseq.models.longer import LONGERConfig, LONGERModel
from merlin_longseq.models.stca import STCAConfig, STCAModel
from merlin_longseq.models.ultra_hstu import ULTRAHSTUConfig, ULTRAHSTUModel
from merlin_longseq.request import RequestBatch
from merlin_longseq.serving.scoring import UserStateCache, make_scorer


def one_request(history: int, candidates: int, num_items: int, seed: int = 0) -> RequestBatch:
    g = torch.Generator().manual_seed(seed)
    return RequestBatch(
        hist_item_ids=torch.randint(1, num_items + 1, (history,), generator=g),
        hist_offsets=torch.tensor([0, history]),
        cand_item_ids=torch.randint(1, num_items + 1, (candidates,), generator=g),
        cand_offsets=torch.tensor([0, candidates]),
        hist_actions=torch.randint(1, 4, (history,), generator=g),
        hist_timestamps=torch.arange(history, dtype=torch.int64) * 60,
        request_time=torch.tensor([history * 60 + 30]), user_ids=torch.tensor([1]))


def models(num_items: int, backend: str):
    """name -> model; "-bf16" = the same architecture with mixed_precision (bf16 autocast, bf16 kernels)."""
    longer = dict(num_items=num_items, num_users=10, token_dim=32, merge_size=4, n_heads=4, n_layers=2,
                  num_recent_queries=100)
    ultra = dict(num_items=num_items, num_users=10, d_model=64, n_heads=4, n_layers=2, max_seq_len=16_384,
                 backend=backend)
    return {
        "stca": STCAModel(STCAConfig(num_items=num_items, num_users=10, d_model=64, n_heads=4, n_layers=2,
                                     backend=backend)),
        "longer": LONGERModel(LONGERConfig(**longer)),
        "longer-bf16": LONGERModel(LONGERConfig(**longer, mixed_precision=True)),
        "ultra-hstu": ULTRAHSTUModel(ULTRAHSTUConfig(**ultra)),
        "ultra-hstu-bf16": ULTRAHSTUModel(ULTRAHSTUConfig(**ultra, mixed_precision=True)),
    }


ARCHS = ("stca", "longer", "longer-bf16", "ultra-hstu", "ultra-hstu-bf16")


def timed(fn, repeats: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return np.array(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--history", type=int, default=10_240)
    parser.add_argument("--candidates", type=int, default=512)
    parser.add_argument("--num-items", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--backend", default="auto", help="STCA attention backend: auto | triton | pytorch")
    parser.add_argument("--arch", action="append", choices=ARCHS)
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators (host and device time) of one call per arch")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    request = one_request(args.history, args.candidates, args.num_items)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, threads {torch.get_num_threads()}: one request, "
          f"history {args.history}, {args.candidates} candidates, {args.repeats} timed calls")
    print(f"{'model':15s} {'cache':8s} {'p50 ms':>9s} {'p99 ms':>9s}")
    for arch, model in models(args.num_items, args.backend).items():
        if args.arch and arch not in args.arch:
            continue
        plain = make_scorer(model, max_history=args.history, device=args.device)
        cached = make_scorer(model, max_history=args.history, device=args.device, cache=UserStateCache(16))
        cached.score(request)  # fill the cache: the timed calls are hits
        for label, scorer, use_cache in (("none", plain, False), ("hit", cached, True)):
            ms = timed(lambda: scorer.score(request, use_cache=use_cache), args.repeats, args.warmup)
            print(f"{arch:15s} {label:8s} {np.percentile(ms, 50):9.2f} {np.percentile(ms, 99):9.2f}")
            if args.profile:
                profile(lambda: scorer.score(request, use_cache=use_cache), f"{arch} cache={label}")


def profile(fn, title: str, rows: int = 12) -> None:
    """Where one call's time goes: the operators with the most host (self CPU) time, then device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            fn()
    averages = prof.key_averages()
    print(f"--- profile: {title} (3 calls)")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    if torch.cuda.is_available():
        print(averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
