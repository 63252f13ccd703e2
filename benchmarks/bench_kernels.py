"""Benchmark of the Triton kernels against the PyTorch references and SDPA (one script for the kernels area).

    python3 benchmarks/bench_kernels.py                  # needs a CUDA GPU; prints tables, writes JSON + plot
    python3 benchmarks/bench_kernels.py --out DIR        # where bench_kernels.json / bench_kernels.png go
    python3 benchmarks/bench_kernels.py --plot-from F    # redraw the plot from a saved JSON (no GPU needed)
    python3 benchmarks/bench_kernels.py --only peer --peer ../shared/peer   # ours vs the peer kernel, issue 15's grid

HSTU pointwise attention (bf16, H = 4 heads x D = 64):
  forward FLOPs = 4 * D * H * (attended pairs): two matmuls of 2 FLOP per multiply-add. Causal counts half the
  square, L^2/2 per sequence; ragged batches count each sequence's own L_b^2/2 ("useful" FLOPs); semi-local
  counts the pairs its mask keeps. fwd + bwd = 3.5 x forward (backward counted as 2.5 x forward), timed as one
  forward plus one backward. SDPA rows: causal softmax attention (flash) of the same shape, same FLOP count.
Target-to-history cross attention (STCA, RLB; bf16, H = 4 x D = 64): effective K/V read = bytes of the real
  history keys and values / forward time (each read once). Padded SDPA pads both sides to the longest request.
Times: medians of triton.testing.do_bench (CUDA events) after warm-up; autotuning happens during warm-up.
Per-call floor (--only floor): microseconds of one forward of each kernel at a tiny shape (one sequence of 64
  tokens: next to no GPU work), host launch path included, the median over many calls each followed by a CUDA
  sync; the kernel entry with and without a gradient to track, and the op dispatcher (check_inputs=False).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HEADS, DIM, ALPHA = 4, 64, 1.0 / 8


def _fmt(x, spec):
    return format(x, spec) if x is not None else "-"


# ---------------------------------------------------------------------------------------------------------
# HSTU
# ---------------------------------------------------------------------------------------------------------
def causal_pairs(lengths):
    return sum(n * n / 2 for n in lengths)  # the issue's L^2/2 convention


def semi_local_pairs(length, window, prefix):
    import torch
    i = torch.arange(length, dtype=torch.float64)
    local = torch.clamp(i + 1, max=window)
    extra_prefix = torch.clamp(torch.minimum(torch.full_like(i, prefix), i - window + 1), min=0)
    return float((local + extra_prefix).sum())


def hstu_inputs(lengths, seed=0, bias=False):
    import torch
    from merlin_longseq.jagged import offsets_from_lengths
    gen = torch.Generator(device="cuda").manual_seed(seed)
    offsets = offsets_from_lengths(torch.tensor(lengths, dtype=torch.int64, device="cuda"))
    total = int(offsets[-1])
    q, k, v = (torch.randn(total, HEADS, DIM, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_(True)
               for _ in range(3))
    extra = {}
    if bias:
        extra = dict(timestamps=torch.cumsum(torch.randint(0, 3600, (total,), device="cuda", generator=gen), 0),
                     pos_bias=torch.randn(HEADS, 128, device="cuda").requires_grad_(True),
                     time_bias=torch.randn(HEADS, 32, device="cuda").requires_grad_(True))
    return q, k, v, offsets, max(lengths), extra


def time_fwd_bwd(fwd, leaves, grad, do_bwd=True):
    """(forward ms, forward + backward ms) of fwd() -> tensor."""
    import torch
    from triton.testing import do_bench

    def f():
        with torch.no_grad():
            fwd()

    def fb():
        fwd().backward(grad)

    fwd_ms = do_bench(f, warmup=50, rep=200, return_mode="median")
    both_ms = do_bench(fb, warmup=50, rep=200, grad_to_none=leaves, return_mode="median") if do_bwd else None
    return fwd_ms, both_ms


def bench_hstu(results, quick):
    import torch
    import torch.nn.functional as F
    import merlin_longseq.kernels.triton_hstu_attention as tk
    from merlin_longseq.ops.pytorch.pt_hstu_attention import pytorch_hstu_attention

    rows = results.setdefault("hstu", [])

    def record(case, impl, fwd_ms, both_ms, pairs, note=""):
        flop = 4 * DIM * HEADS * pairs
        row = dict(case=case, impl=impl, fwd_ms=fwd_ms, fwd_bwd_ms=both_ms,
                   fwd_tflop_s=flop / fwd_ms / 1e9 if fwd_ms else None,
                   fwd_bwd_tflop_s=3.5 * flop / both_ms / 1e9 if both_ms else None, note=note)
        rows.append(row)
        print(f"{case:34s} {impl:15s} {_fmt(fwd_ms, '8.3f')} {_fmt(row['fwd_tflop_s'], '7.1f')} "
              f"{_fmt(both_ms, '8.3f')} {_fmt(row['fwd_bwd_tflop_s'], '7.1f')}  {note}", flush=True)
        return row

    def run_hstu(case, lengths, options, pairs, extra_impls=()):
        q, k, v, offsets, max_len, extra = hstu_inputs(lengths, bias="bias" in case)
        grad = torch.randn_like(q)
        leaves = [q, k, v] + [t for t in extra.values() if t.requires_grad]
        t0 = time.time()
        fwd = lambda: tk.triton_hstu_attention(q, k, v, offsets, max_len, ALPHA, **options, **extra)  # noqa: E731
        row = record(case, "triton", *time_fwd_bwd(fwd, leaves, grad), pairs,
                     f"(tuned+timed in {time.time() - t0:.0f}s)")
        if "dense" in extra_impls or "err" in extra_impls:
            with torch.no_grad():  # correctness at full size against the fp32 dense reference
                got = tk.triton_hstu_attention(q, k, v, offsets, max_len, ALPHA, **options).float()
                want = pytorch_hstu_attention(q.float(), k.float(), v.float(), offsets, max_len, ALPHA, **options)
                row["rel_err_vs_fp32"] = float((got - want).norm() / want.norm())
                del got, want
            print(f"{'':34s} triton vs fp32 dense reference: relative error {row['rel_err_vs_fp32']:.2e}")
        if "dense" in extra_impls:
            try:
                ref = lambda: pytorch_hstu_attention(q, k, v, offsets, max_len, ALPHA, **options)  # noqa: E731
                record(case, "pytorch dense", *time_fwd_bwd(ref, leaves, grad), pairs)
            except torch.OutOfMemoryError:
                record(case, "pytorch dense", None, None, pairs, "out of memory")
            torch.cuda.empty_cache()
        if "sdpa" in extra_impls and len(set(lengths)) == 1:
            b, n = len(lengths), lengths[0]
            qs, ks, vs = (torch.randn(b, HEADS, n, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                          for _ in range(3))
            sd = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # noqa: E731
            record(case, "sdpa causal", *time_fwd_bwd(sd, [qs, ks, vs], torch.randn_like(qs)), pairs,
                   "softmax attention, same FLOPs")
        return row

    print(f"\n## HSTU attention (bf16, H={HEADS}, D={DIM})")
    print(f"{'case':34s} {'impl':15s} {'fwd ms':>8s} {'TFLOP/s':>7s} {'f+b ms':>8s} {'TFLOP/s':>7s}")
    gen = torch.Generator().manual_seed(0)
    ragged = torch.randint(1, 4097, (16,), generator=gen).tolist()
    run_hstu("causal B16 L4096", [4096] * 16, {}, causal_pairs([4096] * 16), ("dense", "sdpa"))
    full = run_hstu("causal B4 L8192", [8192] * 4, {}, causal_pairs([8192] * 4), ("sdpa",))
    run_hstu("ragged B16 L1..4096", ragged, {}, causal_pairs(ragged))
    semi = run_hstu("semi-local B4 L8192 K1=512 K2=128", [8192] * 4, dict(local_window=512, global_prefix=128),
                    4 * semi_local_pairs(8192, 512, 128))
    results["hstu_semi_local_speedup"] = dict(fwd=full["fwd_ms"] / semi["fwd_ms"],
                                              fwd_bwd=full["fwd_bwd_ms"] / semi["fwd_bwd_ms"])
    print(f"semi-local vs full causal (L=8192): {results['hstu_semi_local_speedup']['fwd']:.2f}x forward, "
          f"{results['hstu_semi_local_speedup']['fwd_bwd']:.2f}x forward+backward")
    # the exact-sigmoid SiLU (tk.FAST_SILU off): speed and accuracy next to the tanh.approx default
    tk.FAST_SILU = False
    try:
        run_hstu("causal B16 L4096 exact-silu", [4096] * 16, {}, causal_pairs([4096] * 16), ("err",))
    finally:
        tk.FAST_SILU = True
    if not quick:
        run_hstu("causal B16 L4096 +pos+time bias", [4096] * 16, {}, causal_pairs([4096] * 16))

    # sweep for the plot: 64K tokens per batch, forward only
    sweep = results.setdefault("hstu_sweep", [])
    for n in ([1024, 4096] if quick else [1024, 2048, 4096, 8192]):
        b = 65536 // n
        q, k, v, offsets, _, _ = hstu_inputs([n] * b)
        pairs = causal_pairs([n] * b)
        from triton.testing import do_bench
        point = dict(L=n, B=b)
        with torch.no_grad():
            point["triton"] = 4 * DIM * HEADS * pairs / do_bench(
                lambda: tk.triton_hstu_attention(q, k, v, offsets, n, ALPHA), warmup=25, rep=100,
                return_mode="median") / 1e9
            try:
                point["pytorch"] = 4 * DIM * HEADS * pairs / do_bench(
                    lambda: pytorch_hstu_attention(q, k, v, offsets, n, ALPHA), warmup=5, rep=30,
                    return_mode="median") / 1e9
            except torch.OutOfMemoryError:
                point["pytorch"] = None
            torch.cuda.empty_cache()
            qs, ks, vs = (x.detach().view(b, n, HEADS, DIM).transpose(1, 2) for x in (q, k, v))
            point["sdpa"] = 4 * DIM * HEADS * pairs / do_bench(
                lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), warmup=25, rep=100,
                return_mode="median") / 1e9
        sweep.append(point)
        print(f"sweep HSTU fwd L={n:5d} B={b:3d}: triton {point['triton']:6.1f}  pytorch "
              f"{_fmt(point['pytorch'], '6.1f')}  sdpa {point['sdpa']:6.1f} TFLOP/s", flush=True)


# ---------------------------------------------------------------------------------------------------------
# target-to-history cross attention (STCA)
# ---------------------------------------------------------------------------------------------------------
def ta_inputs(target_lengths, history_lengths, seed=0):
    import torch
    from merlin_longseq.jagged import offsets_from_lengths
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q_off = offsets_from_lengths(torch.tensor(target_lengths, dtype=torch.int64, device="cuda"))
    kv_off = offsets_from_lengths(torch.tensor(history_lengths, dtype=torch.int64, device="cuda"))
    n_t, n_h = sum(target_lengths), sum(history_lengths)
    q = torch.randn(n_t, HEADS, DIM, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_(True)
    k, v = (torch.randn(n_h, HEADS, DIM, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_(True)
            for _ in range(2))
    return q, k, v, q_off, kv_off


def padded_sdpa_fn(q, k, v, q_off, kv_off, t_max, l_max, masked):
    """Pad both sides to the longest request and call SDPA (what a user without a jagged kernel does)."""
    import torch
    import torch.nn.functional as F
    from merlin_longseq.jagged import jagged_to_padded, lengths_from_offsets, padded_to_jagged
    lengths = lengths_from_offsets(kv_off)
    t_lengths = lengths_from_offsets(q_off)
    key_ok = (torch.arange(l_max, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]

    def f():
        qp, kp, vp = (jagged_to_padded(x, o, n).transpose(1, 2) for x, o, n in
                      ((q, q_off, t_max), (k, kv_off, l_max), (v, kv_off, l_max)))
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_ok if masked else None)
        return padded_to_jagged(out.transpose(1, 2), t_lengths)[0]

    return f


def bench_target_attention(results, quick):
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench
    import merlin_longseq.kernels.triton_target_attention as ta
    from merlin_longseq.ops.pytorch.pt_target_attention import pytorch_target_attention

    rows = results.setdefault("target_attention", [])
    scale = DIM ** -0.5

    def record(case, impl, fwd_ms, both_ms, kv_bytes, note=""):
        row = dict(case=case, impl=impl, fwd_ms=fwd_ms, fwd_bwd_ms=both_ms,
                   kv_tb_s=kv_bytes / fwd_ms / 1e9 if fwd_ms else None, note=note)
        rows.append(row)
        print(f"{case:30s} {impl:22s} {_fmt(fwd_ms, '8.3f')} {_fmt(row['kv_tb_s'], '6.2f')} "
              f"{_fmt(both_ms, '8.3f')}  {note}", flush=True)
        return row

    def run_case(case, t_lens, h_lens, impls):
        q, k, v, q_off, kv_off = ta_inputs(t_lens, h_lens)
        t_max, l_max = max(t_lens), max(h_lens)
        kv_bytes = 2 * k.numel() * k.element_size()
        grad = torch.randn_like(q)
        out = {}
        for impl in impls:
            note = ""
            if impl.startswith("triton"):
                splits = None if impl == "triton" else int(impl.split("=")[1])
                fn = lambda s=splits: ta.triton_target_attention(  # noqa: E731
                    q, k, v, q_off, kv_off, scale=scale, max_history_len=l_max, max_targets=t_max, num_splits=s)
                heuristic = ta._num_splits(q.device, len(t_lens), HEADS, t_max, l_max, splits)
                note = f"{heuristic} key chunks"
            elif impl == "pytorch reference":
                fn = lambda: pytorch_target_attention(q, k, v, q_off, kv_off, scale)  # noqa: E731
            elif impl.startswith("sdpa padded"):
                fn = padded_sdpa_fn(q, k, v, q_off, kv_off, t_max, l_max, masked="masked" in impl)
                note = "incl. padding copies"
            elif impl == "sdpa dense":  # the same shapes already padded: SDPA alone, no copies, no mask
                qs = torch.randn(len(t_lens), HEADS, t_max, DIM, device="cuda", dtype=torch.bfloat16,
                                 requires_grad=True)
                ks, vs = (torch.randn(len(t_lens), HEADS, l_max, DIM, device="cuda", dtype=torch.bfloat16,
                                      requires_grad=True) for _ in range(2))
                fwd_ms, both_ms = time_fwd_bwd(lambda: F.scaled_dot_product_attention(qs, ks, vs), [qs, ks, vs],
                                               torch.randn_like(qs))
                out[impl] = record(case, impl, fwd_ms, both_ms, kv_bytes, "inputs already [R, H, L, D]")
                continue
            try:
                out[impl] = record(case, impl, *time_fwd_bwd(fn, [q, k, v], grad), kv_bytes, note)
            except torch.OutOfMemoryError:
                out[impl] = record(case, impl, None, None, kv_bytes, "out of memory")
            torch.cuda.empty_cache()
        if "triton" in out:
            with torch.no_grad():
                got = ta.triton_target_attention(q, k, v, q_off, kv_off, scale=scale).float()
                want = pytorch_target_attention(q.float(), k.float(), v.float(), q_off, kv_off, scale)
                out["triton"]["rel_err_vs_fp32"] = float((got - want).norm() / want.norm())
                print(f"{'':30s} triton vs fp32 reference: relative error {out['triton']['rel_err_vs_fp32']:.2e}")
        return out

    print(f"\n## Target-to-history cross attention (bf16, H={HEADS}, D={DIM})")
    print(f"{'case':30s} {'impl':22s} {'fwd ms':>8s} {'KV TB/s':>6s} {'f+b ms':>8s}")
    uniform = run_case("R64 T128 L10240", [128] * 64, [10240] * 64,
                       ["triton", "triton splits=1", "sdpa dense", "sdpa padded", "pytorch reference"])
    gen = torch.Generator().manual_seed(0)
    ragged_h = torch.randint(1, 10241, (64,), generator=gen).tolist()
    ragged = run_case("R64 T128 L1..10240", [128] * 64, ragged_h,
                      ["triton", "triton splits=1", "triton splits=4", "sdpa padded masked", "sdpa padded"])
    results["ta_summary"] = dict(
        uniform_kv_tb_s=uniform["triton"]["kv_tb_s"],
        ragged_speedup_vs_padded_sdpa_masked=ragged["sdpa padded masked"]["fwd_ms"] / ragged["triton"]["fwd_ms"],
        ragged_speedup_vs_padded_sdpa_unmasked=ragged["sdpa padded"]["fwd_ms"] / ragged["triton"]["fwd_ms"])
    print("ragged: triton {:.2f}x faster than padded SDPA with key mask, {:.2f}x than padded SDPA without".format(
        results["ta_summary"]["ragged_speedup_vs_padded_sdpa_masked"],
        results["ta_summary"]["ragged_speedup_vs_padded_sdpa_unmasked"]))

    sweep = results.setdefault("ta_sweep", [])
    for n in ([1024, 10240] if quick else [1024, 2560, 5120, 10240]):
        q, k, v, q_off, kv_off = ta_inputs([128] * 64, [n] * 64)
        kv_bytes = 2 * k.numel() * k.element_size()
        point = dict(L=n)
        with torch.no_grad():
            point["triton"] = kv_bytes / do_bench(lambda: ta.triton_target_attention(
                q, k, v, q_off, kv_off, scale=scale, max_history_len=n, max_targets=128), warmup=25, rep=100,
                return_mode="median") / 1e9
            qs = q.detach().view(64, 128, HEADS, DIM).transpose(1, 2)
            ks, vs = (x.detach().view(64, n, HEADS, DIM).transpose(1, 2) for x in (k, v))
            point["sdpa"] = kv_bytes / do_bench(lambda: F.scaled_dot_product_attention(qs, ks, vs), warmup=25,
                                                rep=100, return_mode="median") / 1e9
            point["pytorch"] = kv_bytes / do_bench(lambda: pytorch_target_attention(q, k, v, q_off, kv_off, scale),
                                                   warmup=5, rep=30, return_mode="median") / 1e9
        sweep.append(point)
        print(f"sweep TA fwd L={n:5d}: triton {point['triton']:5.2f}  sdpa {point['sdpa']:5.2f}  pytorch "
              f"{point['pytorch']:5.2f} TB/s of K/V", flush=True)


# ---------------------------------------------------------------------------------------------------------
def bench_semi_local(results, quick):
    """Semi-local vs full causal HSTU at L = 8192 (K1 = 512, K2 = 128): wall time (do_bench, includes the Python
    launch path) and GPU time (sum of CUDA kernel times from torch.profiler), B = 4 and 16."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    import merlin_longseq.kernels.triton_hstu_attention as tk

    def gpu_ms(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        return sum(e.device_time_total for e in prof.key_averages()) / reps / 1e3

    rows = results.setdefault("semi_local", [])
    for batch in ((4,) if quick else (4, 16)):
        length = 8192
        q, k, v = (torch.randn(batch * length, HEADS, DIM, device="cuda", dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))
        offsets = torch.arange(batch + 1, device="cuda") * length
        grad = torch.randn_like(q)
        timing = {}
        for name, options in (("causal", {}), ("semi-local", dict(local_window=512, global_prefix=128))):
            def fwd(options=options):
                return tk.triton_hstu_attention(q, k, v, offsets, length, 1.0 / DIM, **options)

            def fwd_bwd(fwd=fwd):
                torch.autograd.grad(fwd(), (q, k, v), grad)

            with torch.no_grad():
                wall_f = do_bench(fwd, warmup=10, rep=50, return_mode="median")
                gpu_f = gpu_ms(fwd)
            timing[name] = (wall_f, do_bench(fwd_bwd, warmup=10, rep=50, return_mode="median"), gpu_f,
                            gpu_ms(fwd_bwd))
        c, s_ = timing["causal"], timing["semi-local"]
        row = dict(B=batch, L=length, causal=c, semi_local=s_, wall_speedup=(c[0] / s_[0], c[1] / s_[1]),
                   gpu_speedup=(c[2] / s_[2], c[3] / s_[3]))
        rows.append(row)
        print(f"semi-local B{batch} L{length}: GPU fwd {s_[2]:.3f} ms (causal {c[2]:.3f}), f+b {s_[3]:.3f} "
              f"(causal {c[3]:.3f}) -> {row['gpu_speedup'][0]:.2f}x / {row['gpu_speedup'][1]:.2f}x; wall "
              f"{row['wall_speedup'][0]:.2f}x / {row['wall_speedup'][1]:.2f}x", flush=True)


def bench_memory(results, quick):
    """Peak memory of every kernel's forward+backward (inference only for the history projection, whose
    training path is PyTorch) above its inputs, as the token count doubles: linear = constant bytes per token."""
    import torch

    from merlin_longseq.kernels.triton_group_attention import triton_group_attention
    from merlin_longseq.kernels.triton_history_projection import triton_history_projection
    from merlin_longseq.kernels.triton_hstu_attention import triton_hstu_attention
    from merlin_longseq.kernels.triton_target_attention import triton_target_attention

    dt, dev = torch.bfloat16, "cuda"

    def leaf(*shape):
        return torch.randn(*shape, device=dev, dtype=dt).requires_grad_(True)

    def hstu(n):  # one causal sequence of n tokens
        q, k, v = leaf(n, HEADS, DIM), leaf(n, HEADS, DIM), leaf(n, HEADS, DIM)
        off = torch.tensor([0, n], device=dev)
        return lambda: triton_hstu_attention(q, k, v, off, n, 1.0 / DIM).float().sum().backward()

    def target(n):  # 8 requests x 128 targets, n history tokens in all
        q, k, v = leaf(8 * 128, HEADS, DIM), leaf(n, HEADS, DIM), leaf(n, HEADS, DIM)
        q_off = torch.arange(9, device=dev) * 128
        kv_off = torch.arange(9, device=dev) * (n // 8)
        return lambda: triton_target_attention(q, k, v, q_off, kv_off).float().sum().backward()

    def group(n):  # n tokens in groups of 4, width 32, one head (LONGER's InnerTransformer)
        q, k, v = (leaf(n // 4, 4, 1, 32) for _ in range(3))
        valid = torch.ones(n // 4, 4, dtype=torch.bool, device=dev)
        return lambda: triton_group_attention(q, k, v, valid).float().sum().backward()

    def projection(n):  # STCA history projection, d = 64, h = 128, H x Dh = 2 x 32, no grad (serving)
        x = torch.randn(n, 64, device=dev, dtype=dt)
        w = [torch.randn(*s, device=dev, dtype=dt) * 0.1 for s in ((256, 64), (64, 128), (64,), (64,), (128, 64))]

        def run():
            with torch.no_grad():
                triton_history_projection(x, *w, residual=True, eps=1e-5, num_heads=2)
        return run

    sizes = [1 << 14, 1 << 16, 1 << 18] if quick else [1 << 14, 1 << 16, 1 << 18, 1 << 20]
    rows = []
    for name, make in (("hstu_attention", hstu), ("target_attention", target), ("group_attention", group),
                       ("history_projection", projection)):
        for n in sizes:
            torch.cuda.empty_cache()
            fn = make(n)
            fn()  # compile / autotune outside the measurement
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base
            rows.append(dict(kernel=name, tokens=n, peak_extra_bytes=extra, bytes_per_token=extra / n))
            print(f"memory {name:<20} tokens {n:>8}: peak above inputs {extra / 2**20:9.1f} MiB = "
                  f"{extra / n:8.1f} B/token", flush=True)
            del fn
    results["memory"] = rows


def bench_launch_floor(results, quick):
    """Per-call floor of every kernel's forward at B = 1, L = 64 (bf16): median microseconds per call, each call
    followed by torch.cuda.synchronize(), after a warm-up that compiles and autotunes."""
    import statistics

    import torch

    from merlin_longseq.kernels.triton_group_attention import triton_group_attention
    from merlin_longseq.kernels.triton_history_projection import triton_history_projection
    from merlin_longseq.kernels.triton_hstu_attention import triton_hstu_attention
    from merlin_longseq.kernels.triton_target_attention import triton_target_attention
    from merlin_longseq.ops.group_attention import group_attention
    from merlin_longseq.ops.history_projection import history_projection
    from merlin_longseq.ops.hstu_attention import hstu_attention
    from merlin_longseq.ops.target_attention import target_attention

    dt, dev, n = torch.bfloat16, "cuda", 64
    calls = 300 if quick else 3000

    def tensor(*shape, grad=False):
        return torch.randn(*shape, device=dev, dtype=dt).requires_grad_(grad)

    def floor_us(fn, grad):
        with torch.enable_grad() if grad else torch.no_grad():
            for _ in range(20):  # compile, autotune, fill the per-bucket caches
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    offsets = torch.tensor([0, n], device=dev)
    q_off = torch.tensor([0, 8], device=dev)
    valid = torch.ones(n // 4, 4, dtype=torch.bool, device=dev)
    weights = [torch.randn(*s, device=dev, dtype=dt) * 0.1 for s in ((256, 64), (64, 128), (64,), (64,), (128, 64))]

    def cases(grad):
        q, k, v = (tensor(n, HEADS, DIM, grad=grad) for _ in range(3))
        qt = tensor(8, HEADS, DIM, grad=grad)
        qg, kg, vg = (tensor(n // 4, 4, 1, 32, grad=grad) for _ in range(3))
        x = tensor(n, 64, grad=grad)
        yield "hstu_attention", "kernel", lambda: triton_hstu_attention(q, k, v, offsets, n, 1.0 / DIM)
        yield "target_attention", "kernel", lambda: triton_target_attention(qt, k, v, q_off, offsets,
                                                                             max_history_len=n, max_targets=8)
        yield "group_attention", "kernel", lambda: triton_group_attention(qg, kg, vg, valid)
        yield "history_projection", "kernel", lambda: triton_history_projection(x, *weights, residual=True,
                                                                               eps=1e-5, num_heads=2)
        if not grad:
            yield "hstu_attention", "dispatcher", lambda: hstu_attention(q, k, v, offsets, n, 1.0 / DIM,
                                                                         backend="triton", check_inputs=False)
            yield "target_attention", "dispatcher", lambda: target_attention(
                qt, k, v, q_off, offsets, max_history_len=n, max_targets=8, backend="triton", check_inputs=False)
            yield "group_attention", "dispatcher", lambda: group_attention(qg, kg, vg, valid, backend="triton",
                                                                           check_inputs=False)
            yield "history_projection", "dispatcher", lambda: history_projection(
                x, *weights, num_heads=2, backend="triton", check_inputs=False)

    empty = torch.empty(1, device=dev)
    rows = [dict(kernel="(sync only)", path="-", grad=False, us=floor_us(torch.cuda.synchronize, False)),
            dict(kernel="(one tiny torch op)", path="-", grad=False, us=floor_us(lambda: empty.add_(1), False))]
    for grad in (False, True):
        for kernel, path, fn in cases(grad):
            rows.append(dict(kernel=kernel, path=path, grad=grad, us=floor_us(fn, grad)))
    for row in rows:
        print(f"floor {row['kernel']:<20} {row['path']:<10} {'grad' if row['grad'] else 'no grad':<7}: "
              f"{row['us']:7.1f} us/call", flush=True)
    results["launch_floor"] = rows


PEER_GRID = (  # issue 15's grid: (case, lengths) with lengths drawn once, seed 0
    ("dense B16 L4096", lambda g: [4096] * 16), ("dense B4 L8192", lambda g: [8192] * 4),
    ("dense B64 L1024", lambda g: [1024] * 64), ("dense B256 L256", lambda g: [256] * 256),
    ("ragged B16 U(1,4096)", lambda g: _uniform(g, 16, 4096)), ("ragged B64 U(1,2048)", lambda g: _uniform(g, 64, 2048)),
    ("ragged B512 U(1,512)", lambda g: _uniform(g, 512, 512)), ("ragged B8 U(1,16384)", lambda g: _uniform(g, 8, 16384)),
)


def _uniform(gen, batch, high):
    import torch
    return torch.randint(1, high + 1, (batch,), generator=gen).tolist()


def bench_peer(results, quick, peer_path):
    """Ours vs generative-recommenders' Triton HSTU kernel (read from peer_path, never copied into the repository)
    on the same inputs: plain causal SiLU attention, no bias; forward and forward + backward; ratio = peer / ours."""
    import torch
    import merlin_longseq.kernels.triton_hstu_attention as tk

    sys.path.insert(0, os.path.abspath(peer_path))
    from generative_recommenders.ops.triton.triton_hstu_attention import triton_hstu_mha

    rows = results.setdefault("peer", [])
    print(f"\n## HSTU attention: ours vs the peer kernel ({peer_path}), bf16, H={HEADS}, D={DIM}")
    print(f"{'case':24s} {'ours fwd':>9s} {'peer fwd':>9s} {'ratio':>6s} {'ours f+b':>9s} {'peer f+b':>9s} {'ratio':>6s}")
    grid = PEER_GRID[:2] + PEER_GRID[4:5] if quick else PEER_GRID
    for case, make in grid:
        lengths = make(torch.Generator().manual_seed(0))
        q, k, v, offsets, max_len, _ = hstu_inputs(lengths)
        grad = torch.randn_like(q)
        ours = time_fwd_bwd(lambda: tk.triton_hstu_attention(q, k, v, offsets, max_len, ALPHA), [q, k, v], grad)
        peer = time_fwd_bwd(lambda: triton_hstu_mha(max_len, ALPHA, q, k, v, offsets), [q, k, v], grad)
        row = dict(case=case, ours_fwd_ms=ours[0], peer_fwd_ms=peer[0], ours_fwd_bwd_ms=ours[1],
                   peer_fwd_bwd_ms=peer[1], fwd_ratio=peer[0] / ours[0], fwd_bwd_ratio=peer[1] / ours[1])
        rows.append(row)
        print(f"{case:24s} {ours[0]:9.3f} {peer[0]:9.3f} {row['fwd_ratio']:6.2f} {ours[1]:9.3f} {peer[1]:9.3f} "
              f"{row['fwd_bwd_ratio']:6.2f}", flush=True)
        _checkpoint(results)  # a long grid: a cut-off run keeps the rows it measured
        del q, k, v, grad
        torch.cuda.empty_cache()


_RESULTS_PATH = None  # set by main: where _checkpoint writes the JSON


def _checkpoint(results):
    if _RESULTS_PATH:
        with open(_RESULTS_PATH, "w") as f:
            json.dump(results, f, indent=1)


def ceilings(results):
    import torch
    from triton.testing import do_bench
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    results.update(copy_tb_s=2 * src.numel() / copy_ms / 1e9, matmul_tflop_s=2 * 8192 ** 3 / mm_ms / 1e9)
    print(f"# ceilings: copy {results['copy_tb_s']:.2f} TB/s (read + write), bf16 matmul "
          f"{results['matmul_tflop_s']:.0f} TFLOP/s")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, unit, title in ((axes[0], "hstu_sweep", "TFLOP/s", "HSTU attention forward (64K tokens)"),
                                 (axes[1], "ta_sweep", "TB/s of K/V read", "STCA cross attention forward")):
        points = results.get(key, [])
        for impl, style in (("triton", "o-"), ("sdpa", "s--"), ("pytorch", "^:")):
            xs = [p["L"] for p in points if p.get(impl)]
            ax.plot(xs, [p[impl] for p in points if p.get(impl)], style, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (history)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results.get('device', '?')}, bf16, H={HEADS}, D={DIM}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON and the plot")
    parser.add_argument("--quick", action="store_true", help="fewer cases and sweep points")
    parser.add_argument("--peer", help="folder holding generative_recommenders/ (e.g. ../shared/peer): also time "
                        "its Triton HSTU kernel beside ours on issue 15's grid")
    parser.add_argument("--only", choices=["hstu", "target", "semi", "memory", "floor", "peer"],
                        help="run one part of the benchmark")
    parser.add_argument("--plot-from", help="redraw the plot from this JSON and exit")
    args = parser.parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            plot(json.load(f), os.path.join(args.out, "bench_kernels.png"))
        return
    import torch
    import triton
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (use --plot-from to redraw a saved run)")
    torch.manual_seed(0)
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   command=" ".join(sys.argv))
    print(f"# {results['device']}  torch {torch.__version__}  triton {triton.__version__}")
    ceilings(results)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_kernels.json")
    global _RESULTS_PATH
    _RESULTS_PATH = path
    for name, fn in (("target", bench_target_attention), ("hstu", bench_hstu), ("semi", bench_semi_local),
                     ("memory", bench_memory), ("floor", bench_launch_floor),
                     ("peer", lambda r, q: bench_peer(r, q, args.peer) if args.peer else None)):
        if args.only in (None, name):
            fn(results, args.quick)
            with open(path, "w") as f:  # after each part: a later crash keeps what was measured
                json.dump(results, f, indent=1)
    try:
        plot(results, os.path.join(args.out, "bench_kernels.png"))
    except ImportError:
        print("matplotlib is not installed: no plot (the JSON holds every number)")


if __name__ == "__main__":
    main()
