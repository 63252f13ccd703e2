"""Benchmark: LONGER against a plain transformer over the full sequence (FLOPs and wall time per sample), and
LONGER's fast path against its PyTorch reference (forward_reference) at a 10K history.

    python benchmarks/bench_longer.py --device cuda --dtype bfloat16          # the H100 run (defaults below)
    python benchmarks/bench_longer.py --device cpu --lengths 128,256 --ref-length 512 --requests 2 \\
        --token-dim 16 --recent-queries 16 --repeats 3                        # a quick CPU check

What is compared, per history length L (every request has exactly L events):
  longer             LONGERModel: token merge (K events -> 1 token of width d_model = K * token_dim), hybrid
                     attention (layer 1: m global + k recent merged tokens as queries over all m + L/K tokens,
                     layers 2..N over the m + k queries only), user side once per request (RLB)
  longer_merge_only  the same with k = all merged tokens (token merge alone: the paper's -42.8% FLOPs at
                     L = 2048, d = 32, K = 4 is this row against full_w<token_dim>)
  full_w<w>          FullSequenceTransformer: the same event tokens, layers, heads and FFN, causal attention
                     over all L events + m global tokens at width w, once per sample (the target is in the
                     sequence). Two widths: the event-token width (what the paper compares with) and d_model.
One sample = one (request, candidate) pair; --candidates C targets share a request (C = 1 by default, so the
comparison is about the architecture, not about RLB).
FLOPs: analytic forward matmul FLOPs from merlin_longseq.models.longer (longer_flops_per_sample,
FullSequenceTransformer.flops_per_sample; attention counted over the full masked score matrix, as the
formulas say; checked against torch.utils.flop_counter in tests/test_longer.py).
Times: median of --repeats runs after --warmup runs; CUDA runs are timed with CUDA events around each call
(torch.cuda.synchronize before reading them), CPU runs with time.perf_counter. forward = eval mode under
no_grad; forward+backward = train mode, loss = sum of logits, backward (gradients reset outside the timing).
bfloat16 = autocast (LONGER's mixed_precision option), float32 otherwise. Writes <out>/bench_longer.json and
<out>/bench_longer.png (matplotlib) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from merlin_longseq.jagged import offsets_from_lengths  # noqa: E402
from merlin_longseq.models.longer import (  # noqa: E402
    FullSequenceTransformer,
    LONGERConfig,
    LONGERModel,
    longer_flops_per_sample,
)

NUM_ITEMS, NUM_USERS, NUM_ACTIONS = 100_000, 10_000, 3


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="bfloat16 = autocast; default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--lengths", default="1024,2048,4096", help="history lengths L, comma separated")
    p.add_argument("--ref-length", type=int, default=10_240, help="L of the fast-path vs reference run (0: skip)")
    p.add_argument("--requests", type=int, default=None, help="requests per batch (default 16 cuda, 2 cpu)")
    p.add_argument("--candidates", type=int, default=1, help="candidates per request in the L sweep")
    p.add_argument("--ref-candidates", type=int, default=16, help="candidates per request in the reference run")
    p.add_argument("--token-dim", type=int, default=32)
    p.add_argument("--merge-size", type=int, default=4, help="K")
    p.add_argument("--merge-mode", choices=["inner", "mean", "concat"], default="inner")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--recent-queries", type=int, default=100, help="k")
    p.add_argument("--ffn-mult", type=int, default=4)
    p.add_argument("--backend", choices=["auto", "triton", "pytorch"], default="auto",
                   help="LONGER's backend in the sweep and the fast-path run")
    p.add_argument("--no-backend-compare", action="store_true",
                   help="skip the Triton-vs-PyTorch backend run at --ref-length")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_results/longer"), help="output folder")
    args = p.parse_args(argv)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.requests = args.requests or (16 if args.device == "cuda" else 2)
    args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    for name in ("requests", "candidates", "ref_candidates", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.lengths or min(args.lengths) < 1 or args.ref_length < 0:
        p.error("lengths must be >= 1 and --ref-length >= 0")
    return args


def make_config(args, **overrides) -> LONGERConfig:
    values = dict(num_items=NUM_ITEMS, num_actions=NUM_ACTIONS, num_users=NUM_USERS, token_dim=args.token_dim,
                  merge_size=args.merge_size, merge_mode=args.merge_mode, n_heads=args.n_heads,
                  n_layers=args.n_layers, num_recent_queries=args.recent_queries, ffn_mult=args.ffn_mult,
                  mixed_precision=args.dtype == "bfloat16", backend=args.backend)
    values.update(overrides)
    return LONGERConfig(**values)


def make_requests(num_requests, length, candidates, device, seed=0):
    """Jagged LONGER inputs: every request has `length` events (timestamps increasing) and `candidates` targets."""
    gen = torch.Generator().manual_seed(seed)
    total = num_requests * length
    gaps = torch.randint(1, 3600, (num_requests, length), generator=gen)
    stamps = torch.cumsum(gaps, dim=1)
    batch = dict(
        hist_item_ids=torch.randint(1, NUM_ITEMS + 1, (total,), generator=gen),
        hist_actions=torch.randint(0, NUM_ACTIONS + 1, (total,), generator=gen),
        hist_timestamps=stamps.reshape(-1),
        hist_offsets=offsets_from_lengths(torch.full((num_requests,), length, dtype=torch.int64)),
        request_time=stamps[:, -1] + 60,
        cand_item_ids=torch.randint(1, NUM_ITEMS + 1, (num_requests * candidates,), generator=gen),
        cand_offsets=offsets_from_lengths(torch.full((num_requests,), candidates, dtype=torch.int64)),
        user_ids=torch.randint(1, NUM_USERS + 1, (num_requests,), generator=gen),
    )
    return {k: v.to(device) for k, v in batch.items()}


def full_inputs(batch, num_requests, length, candidates):
    """The same samples for the full-sequence transformer: every candidate carries its request's history."""
    def per_sample(t):
        return t.view(num_requests, 1, -1).expand(-1, candidates, -1).reshape(num_requests * candidates, -1)

    return dict(hist_item_ids=per_sample(batch["hist_item_ids"]), hist_actions=per_sample(batch["hist_actions"]),
                hist_timestamps=per_sample(batch["hist_timestamps"]),
                request_time=batch["request_time"].repeat_interleave(candidates),
                cand_item_ids=batch["cand_item_ids"])


def time_ms(fn, device, warmup, repeats, before=None):
    """Median wall time of fn() in ms. `before` runs ahead of every call, outside the timing."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            if before:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            if before:
                before()
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(model, call, device, args, backward=True):
    """(forward ms, forward + backward ms or None, peak MiB or None) of model(**inputs) via call(model)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.eval()

    def forward():
        with torch.no_grad():
            call(model)

    fwd = time_ms(forward, device, args.warmup, args.repeats)
    both = None
    if backward:
        model.train()

        def step():
            call(model).sum().backward()

        both = time_ms(step, device, args.warmup, args.repeats, before=lambda: model.zero_grad(set_to_none=True))
        model.zero_grad(set_to_none=True)
        model.eval()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return fwd, both, peak


def guarded(fn):
    """Run fn; an out-of-memory error becomes a recorded 'oom' instead of ending the benchmark."""
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError as err:  # only raised on CUDA
        torch.cuda.empty_cache()
        return None, f"oom: {str(err).splitlines()[0]}"


def run_sweep(args):
    device = args.device
    longer_cfg = make_config(args)
    variants = {
        "longer": longer_cfg,
        "longer_merge_only": make_config(args, num_recent_queries=None),
    }
    widths = sorted({args.token_dim, longer_cfg.d_model})
    rows = []
    for length in args.lengths:
        batch = make_requests(args.requests, length, args.candidates, device)
        samples = args.requests * args.candidates
        models = {}
        for name, cfg in variants.items():
            torch.manual_seed(0)
            models[name] = (LONGERModel(cfg).to(device), lambda m, b=batch: m(**b),
                            longer_flops_per_sample(cfg, length, args.candidates))
        full_batch = full_inputs(batch, args.requests, length, args.candidates)
        for width in widths:
            torch.manual_seed(0)
            model = FullSequenceTransformer(longer_cfg, width).to(device)
            models[f"full_w{width}"] = (model, lambda m, b=full_batch: m(**b), model.flops_per_sample(length))
        for name, (model, call, flops) in models.items():
            result, error = guarded(lambda: measure(model, call, device, args, backward=not args.no_backward))
            fwd, both, peak = result if result else (None, None, None)
            rows.append(dict(model=name, history_len=length, samples_per_batch=samples, flops_per_sample=flops,
                             fwd_ms_per_sample=None if fwd is None else fwd / samples,
                             fwd_bwd_ms_per_sample=None if both is None else both / samples,
                             fwd_tflops=None if fwd is None else flops * samples / (fwd * 1e-3) / 1e12,
                             peak_mib=peak, error=error))
            print(_row_text(rows[-1]), flush=True)
        del models
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_reference(args):
    """Forward of the fast path (KV cache, split softmax, RLB) vs forward_reference at --ref-length."""
    if not args.ref_length:
        return None
    device, length, candidates = args.device, args.ref_length, args.ref_candidates
    cfg = make_config(args)
    torch.manual_seed(0)
    model = LONGERModel(cfg).to(device).eval()
    batch = make_requests(args.requests, length, candidates, device, seed=1)
    samples = args.requests * candidates
    out = dict(history_len=length, requests=args.requests, candidates_per_request=candidates,
               flops_per_sample=longer_flops_per_sample(cfg, length, candidates))
    for name, fn in (("fast", model.forward), ("reference", model.forward_reference)):
        def forward(fn=fn):
            with torch.no_grad():
                fn(**batch)

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms, error = guarded(lambda: time_ms(forward, device, args.warmup, args.repeats))
        out[f"{name}_fwd_ms_per_sample"] = None if ms is None else ms / samples
        out[f"{name}_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        out[f"{name}_error"] = error
    with torch.no_grad():  # the two paths compute the same model: record how close they are here
        diff = (model(**batch) - model.forward_reference(**batch)).abs().max()
    out["max_abs_logit_diff"] = float(diff)
    fast, ref = out["fast_fwd_ms_per_sample"], out["reference_fwd_ms_per_sample"]
    out["speedup"] = ref / fast if fast and ref else None
    return out


def run_backend_compare(args):
    """The same LONGER (same weights) with backend="pytorch" and backend="triton" at --ref-length: forward and
    forward+backward per sample, peak memory, and how far apart the logits are."""
    if not args.ref_length or args.no_backend_compare or args.device != "cuda":
        return None
    length, candidates = args.ref_length, args.ref_candidates
    batch = make_requests(args.requests, length, candidates, "cuda", seed=1)
    samples = args.requests * candidates
    out = dict(history_len=length, requests=args.requests, candidates_per_request=candidates)
    models = {}
    for backend in ("pytorch", "triton"):
        torch.manual_seed(0)
        models[backend] = LONGERModel(make_config(args, backend=backend)).cuda()
        result, error = guarded(lambda: measure(models[backend], lambda m: m(**batch), "cuda", args,
                                                backward=not args.no_backward))
        fwd, both, peak = result if result else (None, None, None)
        out[backend] = dict(fwd_ms_per_sample=None if fwd is None else fwd / samples,
                            fwd_bwd_ms_per_sample=None if both is None else both / samples, peak_mib=peak,
                            error=error)
        print(f"backend {backend:<8} L={length} fwd ms/sample {_fmt(out[backend]['fwd_ms_per_sample'], '.4f')} "
              f"fwd+bwd ms/sample {_fmt(out[backend]['fwd_bwd_ms_per_sample'], '.4f')} peak MiB "
              f"{_fmt(peak, '.0f')}" + (f" {error}" if error else ""), flush=True)
    with torch.no_grad():
        a, b = (models[name].eval()(**batch) for name in ("pytorch", "triton"))
        out["max_abs_logit_diff"] = float((a - b).abs().max())
        out["logit_scale"] = float(a.abs().max())
    for key in ("fwd_ms_per_sample", "fwd_bwd_ms_per_sample"):
        ref, fast = out["pytorch"][key], out["triton"][key]
        out[key.replace("_ms_per_sample", "_speedup")] = ref / fast if ref and fast else None
    print(f"triton vs pytorch backend: forward {_fmt(out['fwd_speedup'], '.2f')}x, forward+backward "
          f"{_fmt(out['fwd_bwd_speedup'], '.2f')}x (max |logit diff| {out['max_abs_logit_diff']:.2e} of "
          f"{out['logit_scale']:.2e})", flush=True)
    return out


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _row_text(row):
    return (f"{row['model']:<18} L={row['history_len']:>6}  GFLOP/sample {row['flops_per_sample'] / 1e9:>9.4f}  "
            f"fwd ms/sample {_fmt(row['fwd_ms_per_sample'], '>9.4f')}  "
            f"fwd+bwd ms/sample {_fmt(row['fwd_bwd_ms_per_sample'], '>9.4f')}  "
            f"fwd TFLOP/s {_fmt(row['fwd_tflops'], '>7.3f')}  peak MiB {_fmt(row['peak_mib'], '>8.0f')}"
            + (f"  {row['error']}" if row["error"] else ""))


def summary_table(rows, token_width):
    """Markdown table; FLOPs and times relative to the full transformer at the event-token width."""
    base = {r["history_len"]: r for r in rows if r["model"] == f"full_w{token_width}"}
    lines = ["| L | model | GFLOP/sample | FLOPs vs full_w%d | fwd ms/sample | fwd+bwd ms/sample | "
             "fwd speed-up over full_w%d |" % (token_width, token_width), "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r["history_len"])
        flops_rel = f"{100 * (r['flops_per_sample'] / b['flops_per_sample'] - 1):+.1f}%" if b else "-"
        time_rel = (f"{b['fwd_ms_per_sample'] / r['fwd_ms_per_sample']:.2f}x"
                    if b and b["fwd_ms_per_sample"] and r["fwd_ms_per_sample"] else "-")
        lines.append(f"| {r['history_len']} | {r['model']} | {r['flops_per_sample'] / 1e9:.4f} | {flops_rel} | "
                     f"{_fmt(r['fwd_ms_per_sample'], '.4f')} | {_fmt(r['fwd_bwd_ms_per_sample'], '.4f')} | "
                     f"{time_rel} |")
    return "\n".join(lines)


def plot(rows, reference, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = sorted({r["model"] for r in rows}, key=lambda n: (not n.startswith("longer"), n))
    for name in names:
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["history_len"])
        lengths = [r["history_len"] for r in mine]
        axes[0].plot(lengths, [r["flops_per_sample"] / 1e9 for r in mine], marker="o", label=name)
        for ax, key in ((axes[1], "fwd_ms_per_sample"), (axes[2], "fwd_bwd_ms_per_sample")):
            points = [(r["history_len"], r[key]) for r in mine if r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
    for ax, label in zip(axes, ["GFLOP per sample (analytic)", "forward ms per sample", "fwd+bwd ms per sample"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("history length L")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if reference and reference.get("speedup"):
        axes[1].set_title(f"L={reference['history_len']}: fast path {reference['speedup']:.2f}x vs reference",
                          fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu")
    cfg = make_config(args)
    print(f"device {device_name}, torch {torch.__version__}, dtype {args.dtype}, requests {args.requests}, "
          f"candidates {args.candidates}; LONGER d={args.token_dim} K={args.merge_size} d_model={cfg.d_model} "
          f"layers={args.n_layers} heads={args.n_heads} k={args.recent_queries} m={cfg.num_global_tokens} "
          f"({', '.join(cfg.global_tokens)}) merge={args.merge_mode}", flush=True)
    backend_compare = run_backend_compare(args)
    rows = run_sweep(args)
    reference = run_reference(args)
    table = summary_table(rows, args.token_dim)
    print("\n" + table)
    if reference:
        print(f"\nL={reference['history_len']}, {reference['requests']} requests x "
              f"{reference['candidates_per_request']} candidates, forward ms/sample: fast "
              f"{_fmt(reference['fast_fwd_ms_per_sample'], '.4f')}, reference "
              f"{_fmt(reference['reference_fwd_ms_per_sample'], '.4f')}, speedup {_fmt(reference['speedup'], '.2f')}x"
              f" (max |logit diff| {reference['max_abs_logit_diff']:.2e})")
    os.makedirs(args.out, exist_ok=True)
    report = dict(
        command="python benchmarks/bench_longer.py " + " ".join(sys.argv[1:] if argv is None else argv),
        device=device_name, torch=torch.__version__, dtype=args.dtype, threads=torch.get_num_threads(),
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items() if k != "length_sampler"},
        requests=args.requests, candidates=args.candidates, warmup=args.warmup, repeats=args.repeats,
        rows=rows, reference=reference, backend_compare=backend_compare, table=table,
    )
    with open(os.path.join(args.out, "bench_longer.json"), "w") as f:
        json.dump(report, f, indent=2)
    try:
        plot(rows, reference, os.path.join(args.out, "bench_longer.png"),
             f"LONGER vs full-sequence transformer, {device_name}, {args.dtype}, {args.requests} requests x "
             f"{args.candidates} candidates")
        print(f"\nwrote {os.path.join(args.out, 'bench_longer.json')} and bench_longer.png")
    except ImportError:  # the JSON holds everything; the plot needs matplotlib (the `test` extra)
        print(f"\nwrote {os.path.join(args.out, 'bench_longer.json')}; no plot: matplotlib is not installed")
    return report


if __name__ == "__main__":
    main()
