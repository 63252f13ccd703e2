"""Triton fused STCA history projection (one layer's user side): LayerNorm(x + SwiGLU(x)) W_kv^T -> K, V.

Semantics (residual on/off, the SwiGLU gate/up split, K/V as the two halves of W_kv) are the docstring of
ops/pytorch/pt_history_projection.py. Forward, a program per block of BLOCK_M history rows:
  1. read the x tile [BLOCK_M, d] once;
  2. loop over the SwiGLU hidden width in chunks of BLOCK_H: gate and up dots, SiLU(gate) * up in fp32,
     accumulate the down dot into an fp32 [BLOCK_M, d] tile (no [N, h] intermediate in global memory);
  3. add the residual, LayerNorm in fp32 (mean and variance over the d real columns);
  4. loop over the K/V width in chunks of BLOCK_O: one dot each for K and V, written once.
Global memory traffic is x read once plus K and V written once; the weights (at most ~1 MB at d=256) are
re-read by every program from L2.

Supports fp32 (three-pass tf32 dots on CUDA, like the attention kernels), bf16 and fp16 (fp32 accumulation;
the SwiGLU activation and the LayerNorm output are rounded to the input dtype before their dots, as the
reference rounds them); any d <= MAX_D (padded to a power of two >= 16 with masked loads), any hidden width
and K/V width (masked chunks); rows N = 0 (nothing launched) and any N.

Backward: recomputation (activation-checkpoint style). The forward saves only its inputs; the backward custom
op re-runs the PyTorch reference under autograd and differentiates it, so the gradients equal the reference's
in the same dtype and the forward keeps no [N, h] activation alive. It is not fused: forward + backward costs
the reference's forward + backward plus this kernel's forward.

torch.library custom ops merlin_longseq::history_projection_fwd / _bwd with autograd registered (_common.KernelOp),
so torch.compile can trace them; eager calls launch directly, and a repeated (dtypes, widths, row bucket) skips the
autotuner (_common.Launcher). GPUs tested: none yet (CPU through TRITON_INTERPRET=1, fp32); tile choices
come from the sm_90 compile report (registers and spills; see _CONFIGS_BY_WIDTH).
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import (KernelOp, Launcher, autotune_off, block_d, cdiv, config, dot_precision, last_dim_contiguous,
                      pow2_bucket, pruner, set_interpret_tiles)

MAX_D = 256  # the [BLOCK_M, d] fp32 accumulator lives in registers: wider models use the reference
# Under TRITON_INTERPRET the tile sizes come from here (tests change them).
_INTERPRET = {"BLOCK_M": 16, "BLOCK_H": 16, "BLOCK_O": 16}


def _cfg(bm, bh, bo, warps, stages):
    return config(warps, stages, BLOCK_M=bm, BLOCK_H=bh, BLOCK_O=bo)


# Tile sets per (operand dtype, padded d), each led by the choice used with autotuning off. Chosen from the
# sm_90 compile report of this kernel (Triton 3.9 AOT build, cuobjdump -res-usage; no GPU run yet), in
# registers / spill-stack bytes per thread:
#   bf16 d=64:  (64,64,64,8w,2s) 192 / 0; (128,64,64,8w,2s) 255 / 8; the 4-warp 128-row tile spilled 688
#   bf16 d=128: (64,64,64,8w,2s) 254 / 0; (128,64,64,8w,2s) 253 / 0; (64,32,64,8w,1s) 195 / 0
#   bf16 d=256: (64,16,64,8w,1s) 255 / 48; (32,32,64,4w,1s) 255 / 8 (mma.sync, no wgmma); every wgmma
#               tile spills some: the [64, 256] fp32 accumulator alone is 64 registers per thread
#   fp32 d=64:  (64,32,32,8w,1s) 194 / 0; fp32 d=256 spills whatever the tile (correctness path only)
_CONFIGS_BY_WIDTH = {
    ("half", 128): [_cfg(64, 64, 64, 8, 2), _cfg(128, 64, 64, 8, 2), _cfg(64, 32, 64, 8, 1)],
    ("half", 256): [_cfg(64, 16, 64, 8, 1), _cfg(32, 32, 64, 4, 1), _cfg(64, 32, 64, 8, 1)],
    ("fp32", 64): [_cfg(64, 32, 32, 8, 1), _cfg(32, 32, 32, 8, 1)],
    ("fp32", 256): [_cfg(32, 32, 32, 8, 1)],
}
_CONFIGS = [c for configs in _CONFIGS_BY_WIDTH.values() for c in configs]


def _fitting(configs, args):
    kind = "fp32" if args["PREC"] == "tf32x3" else "half"
    width = min(w for k, w in _CONFIGS_BY_WIDTH if k == kind and w >= args["BLOCK_D"])
    kept = _CONFIGS_BY_WIDTH[(kind, width)]
    return kept[:1] if autotune_off("MERLIN_LONGSEQ_HP_AUTOTUNE") else kept


_prune = pruner(_INTERPRET, _fitting)


def _set_interpret_blocks(block_m: int, block_h: int, block_o: int) -> None:
    """Test hook: the interpreter's tile sizes (clears the autotune choice)."""
    set_interpret_tiles(_INTERPRET, (_FWD,), BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_O=block_o)


@triton.jit
def _load_2d(ptrs, r_ok, c_ok, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    """A weight tile; masks only the dimensions that can run past the end."""
    if EVEN_R:
        if EVEN_C:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=c_ok[None, :], other=0.0)
    if EVEN_C:
        return tl.load(ptrs, mask=r_ok[:, None], other=0.0)
    return tl.load(ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)


@triton.autotune(configs=_CONFIGS, key=["n_bucket", "D", "HID", "KV", "PREC"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _hp_fwd_kernel(X, WGU, WD, LNW, LNB, WKV, K, V, n_rows, stride_xn, eps, n_bucket,
                   D: tl.constexpr, HID: tl.constexpr, KV: tl.constexpr, BLOCK_D: tl.constexpr,
                   RESIDUAL: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr):
    """Program per BLOCK_M rows. WGU [2 HID, D] (gate rows, then up rows), WD [D, HID], WKV [2 KV, D] (K rows,
    then V rows), all contiguous; K, V [n_rows, KV] contiguous."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x = tl.load(X + rows64[:, None] * stride_xn + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)  # [BM, BD]; padded columns are 0, so they add nothing to any dot
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # the down projection, then z
    for h0 in range(0, HID, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < HID
        w_gate = _load_2d(WGU + offs_h[:, None] * D + offs_d[None, :], h_ok, d_ok, HID % BLOCK_H == 0,
                          D == BLOCK_D)  # [BH, BD]
        w_up = _load_2d(WGU + (offs_h + HID)[:, None] * D + offs_d[None, :], h_ok, d_ok, HID % BLOCK_H == 0,
                        D == BLOCK_D)
        gate = tl.dot(x, tl.trans(w_gate), input_precision=PREC)  # [BM, BH] fp32
        up = tl.dot(x, tl.trans(w_up), input_precision=PREC)
        act = gate * tl.sigmoid(gate) * up  # masked hidden units: gate = up = 0 -> 0
        w_down = _load_2d(WD + offs_d[:, None] * HID + offs_h[None, :], d_ok, h_ok, D == BLOCK_D,
                          HID % BLOCK_H == 0)  # [BD, BH]
        acc = tl.dot(act.to(x.dtype), tl.trans(w_down), acc, input_precision=PREC)
    if RESIDUAL:
        acc += x.to(tl.float32)
    # LayerNorm over the D real columns (padded columns of acc are exactly 0)
    mean = tl.sum(acc, 1) / D
    diff = tl.where(d_ok[None, :], acc - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / D + eps)
    ln_w = tl.load(LNW + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    ln_b = tl.load(LNB + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    y = (diff * rstd[:, None] * ln_w[None, :] + ln_b[None, :]).to(x.dtype)  # padded columns: 0
    for o0 in range(0, KV, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_ok = offs_o < KV
        w_k = _load_2d(WKV + offs_o[:, None] * D + offs_d[None, :], o_ok, d_ok, KV % BLOCK_O == 0, D == BLOCK_D)
        w_v = _load_2d(WKV + (offs_o + KV)[:, None] * D + offs_d[None, :], o_ok, d_ok, KV % BLOCK_O == 0,
                       D == BLOCK_D)
        out_offs = rows64[:, None] * KV + offs_o[None, :]
        out_ok = row_ok[:, None] & o_ok[None, :]
        k = tl.dot(y, tl.trans(w_k), input_precision=PREC)  # [BM, BO]
        tl.store(K + out_offs, k.to(K.dtype.element_ty), mask=out_ok)
        v = tl.dot(y, tl.trans(w_v), input_precision=PREC)
        tl.store(V + out_offs, v.to(V.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------
_FWD = Launcher(_hp_fwd_kernel)


@functools.lru_cache(maxsize=None)
def _constexprs(bucket) -> dict:
    """The kernel's arguments fixed by the bucket: computed once per bucket."""
    _, dtype, _, d, hid, kv, residual, n_bucket = bucket
    return dict(n_bucket=n_bucket, D=d, HID=hid, KV=kv, BLOCK_D=block_d(d), RESIDUAL=residual,
                PREC=dot_precision(dtype))


def _fwd_impl(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ln_weight: torch.Tensor,
              ln_bias: torch.Tensor, w_kv: torch.Tensor, residual: bool, eps: float,
              num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    hid, kv = w_gate_up.shape[0] // 2, w_kv.shape[0] // 2
    k = torch.empty((n, num_heads, kv // num_heads), dtype=x.dtype, device=x.device)
    v = torch.empty_like(k)
    if n == 0:
        return k, v
    x = last_dim_contiguous(x)
    weights = tuple(t.contiguous() for t in (w_gate_up, w_down, ln_weight, ln_bias, w_kv))
    # the bucket: all that the constexprs and the autotuner's key depend on (every tensor's dtype too)
    bucket = (x.device, x.dtype, tuple(t.dtype for t in weights), d, hid, kv, bool(residual),
              pow2_bucket(n, 1024, 65536))
    _FWD(bucket, lambda meta: (cdiv(n, meta["BLOCK_M"]),),
         X=x, WGU=weights[0], WD=weights[1], LNW=weights[2], LNB=weights[3], WKV=weights[4], K=k, V=v, n_rows=n,
         stride_xn=x.stride(0), eps=float(eps), **_constexprs(bucket))
    return k, v


# ---------------------------------------------------------------------------------------------------------
# backward: recomputation in PyTorch
# ---------------------------------------------------------------------------------------------------------
_BWD_CHUNK = 65536  # rows per backward step: the recomputed [rows, 2h] activations stay this size


def _bwd_rows(grad_kv, x, w_gate_up, w_down, ln_weight, ln_bias, w_kv, residual, eps):
    """One block of rows: recompute the forward's activations, then the gradient formulas by hand.
    Returns dx and the fp32 weight-gradient contributions of these rows."""
    hid = w_gate_up.shape[0] // 2
    gate, up = (x @ w_gate_up.t()).float().split(hid, dim=1)  # [n, h] each
    sig = torch.sigmoid(gate)
    act = (gate * sig * up).to(x.dtype)  # rounded like the forward's dot operand
    z = (act @ w_down.t()).float()  # [n, d]
    if residual:
        z = z + x.float()
    var, mean = torch.var_mean(z, dim=1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    z_hat = (z - mean) * rstd
    y = (z_hat * ln_weight.float() + ln_bias.float()).to(x.dtype)
    # weight gradients: matmuls in the input dtype (fp32 accumulation inside, like the reference's autograd)
    d_w_kv = (grad_kv.t() @ y).float()  # [2 KV, d]
    d_y = (grad_kv @ w_kv).float()  # [n, d]
    d_ln_w = (d_y * z_hat).sum(0)
    d_ln_b = d_y.sum(0)
    d_yw = d_y * ln_weight.float()
    # LayerNorm backward: rstd * (g - mean(g) - z_hat * mean(g * z_hat)), g = dL/dy * weight
    d_z = rstd * (d_yw - d_yw.mean(1, keepdim=True) - z_hat * (d_yw * z_hat).mean(1, keepdim=True))
    d_z_low = d_z.to(x.dtype)
    d_w_down = (d_z_low.t() @ act).float()  # [d, h]
    d_act = (d_z_low @ w_down).float()  # [n, h]
    d_gate = d_act * up * sig * (1.0 + gate * (1.0 - sig))  # SiLU'(g) = sig (1 + g (1 - sig))
    d_up = d_act * gate * sig
    d_gu = torch.cat([d_gate, d_up], dim=1).to(x.dtype)  # [n, 2h]
    d_w_gate_up = (d_gu.t() @ x).float()  # [2h, d]
    d_x = (d_gu @ w_gate_up).float()
    if residual:
        d_x = d_x + d_z
    return d_x.to(x.dtype), (d_w_gate_up, d_w_down, d_ln_w, d_ln_b, d_w_kv)


def _bwd_impl(grad_k: torch.Tensor, grad_v: torch.Tensor, x: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, w_kv: torch.Tensor,
              residual: bool, eps: float, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor, torch.Tensor]:
    # The forward kept no intermediates: recompute them block by block (so the extra memory is bounded by
    # _BWD_CHUNK rows, not N) and apply the gradient formulas; weight gradients accumulate in fp32.
    n, kv = x.shape[0], w_kv.shape[0] // 2
    grad_kv = torch.cat([grad_k.reshape(n, kv), grad_v.reshape(n, kv)], dim=1).to(x.dtype)  # [N, 2 KV]
    d_x = torch.empty_like(x)
    totals = [torch.zeros(t.shape, dtype=torch.float32, device=t.device)
              for t in (w_gate_up, w_down, ln_weight, ln_bias, w_kv)]
    for start in range(0, n, _BWD_CHUNK):
        stop = min(n, start + _BWD_CHUNK)
        d_x[start:stop], parts = _bwd_rows(grad_kv[start:stop], x[start:stop], w_gate_up, w_down, ln_weight,
                                           ln_bias, w_kv, residual, eps)
        for total, part in zip(totals, parts):
            total += part
    weights = (w_gate_up, w_down, ln_weight, ln_bias, w_kv)
    return (d_x, *(total.to(w.dtype) for total, w in zip(totals, weights)))


# ---------------------------------------------------------------------------------------------------------
# custom ops (torch.compile can trace them) and autograd
# ---------------------------------------------------------------------------------------------------------
def _fwd_fake(x, w_gate_up, w_down, ln_weight, ln_bias, w_kv, residual, eps, num_heads):
    shape = (x.shape[0], num_heads, w_kv.shape[0] // (2 * num_heads))
    return x.new_empty(shape), x.new_empty(shape)


def _bwd_fake(grad_k, grad_v, x, w_gate_up, w_down, ln_weight, ln_bias, w_kv, residual, eps, num_heads):
    return tuple(torch.empty_like(t) for t in (x, w_gate_up, w_down, ln_weight, ln_bias, w_kv))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])  # inputs only: the backward recomputes
    ctx.params = inputs[6:]


def _backward(ctx, bwd, grad_k, grad_v):
    saved = ctx.saved_tensors
    x, w_kv = saved[0], saved[5]
    shape = (x.shape[0], ctx.params[2], w_kv.shape[0] // (2 * ctx.params[2]))
    grad_k = grad_k if grad_k is not None else x.new_zeros(shape)
    grad_v = grad_v if grad_v is not None else x.new_zeros(shape)
    return (*bwd(grad_k, grad_v, *saved, *ctx.params), None, None, None)


_OP = KernelOp("history_projection", _fwd_impl, _fwd_fake, _bwd_impl, _bwd_fake, _setup_context, _backward,
               grad_inputs=range(6))


def triton_history_projection(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w_kv: torch.Tensor,
    *,
    residual: bool,
    eps: float,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, d]; w_gate_up [2h, d]; w_down [d, h]; ln_weight, ln_bias [d]; w_kv [2 H Dh, d] -> K, V [N, H, Dh]
    (contiguous). Inputs are not checked here: ops/history_projection.py does that."""
    return _OP(x, w_gate_up, w_down, ln_weight, ln_bias, w_kv, bool(residual), float(eps), int(num_heads))
