"""Benchmark of LONGER's group attention (the InnerTransformer inside K-token groups): the Triton kernel's two
variants against what models/longer.py runs today and against the PyTorch reference.

    python3 benchmarks/bench_group_attention.py                       # CUDA: G = 32,768 and 327,680
    python3 benchmarks/bench_group_attention.py --quick               # CUDA: G = 32,768 only
    python3 benchmarks/bench_group_attention.py --device cpu --quick  # CPU, seconds: the code path, not a speed
    ... --out DIR                                                     # bench_group_attention.json goes there

Paths, each from q, k, v [G, K, H, Dh] laid out as in SelfAttentionBlock (q a view of one Linear's output, k and
v the halves of another's) to the [G, K, H * Dh] input of the output projection:
    triton-dot, triton-bcast  merlin_longseq.ops.group_attention(backend="triton", variant=...)
    sdpa                      models/longer.py today: heads transposed to [G, H, K, Dh], _sdpa with TokenMerge's
                              [G, 1, K, K] mask (chunked at _SDPA_MAX_ROWS rows), heads merged back
    reference                 ops/pytorch/pt_group_attention.py (explicit masked softmax)
The mask (built once per TokenMerge call and shared by its layers) is built outside the timed region.
CUDA: medians of triton.testing.do_bench (CUDA events, L2 flushed between runs) after warm-up (autotuning
happens there). "GB/s" = the fewest bytes the op must move (forward: read q, k, v, write out; forward +
backward: that, plus read q, k, v, dout and write dq, dk, dv) over the median time. "peak MB" = the peak of
allocated CUDA memory during one forward + backward, above what was allocated before it (inputs excluded).
CPU: medians of time.perf_counter over a few runs, one thread, float32 by default; the Triton rows run once,
under TRITON_INTERPRET=1 and at the smallest size only: they say nothing about speed (they check that the
benchmark itself runs).
Slot validity: 10% of the groups are a request's oldest, partial group (a random number of empty slots).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DIM = 32
PATHS = ("triton-dot", "triton-bcast", "sdpa", "reference")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="fewer sizes (CPU: tiny ones)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", default=None, help="directory for bench_group_attention.json")
    return parser.parse_args()


def make_inputs(groups, slots, heads, dtype, device, seed=0):
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    width = heads * DIM
    # leaves shaped like the Linear outputs the model attends over; the timed functions take views of them
    q_lin = torch.randn(groups, slots, width, device=device, generator=gen).to(dtype).requires_grad_(True)
    kv_lin = torch.randn(groups, slots, 2 * width, device=device, generator=gen).to(dtype).requires_grad_(True)
    slot_valid = torch.ones(groups, slots, dtype=torch.bool, device=device)
    partial = torch.rand(groups, device=device, generator=gen) < 0.1
    empty = torch.randint(0, slots, (groups,), device=device, generator=gen)  # the oldest slots are the empty ones
    slot_valid &= ~(partial[:, None] & (torch.arange(slots, device=device)[None, :] < empty[:, None]))
    grad = torch.randn(groups, slots, width, device=device, generator=gen).to(dtype)
    return q_lin, kv_lin, slot_valid, grad


def build_paths(q_lin, kv_lin, slot_valid, heads):
    import torch
    from merlin_longseq.models import longer
    from merlin_longseq.ops.group_attention import group_attention
    from merlin_longseq.ops.pytorch.pt_group_attention import pytorch_group_attention

    slots = q_lin.shape[1]
    eye = torch.eye(slots, dtype=torch.bool, device=q_lin.device)
    mask = (slot_valid[:, None, :] | eye).unsqueeze(1)  # [G, 1, K, K], as TokenMerge builds it
    scale = DIM ** -0.5

    def views():
        q = q_lin.unflatten(-1, (heads, DIM))  # [G, K, H, Dh]
        k, v = (t.unflatten(-1, (heads, DIM)) for t in kv_lin.chunk(2, dim=-1))
        return q, k, v

    def triton_path(variant):
        return lambda: group_attention(*views(), slot_valid, scale, backend="triton", variant=variant,
                                       check_inputs=False).flatten(-2)

    def sdpa_path():
        q, k, v = (t.transpose(1, 2) for t in views())  # [G, H, K, Dh], what _split_heads gives
        return longer._merge_heads(longer._sdpa(q, k, v, mask))

    def reference_path():
        return pytorch_group_attention(*views(), slot_valid, scale).flatten(-2)

    return {"triton-dot": triton_path("dot"), "triton-bcast": triton_path("bcast"), "sdpa": sdpa_path,
            "reference": reference_path}


def bcast_supported(slots):
    import torch
    from merlin_longseq.kernels import triton_group_attention as tk
    try:
        tk.check_supported(torch.empty(0, slots, 1, DIM), "bcast")
    except ValueError:
        return False
    return True


def time_cuda(fn, leaves, grad):
    import torch
    from triton.testing import do_bench

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        fn().backward(grad)

    fwd_ms = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    both_ms = do_bench(fwd_bwd, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn().backward(grad)
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    for leaf in leaves:
        leaf.grad = None
    return fwd_ms, both_ms, peak_mb


def time_cpu(fn, leaves, grad, reps=3):
    import torch

    def median_ms(step):
        if reps > 1:
            step()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        for leaf in leaves:
            leaf.grad = None
        fn().backward(grad)

    return median_ms(fwd), median_ms(fwd_bwd), None


def main():
    args = parse_args()
    if args.device == "cpu":
        # before the kernel module is imported: on CPU the Triton rows run in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --quick for a check of the benchmark itself")
    if args.device == "cpu":
        torch.set_num_threads(1)
        from merlin_longseq.kernels import triton_group_attention as tk
        tk._INTERPRET["ROWS"] = 64  # fewer interpreted programs
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    if args.device == "cpu":
        sizes = [64, 1024]
    else:
        sizes = [32_768] if args.quick else [32_768, 327_680]
    shapes = [(g, k, h) for g in sizes for k in (4, 8) for h in (1, 2)]
    timer = time_cuda if args.device == "cuda" else time_cpu
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (1 thread)"
    rows = []
    for groups, slots, heads in shapes:
        q_lin, kv_lin, slot_valid, grad = make_inputs(groups, slots, heads, dtype, args.device)
        paths = build_paths(q_lin, kv_lin, slot_valid, heads)
        tensor_bytes = q_lin.numel() * q_lin.element_size()
        fwd_bytes = 4 * tensor_bytes
        both_bytes = fwd_bytes + 7 * tensor_bytes
        for name in PATHS:
            if name == "triton-bcast" and not bcast_supported(slots):
                continue
            if args.device == "cpu" and name.startswith("triton"):
                if groups != sizes[0]:
                    continue  # the interpreter: one run at the smallest size
                fwd_ms, both_ms, peak_mb = time_cpu(paths[name], [q_lin, kv_lin], grad, reps=1)
            else:
                fwd_ms, both_ms, peak_mb = timer(paths[name], [q_lin, kv_lin], grad)
            rows.append(dict(G=groups, K=slots, H=heads, Dh=DIM, dtype=args.dtype, path=name, fwd_ms=fwd_ms,
                             fwd_bwd_ms=both_ms, peak_mb=peak_mb, fwd_gbps=fwd_bytes / fwd_ms / 1e6,
                             fwd_bwd_gbps=both_bytes / both_ms / 1e6))
            print(f"G={groups} K={slots} H={heads} {name}: fwd {fwd_ms:.4f} ms, fwd+bwd {both_ms:.4f} ms",
                  flush=True)
        del q_lin, kv_lin, slot_valid, grad, paths
        if args.device == "cuda":
            torch.cuda.empty_cache()

    print(f"\nGroup attention, {args.dtype}, Dh={DIM}, {device_name}; speed-up = sdpa time / path time")
    header = (f"{'G':>8} {'K':>2} {'H':>2} {'path':<13} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd x':>6} "
              f"{'f+b x':>6} {'fwd GB/s':>9} {'f+b GB/s':>9} {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        base = next(r for r in rows if (r["G"], r["K"], r["H"], r["path"]) == (row["G"], row["K"], row["H"], "sdpa"))
        peak = f"{row['peak_mb']:8.1f}" if row["peak_mb"] is not None else f"{'-':>8}"
        print(f"{row['G']:>8} {row['K']:>2} {row['H']:>2} {row['path']:<13} {row['fwd_ms']:9.4f} "
              f"{row['fwd_bwd_ms']:11.4f} {base['fwd_ms'] / row['fwd_ms']:6.2f} "
              f"{base['fwd_bwd_ms'] / row['fwd_bwd_ms']:6.2f} {row['fwd_gbps']:9.1f} {row['fwd_bwd_gbps']:9.1f} {peak}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "bench_group_attention.json")
        with open(path, "w") as f:
            json.dump(dict(device=device_name, torch=torch.__version__, triton=triton.__version__,
                           command=" ".join(sys.argv), rows=rows), f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
