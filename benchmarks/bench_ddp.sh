#!/usr/bin/env bash
# DDP scaling of STCA training: samples/s on 1 GPU and on 2 GPUs of one host, and the scaling efficiency
# (issue 8: goal >= 1.8x). Needs torch with CUDA and 2 GPUs; no Merlin stack (random request data, built in
# merlin_longseq.train_ddp with torch + numpy only).
#
#   bash benchmarks/bench_ddp.sh [OUT_DIR]          # default OUT_DIR=runs/bench_ddp
#
# Weak scaling: each GPU trains BATCH requests per step (history HISTORY_LEN events each, CANDIDATES scored
# candidates each), so 2 GPUs process twice the data per step. The 1-GPU run is plain single-process training
# (no DDP wrapper), the honest baseline. samples = scored candidates; aggregate samples/s = all ranks' samples
# over the slowest rank's time, WARMUP steps left out (Triton autotuning happens there), CUDA synchronised.
# NCCL_NVLS_ENABLE=0 keeps NVLink multicast (NVLS) off, as the machine requires.
# Settings (environment): BATCH=64 HISTORY_LEN=2048 CANDIDATES=64 STEPS=80 WARMUP=15 D_MODEL=64 N_LAYERS=2
# N_HEADS=2 NUM_ITEMS=100000 BACKEND=triton (attention kernels; 'pytorch' for the reference path) AMP=0 (1: bf16
# autocast) RAGGED=0 (1: also a ragged run, history lengths uniform in [0.1 L, L], balanced by the sampler).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-runs/bench_ddp}
PYTHON=${PYTHON:-python3}
BATCH=${BATCH:-64}
HISTORY_LEN=${HISTORY_LEN:-2048}
CANDIDATES=${CANDIDATES:-64}
STEPS=${STEPS:-80}
WARMUP=${WARMUP:-15}
D_MODEL=${D_MODEL:-64}
N_LAYERS=${N_LAYERS:-2}
N_HEADS=${N_HEADS:-2}
NUM_ITEMS=${NUM_ITEMS:-100000}
BACKEND=${BACKEND:-triton}
AMP=${AMP:-0}
RAGGED=${RAGGED:-0}
DEVICE=${DEVICE:-cuda}  # cpu: a smoke run of this script with gloo (tiny settings advised), no GPU needed
export NCCL_NVLS_ENABLE=0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$OUT"

# merlin_longseq.kernels is a package-dir mapping of kernels/: it exists only once the package is installed.
# Without it backend=triton fails loudly (auto would silently fall back to the PyTorch reference).
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('merlin_longseq.kernels') is None)" 2>/dev/null; then
    echo "installing the package (editable, no dependencies) so that merlin_longseq.kernels imports"
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || \
        echo "WARNING: install failed; with BACKEND=triton the runs will stop with a clear error"
fi

DEVICE="$DEVICE" "$PYTHON" - <<'EOF'
import os, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s):",
      ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.device_count() >= 2, "this benchmark needs 2 GPUs"
EOF

EXTRA=()
if [ "$AMP" = "1" ]; then EXTRA+=(--amp); fi

run() {  # run NAME NPROC MIN_HISTORY_FRAC
    local name=$1 nproc=$2 frac=$3 visible
    visible=$(seq -s, 0 $((nproc - 1)))
    if [ "$DEVICE" = "cpu" ]; then visible=""; fi
    echo "== $name: $nproc GPU(s), history $HISTORY_LEN (min fraction $frac), $BATCH requests x $CANDIDATES candidates per GPU per step"
    CUDA_VISIBLE_DEVICES=$visible "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
        -m merlin_longseq.train_ddp --arch stca --device "$DEVICE" --data random --backend "$BACKEND" \
        --history-len "$HISTORY_LEN" --min-history-frac "$frac" --candidates "$CANDIDATES" \
        --num-requests $((BATCH * 2 * 16)) --num-items "$NUM_ITEMS" --batch-requests "$BATCH" \
        --steps "$STEPS" --warmup-steps "$WARMUP" --log-every 20 --d-model "$D_MODEL" --n-layers "$N_LAYERS" \
        --n-heads "$N_HEADS" ${EXTRA[@]+"${EXTRA[@]}"} --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
}

run stca_fixed_1gpu 1 1.0
run stca_fixed_2gpu 2 1.0
if [ "$RAGGED" = "1" ]; then
    run stca_ragged_1gpu 1 0.1
    run stca_ragged_2gpu 2 0.1
fi

OUT="$OUT" "$PYTHON" - <<'EOF'
import json, os
out = os.environ["OUT"]
rows = []
for case in ("fixed", "ragged"):
    paths = [os.path.join(out, f"stca_{case}_{n}gpu.json") for n in (1, 2)]
    if not all(os.path.exists(p) for p in paths):
        continue
    one, two = (json.load(open(p)) for p in paths)
    rows.append(dict(case=case, device=one["device_name"], history_len=one["history_len"],
                     mean_history=one["data"]["mean_history"], batch_requests_per_gpu=one["batch_requests_per_rank"],
                     candidates=one["data"]["candidates"] // one["data"]["requests"], amp=one["amp"],
                     attention_backend=one["attention_backend"], samples_per_s_1gpu=one["samples_per_s"],
                     samples_per_s_2gpu=two["samples_per_s"], speedup=two["samples_per_s"] / one["samples_per_s"],
                     per_rank_2gpu=[r["samples_per_s"] for r in two["per_rank"]],
                     load_max_over_mean_2gpu=two["rank_load_max_over_mean_epoch0"], timed_steps=one["timed_steps"]))
json.dump(rows, open(os.path.join(out, "bench_ddp.json"), "w"), indent=2)
print("\n| case | GPU | L (mean) | requests x candidates / GPU / step | 1 GPU samples/s | 2 GPUs samples/s | speedup | efficiency |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['case']} | {r['device']} | {r['history_len']} ({r['mean_history']:.0f}) | "
          f"{r['batch_requests_per_gpu']} x {r['candidates']} | {r['samples_per_s_1gpu']:,.0f} | "
          f"{r['samples_per_s_2gpu']:,.0f} | {r['speedup']:.2f}x | {r['speedup'] / 2:.0%} |")
print(f"\nsummary -> {os.path.join(out, 'bench_ddp.json')}")
EOF
