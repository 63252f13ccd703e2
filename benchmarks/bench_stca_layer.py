"""Whole-STCA-layer benchmark: the PyTorch reference layer against ours (fused Triton history projection +
Triton target attention), forward and forward + backward, bf16.

    python3 benchmarks/bench_stca_layer.py --out DIR              # CUDA GPU: full sizes; table, JSON, png
    python3 benchmarks/bench_stca_layer.py --device cpu --quick   # seconds on a CPU (Triton interpreter, fp32)

One STCA layer (models/stca.py STCALayer) = history projection K, V = LN(x + SwiGLU(x)) W_kv^T (every history
event) + query projection q = W_Q x_t + target-to-history attention + out projection W_O. Versions:
  reference     backend pytorch for both ops (pt_history_projection + pt_target_attention);
  triton        backend triton for both ops (ours);
  ref-proj+tri  reference projection with the Triton attention (splits the gain between the two ops).
Cases: R=64 requests x T=128 targets x L=10,240 history events, uniform and ragged (lengths uniform in
1..10,240), for (d=64, H=2, Dh=32: the STCA default) and (d=256, H=4, Dh=64); SwiGLU width 2d, residual on.
Also the history projection alone: GB/s = (x read + K and V written) bytes / forward time, and peak memory.
Times: CUDA events via triton.testing.do_bench, median, after warm-up (autotuning happens in the warm-up);
on CPU a perf_counter median of a few runs. Peak memory: torch.cuda.max_memory_allocated above what was
allocated before the call (inputs and weights excluded), for one forward + backward.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VERSIONS = {"reference": ("pytorch", "pytorch"), "triton": ("triton", "triton"),
            "ref-proj+tri": ("pytorch", "triton")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true",
                        help="small shapes (CPU: tiny shapes through the Triton interpreter, a few seconds)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON and the png")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.quick:
        parser.error("--device cpu runs the Triton interpreter: add --quick (full sizes would take hours)")
    return args


def cases(device, quick):
    """(name, d, heads, head_dim, requests, targets, max_history, ragged)."""
    if device == "cpu":
        return [("uniform d16", 16, 2, 8, 2, 3, 40, False), ("ragged d32", 32, 2, 16, 3, 3, 40, True)]
    dims = [(64, 2, 32)] if quick else [(64, 2, 32), (256, 4, 64)]
    out = []
    for d, heads, head_dim in dims:
        for ragged in (False, True):
            out.append((f"{'ragged' if ragged else 'uniform'} d{d} H{heads}x{head_dim}", d, heads, head_dim,
                        64, 128, 10240, ragged))
    return out


class Timer:
    def __init__(self, device):
        self.device = device

    def __call__(self, fn, leaves=()):
        if self.device == "cuda":
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, grad_to_none=list(leaves) or None, return_mode="median")
        fn()  # warm-up (interpreter set-up)
        times = []
        for _ in range(2):
            for t in leaves:
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def peak_mb(device, fn):
    """Peak device memory of fn() above what was allocated before it, in MiB (None on CPU)."""
    if device != "cuda":
        fn()
        return None
    import torch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def build_case(device, dtype, d, heads, head_dim, requests, targets, max_history, ragged, seed=0):
    import torch
    from merlin_longseq.jagged import offsets_from_lengths
    from merlin_longseq.models.stca import STCAConfig, STCALayer

    torch.manual_seed(seed)
    cfg = STCAConfig(num_items=1, d_model=d, n_heads=heads, head_dim=head_dim)
    layer = STCALayer(cfg, 0)
    with torch.no_grad():  # the residual down projection starts at zero: never time on zeros
        torch.nn.init.normal_(layer.history_ffn.down.weight, std=0.5 / layer.history_ffn.down.weight.shape[1] ** 0.5)
    layer = layer.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    lengths = (torch.randint(1, max_history + 1, (requests,), generator=gen) if ragged
               else torch.full((requests,), max_history))
    hist_off = offsets_from_lengths(lengths).to(device)
    cand_off = offsets_from_lengths(torch.full((requests,), targets)).to(device)
    n = int(lengths.sum())
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    query = torch.randn(requests * targets, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    return dict(cfg=cfg, layer=layer, x=x, query=query, hist_off=hist_off, cand_off=cand_off, n=n,
                max_len=int(lengths.max()), targets=targets)


def projection(c, backend):
    from merlin_longseq.ops.history_projection import history_projection
    layer = c["layer"]
    ffn, norm = layer.history_ffn, layer.history_norm
    return history_projection(c["x"], ffn.gate_up.weight, ffn.down.weight, norm.weight, norm.bias,
                              layer.kv_proj.weight, num_heads=c["cfg"].n_heads, residual=c["cfg"].residual_ffn,
                              eps=norm.eps, backend=backend)


def layer_forward(c, proj_backend, attn_backend):
    """The STCALayer user side + candidate side of one layer, each op through the chosen backend."""
    from merlin_longseq.ops.target_attention import target_attention
    cfg, layer = c["cfg"], c["layer"]
    k, v = projection(c, proj_backend)
    q = layer.q_proj(c["query"]).reshape(-1, cfg.n_heads, cfg.head_dim)
    attended = target_attention(q, k, v, c["cand_off"], c["hist_off"], max_history_len=c["max_len"],
                                max_targets=c["targets"], backend=attn_backend, check_inputs=False)
    return layer.out_proj(attended.reshape(-1, cfg.n_heads * cfg.head_dim))


def run_case(timer, device, dtype, spec, results):
    import torch
    name, d, heads, head_dim, requests, targets, max_history, ragged = spec
    c = build_case(device, dtype, d, heads, head_dim, requests, targets, max_history, ragged)
    leaves = [c["x"], c["query"], *c["layer"].parameters()]
    grad = torch.randn(requests * targets, d, device=device, dtype=dtype)

    # accuracy of each bf16 version against the fp32 reference layer (same weights and inputs, upcast)
    with torch.no_grad():
        c32 = dict(c, layer=copy.deepcopy(c["layer"]).float(), x=c["x"].float(), query=c["query"].float())
        want = layer_forward(c32, "pytorch", "pytorch")
        del c32
    rows = []
    for version, (proj_backend, attn_backend) in VERSIONS.items():
        def fwd():
            with torch.no_grad():
                return layer_forward(c, proj_backend, attn_backend)

        def fwd_bwd():
            layer_forward(c, proj_backend, attn_backend).backward(grad)

        with torch.no_grad():
            got = fwd().float()
            rel_err = float((got - want).norm() / want.norm())
        row = dict(case=name, d=d, heads=heads, head_dim=head_dim, requests=requests, targets=targets,
                   history_events=c["n"], max_history=c["max_len"], version=version,
                   fwd_ms=timer(fwd), fwd_bwd_ms=timer(fwd_bwd, leaves),
                   peak_fwd_mib=peak_mb(device, fwd), peak_fwd_bwd_mib=peak_mb(device, fwd_bwd),
                   rel_err_vs_fp32=rel_err)
        for t in leaves:
            t.grad = None
        rows.append(row)
        print(f"{name:24s} {version:13s} {row['fwd_ms']:9.3f} {row['fwd_bwd_ms']:9.3f} "
              f"{_fmt(row['peak_fwd_mib'], '9.0f')} {_fmt(row['peak_fwd_bwd_mib'], '9.0f')} {rel_err:9.2e}",
              flush=True)
    ref, ours = rows[0], rows[1]
    speedup = dict(case=name, fwd=ref["fwd_ms"] / ours["fwd_ms"], fwd_bwd=ref["fwd_bwd_ms"] / ours["fwd_bwd_ms"])
    print(f"{name:24s} speed-up triton vs reference: {speedup['fwd']:.2f}x forward, "
          f"{speedup['fwd_bwd']:.2f}x forward+backward", flush=True)
    results["layer"].extend(rows)
    results["layer_speedup"].append(speedup)

    # the history projection alone
    elem = c["x"].element_size()
    moved = (c["n"] * d + 2 * c["n"] * heads * head_dim) * elem  # x read once, K and V written once
    for backend in ("pytorch", "triton"):
        def p_fwd():
            with torch.no_grad():
                return projection(c, backend)

        def p_fwd_bwd():
            k, v = projection(c, backend)
            (k.float().sum() + v.float().mul(0.5).sum()).backward()

        fwd_ms = timer(p_fwd)
        row = dict(case=name, d=d, heads=heads, head_dim=head_dim, history_events=c["n"], backend=backend,
                   fwd_ms=fwd_ms, fwd_bwd_ms=timer(p_fwd_bwd, leaves), fwd_gb_s=moved / fwd_ms / 1e6,
                   peak_fwd_mib=peak_mb(device, p_fwd), peak_fwd_bwd_mib=peak_mb(device, p_fwd_bwd))
        for t in leaves:
            t.grad = None
        results["projection"].append(row)
        print(f"{name:24s} {'proj ' + backend:13s} {fwd_ms:9.3f} {row['fwd_bwd_ms']:9.3f} "
              f"{_fmt(row['peak_fwd_mib'], '9.0f')} {_fmt(row['peak_fwd_bwd_mib'], '9.0f')} "
              f"{row['fwd_gb_s']:7.1f} GB/s", flush=True)
    del c
    if device == "cuda":
        torch.cuda.empty_cache()


def _fmt(x, spec):
    return format(x, spec) if x is not None else format("-", ">" + spec.split(".")[0])


def plot(results, path):
    from merlin_longseq.reporting import pyplot
    plt = pyplot()
    if plt is None:
        return False
    names = [s["case"] for s in results["layer_speedup"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(VERSIONS)
    for ax, metric, title in zip(axes, ("fwd_ms", "fwd_bwd_ms"), ("forward", "forward + backward")):
        for i, version in enumerate(VERSIONS):
            values = [next(r[metric] for r in results["layer"] if r["case"] == n and r["version"] == version)
                      for n in names]
            ax.bar([j + i * width for j in range(len(names))], values, width, label=version)
        ax.set_xticks([j + width for j in range(len(names))])
        ax.set_xticklabels(names, rotation=15, fontsize=7)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"STCA layer {title}, {results['dtype']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels
    import torch
    import triton

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --device cpu --quick")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32  # the interpreter runs fp32
    if args.device == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    results = dict(device=name, dtype=str(dtype).replace("torch.", ""), torch=torch.__version__,
                   triton=triton.__version__, command=" ".join(["python3"] + sys.argv), layer=[],
                   layer_speedup=[], projection=[])
    print(f"# STCA layer, {results['dtype']} on {name}")
    print(f"{'case':24s} {'version':13s} {'fwd ms':>9s} {'f+b ms':>9s} {'peak f':>9s} {'peak f+b':>9s} "
          f"{'err/GB/s':>9s}  (peak memory in MiB; err = relative error vs the fp32 reference layer)")
    timer = Timer(args.device)
    for spec in cases(args.device, args.quick):
        run_case(timer, args.device, dtype, spec, results)
    print("\n## speed-up of the whole layer, triton vs reference (target >= 1.5x)")
    for s in results["layer_speedup"]:
        print(f"  {s['case']:24s} forward {s['fwd']:.2f}x   forward+backward {s['fwd_bwd']:.2f}x")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_stca_layer.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    drawn = plot(results, os.path.join(args.out, "bench_stca_layer.png"))
    print(f"wrote {path}" + (" and bench_stca_layer.png" if drawn else " (no matplotlib: no png)"))
    return results


if __name__ == "__main__":
    main()
