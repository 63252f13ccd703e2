"""Triton HSTU pointwise attention on jagged sequences: forward and backward.

    out_i = sum_j mask(i, j) * SiLU(alpha * q_i . k_j + rab(i, j)) / max_seq_len * v_j

The contract (mask rules, targets, relative bias) is the docstring of ops/pytorch/pt_hstu_attention.py.

Supports
  - jagged q, k [total, H, Dqk], v [total, H, Dv] + offsets [B + 1] (int64 or int32); never builds L x L;
  - dtypes fp32 (exact sigmoid, tf32x3 dots on CUDA), bf16 and fp16 (fp32 accumulation; on CUDA the SiLU
    uses the one-instruction tanh.approx.f32 unless FAST_SILU is off, see below);
  - head dims Dqk, Dv any size up to 256 (padded to a power of two >= 16 with masked loads; tested 16..128);
  - masks: causal or not, semi-local (local_window K1 + global_prefix K2), num_targets; fully masked key
    blocks are never visited (causal: keys <= the block's last row; semi-local: the prefix and the band);
  - relative bias: per-head (or shared, H = 1) position-bucket and log2 time-bucket tables, fused in every
    kernel; their gradients are fused into the dK/dV kernel (tile-wise bucket sums + fp32 atomics);
  - backward: one kernel for dK/dV (a program per key block) and one for dQ (a program per query block),
    deterministic except for the bias-table gradients (atomics);
  - torch.library custom ops merlin_longseq::hstu_attention_fwd / _bwd with fake implementations and autograd
    (_common.KernelOp), so torch.compile traces around them; eager calls launch the kernels directly.
GPUs tested: H100 (triton 3.6); CPU through TRITON_INTERPRET=1 (triton 3.9), fp32 only.
Autotune keys use the length bucketed to a power of two, so varying batches do not re-tune; each bucket's
constexprs and tuned config are kept (_common.Launcher), so a repeated call of a bucket only launches.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (KernelOp, Launcher, area_limited, block_d, cdiv, dot_precision, last_dim_contiguous, load_rows,
                      mn_config as _cfg, pow2_bucket, pruner, set_interpret_tiles)

# The tanh-based SiLU on CUDA for bf16/fp16 (see header): on the H100, B=16 L=4096 forward 409 TFLOP/s against
# 258 with the exact sigmoid, same relative error vs fp32 (2.4e-3, bf16 rounding dominates). For strongly
# negative s, h + h * tanh(h) cancels and its absolute error (~|h| 2^-11) exceeds the tiny true value, which
# stays below the bf16 rounding of the large entries. The benchmark times both.
FAST_SILU = True
# Bucket gradients of a tile are summed bucket by bucket when the tile holds fewer distinct buckets than
# this; wider tiles fall back to one atomic per element (correct, slower).
_BUCKET_LOOP_MAX = 8
# Tile shapes used under TRITON_INTERPRET (tests change them through _set_interpret_blocks).
_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 16}

# BLOCK_M = query rows per tile, BLOCK_N = key rows per tile, in every kernel. The first entry of each list
# is the default when autotuning is switched off (MERLIN_LONGSEQ_HSTU_AUTOTUNE=0).
_FWD_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3),
                _cfg(128, 32, 4, 3), _cfg(64, 128, 4, 3)]
_DKDV_CONFIGS = [_cfg(64, 128, 8, 2), _cfg(64, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 3),
                 _cfg(32, 128, 8, 2)]
_DQ_CONFIGS = [_cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3),
               _cfg(64, 32, 4, 3)]


def _fitting(configs, args):
    # wide heads, fp32 operands or fused bias gradients: smaller tiles, or registers spill
    # fp32 operands: 64 x 64 at most (the H100 run: a 128 x 64 fp32 dQ tile asked for 256 KB of shared memory)
    heavy = max(args["BLOCK_DQK"], args["BLOCK_DV"]) > 64
    small = args.get("POS_GRAD") or args.get("TIME_GRAD") or args["PREC"] != "tf32"
    limit = 64 * 64 if small else 128 * 64 if heavy else 1 << 30
    return area_limited(configs, limit, "MERLIN_LONGSEQ_HSTU_AUTOTUNE")


_prune = pruner(_INTERPRET, _fitting)


def _set_interpret_blocks(block_m: int, block_n: int) -> None:
    """Test hook: the interpreter's tile sizes (clears the autotune choices so they take effect)."""
    set_interpret_tiles(_INTERPRET, (_FWD, _DKDV, _DQ), BLOCK_M=block_m, BLOCK_N=block_n)


_KEY = ["len_bucket", "DQK", "DV", "CAUSAL", "HAS_WINDOW", "HAS_TARGETS", "HAS_POS", "HAS_TIME", "SILU_MODE"]


# ---------------------------------------------------------------------------------------------------------
# tile helpers
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _tanh_approx(x):
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _silu_fwd(qk, alpha, rab, HAS_BIAS: tl.constexpr, SILU_MODE: tl.constexpr):
    """SiLU(s), s = alpha * qk + rab."""
    if SILU_MODE == 1:
        # s * sigmoid(s) = h + h * tanh(h) with h = s / 2: one MUFU op (instead of exp + reciprocal) and
        # one multiply for both scales
        h = qk * (0.5 * alpha)
        if HAS_BIAS:
            h = tl.fma(rab, 0.5, h)
        return tl.fma(h, _tanh_approx(h), h)
    else:
        s = qk * alpha
        if HAS_BIAS:
            s += rab
        return s * tl.sigmoid(s)


@triton.jit
def _silu_bwd(qk, alpha, rab, HAS_BIAS: tl.constexpr, SILU_MODE: tl.constexpr):
    """(SiLU(s), SiLU'(s)), SiLU'(s) = sig * (1 + s * (1 - sig)); with h = s / 2, t = tanh(h):
    SiLU = h + h t, sig = (1 + t) / 2, SiLU' = sig + sig * (h - h t)."""
    if SILU_MODE == 1:
        h = qk * (0.5 * alpha)
        if HAS_BIAS:
            h = tl.fma(rab, 0.5, h)
        t = _tanh_approx(h)
        ht = h * t
        sig = tl.fma(t, 0.5, 0.5)
        return h + ht, tl.fma(sig, h - ht, sig)
    else:
        s = qk * alpha
        if HAS_BIAS:
            s += rab
        sig = tl.sigmoid(s)
        return s * sig, tl.fma(sig, tl.fma(-s, sig, s), sig)


@triton.jit
def _allowed(rows, cols, n, nh, window, prefix,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TARGETS: tl.constexpr):
    """Broadcast rows / cols to the bool mask of the reference (history rules, then target rows)."""
    ok = (rows < nh) & (cols < nh)
    if CAUSAL:
        ok = ok & (cols <= rows)
    if HAS_WINDOW:
        near = (rows - cols) < window
        if not CAUSAL:
            near = near & ((cols - rows) < window)
        ok = ok & (near | (cols < prefix))
    if HAS_TARGETS:
        ok = ok | ((rows >= nh) & (rows < n) & ((cols < nh) | (cols == rows)))
    return ok


@triton.jit
def _pos_bucket(rows, cols, nh, num_pos):
    # every target sits at position nh (right after the history)
    return tl.minimum(tl.abs(tl.minimum(rows, nh) - tl.minimum(cols, nh)), num_pos - 1)


@triton.jit
def _time_bucket(t_rows, t_cols, time_cap, num_time):
    # floor(log2(1 + |gap|)) exactly, for int64 gaps: the exponent field of float(x), minus one where the
    # float rounding carried x up to the next power of two (x >> e == 0). x is capped at 2^(T-1), the last
    # bucket, so e stays <= 62.
    x = tl.minimum(tl.abs(t_rows - t_cols) + 1, time_cap)
    e = ((x.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = e - ((x >> e.to(tl.int64)) == 0).to(tl.int32)
    return tl.minimum(e, num_time - 1)


@triton.jit
def _rab(rows, cols, nh, t_rows, t_cols, PosTab, TimeTab, num_pos, num_time, time_cap,
         HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr):
    if HAS_POS:
        rab = tl.load(PosTab + _pos_bucket(rows, cols, nh, num_pos)).to(tl.float32)
        if HAS_TIME:
            rab += tl.load(TimeTab + _time_bucket(t_rows, t_cols, time_cap, num_time)).to(tl.float32)
    else:
        rab = tl.load(TimeTab + _time_bucket(t_rows, t_cols, time_cap, num_time)).to(tl.float32)
    return rab


@triton.jit
def _bucket_grad(Grad, buckets, ds, valid, LOOP_MAX: tl.constexpr):
    """Grad[b] += sum of ds over the tile elements in bucket b (valid ones only)."""
    lo = tl.min(tl.where(valid, buckets, 1 << 30))
    hi = tl.max(tl.where(valid, buckets, -1))
    if hi - lo < LOOP_MAX:
        # few buckets (tiles far from the diagonal, log2 time buckets): one reduction + atomic each
        for b in range(lo, hi + 1):
            tl.atomic_add(Grad + b, tl.sum(tl.where(valid & (buckets == b), ds, 0.0)), sem="relaxed")
    else:
        tl.atomic_add(Grad + buckets, ds, mask=valid, sem="relaxed")


@triton.jit
def _query_block_key_ranges(m0, n, nh, window, prefix, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                            HAS_TARGETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys that rows [m0, m0 + BLOCK_M) may see: [0, a_hi), fully allowed below u_hi (the causal range or
    the global prefix), and [b_lo, b_hi) (the local band, or the targets' diagonal), fully allowed on the
    tiles inside [bu_lo, bu_hi). b_start is b_lo rounded down to a tile (b_hi when the range is empty)."""
    m1 = tl.minimum(m0 + BLOCK_M, n)
    if CAUSAL:
        hist_hi = tl.minimum(m1, nh)
        full = tl.minimum(m0 + 1, nh)  # keys every row of the block sees
    else:
        hist_hi = nh
        full = nh
    if HAS_WINDOW:
        a_hi = tl.minimum(prefix, hist_hi)  # the global prefix
        b_lo = tl.maximum(a_hi, m0 - window + 1)  # the local band, after the prefix
        if CAUSAL:
            b_hi = hist_hi
            band_full_hi = m0 + 1
        else:
            b_hi = tl.minimum(nh, m1 + window - 1)
            band_full_hi = m0 + window
        full = tl.minimum(full, prefix)
        # band tiles every row of the block sees: m1 - 1 - j < window and the causal / far-side limit
        bu_lo = tl.cdiv(tl.maximum(b_lo, m1 - window), BLOCK_N) * BLOCK_N
        bu_hi = (tl.minimum(b_hi, band_full_hi) // BLOCK_N) * BLOCK_N
    else:
        a_hi = hist_hi
        b_lo = hist_hi
        b_hi = hist_hi
        bu_lo = hist_hi
        bu_hi = hist_hi
    if HAS_TARGETS:
        if m1 > nh:
            # target rows see the whole history, then themselves (the diagonal past nh), always masked
            a_hi = nh
            b_lo = tl.maximum(m0, nh)
            b_hi = m1
            bu_lo = m1
            bu_hi = m1
    u_hi = tl.minimum((full // BLOCK_N) * BLOCK_N, a_hi)
    b_start = (b_lo // BLOCK_N) * BLOCK_N
    if b_lo >= b_hi:
        b_start = b_hi
    return a_hi, u_hi, b_lo, b_start, b_hi, bu_lo, bu_hi


# ---------------------------------------------------------------------------------------------------------
# forward and dQ: a program per query block; both walk the same key tiles
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _q_tile(acc, q, do, rows, s0, lo, hi, apply_mask, K_base, V_base, TS_base, t_rows, PosTab, TimeTab,
            stride_kt, stride_vt, n, nh, window, prefix, alpha, num_pos, num_time, time_cap,
            DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr,
            HAS_TIME: tl.constexpr, SILU_MODE: tl.constexpr, PREC: tl.constexpr, MASK_LOADS: tl.constexpr,
            IS_DQ: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tile [s0, s0 + BLOCK_N). Forward: acc += SiLU(s) V; dQ (IS_DQ): acc += (dO V^T * SiLU'(s)) K.
    With apply_mask (constexpr, or a run-time flag) keys outside [lo, hi) or refused by the mask count zero;
    without, the tile is known to be fully allowed (and, without MASK_LOADS, in bounds)."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = s0 + tl.arange(0, BLOCK_N)
    col_ok = (cols >= lo) & (cols < hi)
    k = load_rows(K_base, cols, stride_kt, offs_dqk, col_ok, DQK, BLOCK_DQK, MASK_LOADS)
    v = load_rows(V_base, cols, stride_vt, offs_dv, col_ok, DV, BLOCK_DV, MASK_LOADS)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    rab = 0.0
    if HAS_POS or HAS_TIME:
        t_cols = tl.load(TS_base + cols, mask=cols < n, other=0) if HAS_TIME else cols
        rab = _rab(rows[:, None], cols[None, :], nh, t_rows[:, None], t_cols[None, :], PosTab, TimeTab,
                   num_pos, num_time, time_cap, HAS_POS, HAS_TIME)
    if IS_DQ:
        _, dsilu = _silu_bwd(qk, alpha, rab, HAS_POS or HAS_TIME, SILU_MODE)
        w = tl.dot(do, tl.trans(v), input_precision=PREC) * dsilu
    else:
        w = _silu_fwd(qk, alpha, rab, HAS_POS or HAS_TIME, SILU_MODE)
    if apply_mask:
        ok = _allowed(rows[:, None], cols[None, :], n, nh, window, prefix, CAUSAL, HAS_WINDOW, HAS_TARGETS)
        w = tl.where(ok & col_ok[None, :], w, 0.0)
    rhs = k if IS_DQ else v
    return tl.dot(w.to(rhs.dtype), rhs, acc, input_precision=PREC)


@triton.jit
def _q_keys(acc, q, do, rows, m0, n, nh, K_base, V_base, TS_base, t_rows, PosTab, TimeTab, stride_kt, stride_vt,
            window, prefix, alpha, num_pos, num_time, time_cap,
            DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr,
            HAS_TIME: tl.constexpr, SILU_MODE: tl.constexpr, PREC: tl.constexpr, IS_DQ: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    a_hi, u_hi, b_lo, b_start, b_hi, bu_lo, bu_hi = _query_block_key_ranges(
        m0, n, nh, window, prefix, CAUSAL, HAS_WINDOW, HAS_TARGETS, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:
        # semi-local rows see few tiles: one loop over prefix + band (one pipeline ramp per program), the
        # mask applied only on the tiles that need it
        n_a = tl.cdiv(a_hi, BLOCK_N)
        for t in range(0, n_a + tl.cdiv(b_hi - b_start, BLOCK_N)):
            in_a = t < n_a
            s0 = tl.where(in_a, t * BLOCK_N, b_start + (t - n_a) * BLOCK_N)
            lo = tl.where(in_a, 0, b_lo)
            hi = tl.where(in_a, a_hi, b_hi)
            masked = tl.where(in_a, s0 + BLOCK_N > u_hi, (s0 < bu_lo) | (s0 + BLOCK_N > bu_hi))
            acc = _q_tile(acc, q, do, rows, s0, lo, hi, masked, K_base, V_base, TS_base, t_rows, PosTab, TimeTab,
                          stride_kt, stride_vt, n, nh, window, prefix, alpha, num_pos, num_time, time_cap,
                          DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW, HAS_TARGETS, HAS_POS, HAS_TIME,
                          SILU_MODE, PREC, True, IS_DQ, BLOCK_N)
    else:
        # the causal (or full) range: unmasked tiles, then the masked diagonal ones
        for s0 in range(0, u_hi, BLOCK_N):
            acc = _q_tile(acc, q, do, rows, s0, 0, u_hi, False, K_base, V_base, TS_base, t_rows, PosTab, TimeTab,
                          stride_kt, stride_vt, n, nh, window, prefix, alpha, num_pos, num_time, time_cap,
                          DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW, HAS_TARGETS, HAS_POS, HAS_TIME,
                          SILU_MODE, PREC, False, IS_DQ, BLOCK_N)
        for s0 in range(u_hi, a_hi, BLOCK_N):
            acc = _q_tile(acc, q, do, rows, s0, u_hi, a_hi, True, K_base, V_base, TS_base, t_rows, PosTab,
                          TimeTab, stride_kt, stride_vt, n, nh, window, prefix, alpha, num_pos, num_time, time_cap,
                          DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW, HAS_TARGETS, HAS_POS, HAS_TIME,
                          SILU_MODE, PREC, True, IS_DQ, BLOCK_N)
        if HAS_TARGETS:
            for s0 in range(b_start, b_hi, BLOCK_N):
                acc = _q_tile(acc, q, do, rows, s0, b_lo, b_hi, True, K_base, V_base, TS_base, t_rows, PosTab,
                              TimeTab, stride_kt, stride_vt, n, nh, window, prefix, alpha, num_pos, num_time,
                              time_cap, DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW, HAS_TARGETS, HAS_POS,
                              HAS_TIME, SILU_MODE, PREC, True, IS_DQ, BLOCK_N)
    return acc


@triton.jit
def _q_program(Q, K, V, DO, Out, Offsets, NumTargets, Timestamps, PosTab, TimeTab,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
               stride_ot, stride_oh, stride_pos_h, stride_time_h, num_heads, alpha, out_scale, window, prefix,
               num_pos, num_time, time_cap,
               DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr,
               HAS_TIME: tl.constexpr, SILU_MODE: tl.constexpr, PREC: tl.constexpr, IS_DQ: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out[rows] = out_scale * acc for one (query block, sequence, head); Out is [total, H, Dv] (forward) or
    [total, H, Dqk] (dQ)."""
    # last query blocks first: under the causal mask they carry the most keys (better tail balance)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_start = tl.load(Offsets + b).to(tl.int64)
    n = (tl.load(Offsets + b + 1) - seq_start).to(tl.int32)
    m0 = pid_m * BLOCK_M
    if m0 < n:
        nh = n
        if HAS_TARGETS:
            nh = n - tl.load(NumTargets + b).to(tl.int32)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        offs_dqk = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = load_rows(Q + seq_start * stride_qt + h * stride_qh, rows, stride_qt, offs_dqk, row_ok, DQK,
                       BLOCK_DQK, True)
        do = q
        if IS_DQ:
            do = load_rows(DO + seq_start * stride_dot + h * stride_doh, rows, stride_dot, offs_dv, row_ok, DV,
                            BLOCK_DV, True)
        TS_base = Timestamps + seq_start
        t_rows = rows
        if HAS_TIME:
            t_rows = tl.load(TS_base + rows, mask=row_ok, other=0)
        if IS_DQ:
            acc = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
            offs_out = offs_dqk
            d_out = DQK
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
            offs_out = offs_dv
            d_out = DV
        acc = _q_keys(acc, q, do, rows, m0, n, nh, K + seq_start * stride_kt + h * stride_kh,
                      V + seq_start * stride_vt + h * stride_vh, TS_base, t_rows, PosTab + h * stride_pos_h,
                      TimeTab + h * stride_time_h, stride_kt, stride_vt, window, prefix, alpha, num_pos, num_time,
                      time_cap, DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW, HAS_TARGETS, HAS_POS, HAS_TIME,
                      SILU_MODE, PREC, IS_DQ, BLOCK_M, BLOCK_N)
        acc = acc * out_scale
        out_ptrs = Out + seq_start * stride_ot + h * stride_oh + rows[:, None].to(tl.int64) * stride_ot \
            + offs_out[None, :]
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_out[None, :] < d_out))


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _hstu_fwd_kernel(Q, K, V, Out, Offsets, NumTargets, Timestamps, PosTab, TimeTab,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     stride_pos_h, stride_time_h, num_heads, alpha, inv_max_len, window, prefix,
                     num_pos, num_time, time_cap, len_bucket,
                     DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TARGETS: tl.constexpr,
                     HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, SILU_MODE: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _q_program(Q, K, V, Q, Out, Offsets, NumTargets, Timestamps, PosTab, TimeTab,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qt, stride_qh,
               stride_ot, stride_oh, stride_pos_h, stride_time_h, num_heads, alpha, inv_max_len, window, prefix,
               num_pos, num_time, time_cap, DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW, HAS_TARGETS,
               HAS_POS, HAS_TIME, SILU_MODE, PREC, False, BLOCK_M, BLOCK_N)


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _hstu_bwd_dq_kernel(Q, K, V, DO, DQ, Offsets, NumTargets, Timestamps, PosTab, TimeTab,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                        stride_dqt, stride_dqh, stride_pos_h, stride_time_h, num_heads, alpha, inv_max_len,
                        window, prefix, num_pos, num_time, time_cap, len_bucket,
                        DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TARGETS: tl.constexpr,
                        HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, SILU_MODE: tl.constexpr,
                        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _q_program(Q, K, V, DO, DQ, Offsets, NumTargets, Timestamps, PosTab, TimeTab,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
               stride_dqt, stride_dqh, stride_pos_h, stride_time_h, num_heads, alpha, alpha * inv_max_len, window,
               prefix, num_pos, num_time, time_cap, DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW, HAS_TARGETS,
               HAS_POS, HAS_TIME, SILU_MODE, PREC, True, BLOCK_M, BLOCK_N)


# ---------------------------------------------------------------------------------------------------------
# backward: dK, dV (and the bias-table gradients), a program per key block
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _kv_tile(dk, dv, k, v, cols, r0, hi, apply_mask, Q_base, DO_base, TS_base, t_cols, PosTab, TimeTab, DPos,
             DTime, stride_qt, stride_dot, n, nh, window, prefix, alpha, num_pos, num_time, time_cap,
             DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr,
             HAS_TIME: tl.constexpr, POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr, SILU_MODE: tl.constexpr,
             PREC: tl.constexpr, MASK_LOADS: tl.constexpr, BLOCK_M: tl.constexpr, LOOP_MAX: tl.constexpr):
    """Query rows [r0, r0 + BLOCK_M) (those >= hi count zero) into dK, dV of this key block. Tiles are
    transposed ([keys, rows]) so the dots need no transposed accumulator. apply_mask as in _q_tile."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < hi
    q = load_rows(Q_base, rows, stride_qt, offs_dqk, row_ok, DQK, BLOCK_DQK, MASK_LOADS)
    do = load_rows(DO_base, rows, stride_dot, offs_dv, row_ok, DV, BLOCK_DV, MASK_LOADS)
    qk = tl.dot(k, tl.trans(q), input_precision=PREC)  # [keys, rows]
    rab = 0.0
    if HAS_POS or HAS_TIME:
        t_rows = tl.load(TS_base + rows, mask=rows < n, other=0) if HAS_TIME else rows
        rab = _rab(rows[None, :], cols[:, None], nh, t_rows[None, :], t_cols[:, None], PosTab, TimeTab,
                   num_pos, num_time, time_cap, HAS_POS, HAS_TIME)
    p, dsilu = _silu_bwd(qk, alpha, rab, HAS_POS or HAS_TIME, SILU_MODE)
    ds = tl.dot(v, tl.trans(do), input_precision=PREC) * dsilu
    if apply_mask:
        ok = _allowed(rows[None, :], cols[:, None], n, nh, window, prefix, CAUSAL, HAS_WINDOW, HAS_TARGETS)
        ok = ok & row_ok[None, :] & (cols[:, None] < n)
        p = tl.where(ok, p, 0.0)
        ds = tl.where(ok, ds, 0.0)
    else:
        ok = (cols[:, None] >= 0) & (rows[None, :] >= 0)  # every element counts
    dv = tl.dot(p.to(do.dtype), do, dv, input_precision=PREC)
    dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PREC)
    if POS_GRAD:
        _bucket_grad(DPos, _pos_bucket(rows[None, :], cols[:, None], nh, num_pos), ds, ok, LOOP_MAX)
    if TIME_GRAD:
        _bucket_grad(DTime, _time_bucket(t_rows[None, :], t_cols[:, None], time_cap, num_time), ds, ok, LOOP_MAX)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY + ["POS_GRAD", "TIME_GRAD"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["DPos", "DTime"])
@triton.jit
def _hstu_bwd_dkdv_kernel(Q, K, V, DO, DK, DV_out, DPos, DTime, Offsets, NumTargets, Timestamps, PosTab, TimeTab,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                          stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_pos_h, stride_time_h,
                          num_heads, alpha, inv_max_len, window, prefix, num_pos, num_time, time_cap, len_bucket,
                          DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TARGETS: tl.constexpr,
                          HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, POS_GRAD: tl.constexpr,
                          TIME_GRAD: tl.constexpr, SILU_MODE: tl.constexpr, PREC: tl.constexpr,
                          LOOP_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # first key blocks first: under the causal mask they are seen by the most rows
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_start = tl.load(Offsets + b).to(tl.int64)
    n = (tl.load(Offsets + b + 1) - seq_start).to(tl.int32)
    n0 = pid_n * BLOCK_N
    if n0 < n:
        nh = n
        if HAS_TARGETS:
            nh = n - tl.load(NumTargets + b).to(tl.int32)
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        offs_dqk = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        k = load_rows(K + seq_start * stride_kt + h * stride_kh, cols, stride_kt, offs_dqk, col_ok, DQK,
                       BLOCK_DQK, True)
        v = load_rows(V + seq_start * stride_vt + h * stride_vh, cols, stride_vt, offs_dv, col_ok, DV,
                       BLOCK_DV, True)
        Q_base = Q + seq_start * stride_qt + h * stride_qh
        DO_base = DO + seq_start * stride_dot + h * stride_doh
        TS_base = Timestamps + seq_start
        t_cols = cols
        if HAS_TIME:
            t_cols = tl.load(TS_base + cols, mask=col_ok, other=0)
        pos_tab = PosTab + h * stride_pos_h
        time_tab = TimeTab + h * stride_time_h
        dpos = DPos + h * stride_pos_h
        dtime = DTime + h * stride_time_h

        # history rows that may see these keys: [r_lo, r_hi), fully allowed (no mask) on [u_lo, u_hi)
        r_lo = 0
        if CAUSAL:
            r_lo = n0
        r_hi = nh
        u_lo = r_lo
        u_hi = nh
        if CAUSAL:
            u_lo = n0 + BLOCK_N
        if HAS_WINDOW:
            if n0 >= prefix:  # no global key in the block: only the band sees it
                r_hi = tl.minimum(nh, n0 + BLOCK_N - 1 + window)
                if not CAUSAL:
                    r_lo = tl.maximum(0, n0 - window + 1)
            if n0 + BLOCK_N > prefix:
                u_hi = n0 + window  # beyond, the band's lower edge cuts the tile
                if not CAUSAL:
                    u_lo = tl.maximum(u_lo, n0 + BLOCK_N - window)
        if n0 >= nh:  # only target keys: no history row sees them
            r_lo = 0
            r_hi = 0
        if n0 + BLOCK_N > nh:  # the block holds non-history keys: mask every tile
            u_hi = u_lo

        dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        if HAS_WINDOW:
            # few row tiles per key block: one loop (one pipeline ramp), masking only where needed
            for r0 in range(r_lo, r_hi, BLOCK_M):
                masked = (r0 < u_lo) | (r0 + BLOCK_M > u_hi)
                dk, dv = _kv_tile(dk, dv, k, v, cols, r0, r_hi, masked, Q_base, DO_base, TS_base, t_cols, pos_tab,
                                  time_tab, dpos, dtime, stride_qt, stride_dot, n, nh, window, prefix, alpha,
                                  num_pos, num_time, time_cap, DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW,
                                  HAS_TARGETS, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD, SILU_MODE, PREC, True,
                                  BLOCK_M, LOOP_MAX)
        else:
            u_lo = tl.minimum(tl.maximum(u_lo, r_lo), r_hi)
            u_end = u_lo + (tl.maximum(tl.minimum(u_hi, r_hi) - u_lo, 0) // BLOCK_M) * BLOCK_M
            for r0 in range(r_lo, u_lo, BLOCK_M):  # the diagonal: masked
                dk, dv = _kv_tile(dk, dv, k, v, cols, r0, u_lo, True, Q_base, DO_base, TS_base, t_cols, pos_tab,
                                  time_tab, dpos, dtime, stride_qt, stride_dot, n, nh, window, prefix, alpha,
                                  num_pos, num_time, time_cap, DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW,
                                  HAS_TARGETS, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD, SILU_MODE, PREC, True,
                                  BLOCK_M, LOOP_MAX)
            for r0 in range(u_lo, u_end, BLOCK_M):  # fully allowed
                dk, dv = _kv_tile(dk, dv, k, v, cols, r0, u_end, False, Q_base, DO_base, TS_base, t_cols, pos_tab,
                                  time_tab, dpos, dtime, stride_qt, stride_dot, n, nh, window, prefix, alpha,
                                  num_pos, num_time, time_cap, DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW,
                                  HAS_TARGETS, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD, SILU_MODE, PREC, False,
                                  BLOCK_M, LOOP_MAX)
            for r0 in range(u_end, r_hi, BLOCK_M):  # the ragged end
                dk, dv = _kv_tile(dk, dv, k, v, cols, r0, r_hi, True, Q_base, DO_base, TS_base, t_cols, pos_tab,
                                  time_tab, dpos, dtime, stride_qt, stride_dot, n, nh, window, prefix, alpha,
                                  num_pos, num_time, time_cap, DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW,
                                  HAS_TARGETS, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD, SILU_MODE, PREC, True,
                                  BLOCK_M, LOOP_MAX)
        if HAS_TARGETS:
            # target rows: all of them see history keys; a target key is seen by its own row only
            t_lo = nh
            t_hi = n
            if n0 >= nh:
                t_lo = n0
                t_hi = tl.minimum(n0 + BLOCK_N, n)
            for r0 in range(t_lo, t_hi, BLOCK_M):
                dk, dv = _kv_tile(dk, dv, k, v, cols, r0, t_hi, True, Q_base, DO_base, TS_base, t_cols, pos_tab,
                                  time_tab, dpos, dtime, stride_qt, stride_dot, n, nh, window, prefix, alpha,
                                  num_pos, num_time, time_cap, DQK, DV, BLOCK_DQK, BLOCK_DV, CAUSAL, HAS_WINDOW,
                                  HAS_TARGETS, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD, SILU_MODE, PREC, True,
                                  BLOCK_M, LOOP_MAX)
        dk = dk * (alpha * inv_max_len)
        dv = dv * inv_max_len
        dk_ptrs = DK + seq_start * stride_dkt + h * stride_dkh + cols[:, None].to(tl.int64) * stride_dkt \
            + offs_dqk[None, :]
        dv_ptrs = DV_out + seq_start * stride_dvt + h * stride_dvh + cols[:, None].to(tl.int64) * stride_dvt \
            + offs_dv[None, :]
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_dqk[None, :] < DQK))
        tl.store(dv_ptrs, dv.to(DV_out.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


# ---------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------
_FWD = Launcher(_hstu_fwd_kernel)
_DKDV = Launcher(_hstu_bwd_dkdv_kernel)
_DQ = Launcher(_hstu_bwd_dq_kernel)


def _dtype(x: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    return None if x is None else x.dtype


def _bucket(q, k, v, offsets, num_targets, pos_bias, time_bias, use_time, max_seq_len, causal, local_window):
    """All that the constexprs and the autotuners' keys depend on (the dtype of every tensor argument too)."""
    return (q.device, q.dtype, k.dtype, v.dtype, q.shape[2], v.shape[2], pow2_bucket(max_seq_len, 64), bool(causal),
            bool(local_window), offsets.dtype, _dtype(num_targets), _dtype(pos_bias),
            time_bias.dtype if use_time else None, FAST_SILU)


@functools.lru_cache(maxsize=None)
def _constexprs(bucket) -> dict:
    """The three kernels' arguments fixed by the bucket: computed once per bucket."""
    device, dtype, _, _, dqk, dv, len_bucket, causal, window, _, targets, pos, time, fast_silu = bucket
    fast = fast_silu and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) \
        and torch.version.hip is None
    return dict(len_bucket=len_bucket, DQK=dqk, DV=dv, BLOCK_DQK=block_d(dqk), BLOCK_DV=block_d(dv), CAUSAL=causal,
                HAS_WINDOW=window, HAS_TARGETS=targets is not None, HAS_POS=pos is not None, HAS_TIME=time is not None,
                SILU_MODE=1 if fast else 0, PREC=dot_precision(dtype))


def _call_args(q, offsets, num_targets, timestamps, pos_bias, time_bias, use_time, max_seq_len, alpha,
               local_window, global_prefix) -> dict:
    """The per-call arguments the three kernels share (absent tensors are replaced by a 1-element dummy)."""
    dummy = offsets  # never read: the matching HAS_* flag is off
    # contiguous tables: their row stride is then also the stride of the fp32 gradient buffers
    pos_bias = pos_bias.contiguous() if pos_bias is not None else None
    time_bias = time_bias.contiguous() if time_bias is not None else None
    num_pos = pos_bias.shape[-1] if pos_bias is not None else 1
    num_time = time_bias.shape[-1] if time_bias is not None else 1
    return dict(
        Offsets=offsets,
        NumTargets=num_targets if num_targets is not None else dummy,
        Timestamps=timestamps.to(torch.int64) if use_time else dummy,
        PosTab=pos_bias if pos_bias is not None else dummy,
        TimeTab=time_bias if use_time else dummy,
        stride_pos_h=pos_bias.stride(0) if pos_bias is not None and pos_bias.shape[0] > 1 else 0,
        stride_time_h=time_bias.stride(0) if use_time and time_bias.shape[0] > 1 else 0,
        num_heads=q.shape[1], alpha=float(alpha), inv_max_len=1.0 / max_seq_len,
        window=int(local_window) if local_window else 0, prefix=int(global_prefix),
        num_pos=num_pos, num_time=num_time, time_cap=1 << min(max(num_time - 1, 0), 62))


def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
              num_targets: Optional[torch.Tensor], timestamps: Optional[torch.Tensor],
              pos_bias: Optional[torch.Tensor], time_bias: Optional[torch.Tensor], max_seq_len: int,
              alpha: float, causal: bool, local_window: int, global_prefix: int) -> torch.Tensor:
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    total, heads, _ = q.shape
    out = torch.empty((total, heads, v.shape[2]), dtype=q.dtype, device=q.device)
    batch = offsets.numel() - 1
    if total == 0 or batch == 0:
        return out
    use_time = time_bias is not None and timestamps is not None
    bucket = _bucket(q, k, v, offsets, num_targets, pos_bias, time_bias, use_time, max_seq_len, causal, local_window)
    _FWD(bucket, lambda meta: (cdiv(max_seq_len, meta["BLOCK_M"]), batch * heads),
         Q=q, K=k, V=v, Out=out,
         stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
         stride_vt=v.stride(0), stride_vh=v.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
         **_call_args(q, offsets, num_targets, timestamps, pos_bias, time_bias, use_time, max_seq_len, alpha,
                      local_window, global_prefix),
         **_constexprs(bucket))
    return out


def _bwd_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
              num_targets: Optional[torch.Tensor], timestamps: Optional[torch.Tensor],
              pos_bias: Optional[torch.Tensor], time_bias: Optional[torch.Tensor], max_seq_len: int,
              alpha: float, causal: bool, local_window: int, global_prefix: int, need_pos_grad: bool,
              need_time_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, dout = (last_dim_contiguous(x) for x in (q, k, v, dout))
    total, heads, _ = q.shape
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    use_time = time_bias is not None and timestamps is not None
    pos_grad = need_pos_grad and pos_bias is not None
    time_grad = need_time_grad and use_time
    # fp32 accumulators for the tables; [0]-sized placeholders when not asked for
    dpos = torch.zeros(pos_bias.shape if pos_grad else (1,), dtype=torch.float32, device=q.device)
    dtime = torch.zeros(time_bias.shape if time_grad else (1,), dtype=torch.float32, device=q.device)
    batch = offsets.numel() - 1
    if total > 0 and batch > 0:
        bucket = _bucket(q, k, v, offsets, num_targets, pos_bias, time_bias, use_time, max_seq_len, causal,
                         local_window)
        shared = dict(Q=q, K=k, V=v, DO=dout,
                      stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
                      stride_vt=v.stride(0), stride_vh=v.stride(1), stride_dot=dout.stride(0),
                      stride_doh=dout.stride(1),
                      **_call_args(q, offsets, num_targets, timestamps, pos_bias, time_bias, use_time, max_seq_len,
                                   alpha, local_window, global_prefix),
                      **_constexprs(bucket))
        bucket += (dout.dtype, pos_grad, time_grad)
        _DKDV(bucket, lambda meta: (cdiv(max_seq_len, meta["BLOCK_N"]), batch * heads),
              DK=dk, DV_out=dv, DPos=dpos, DTime=dtime, stride_dkt=dk.stride(0), stride_dkh=dk.stride(1),
              stride_dvt=dv.stride(0), stride_dvh=dv.stride(1), POS_GRAD=pos_grad, TIME_GRAD=time_grad,
              LOOP_MAX=_BUCKET_LOOP_MAX, **shared)
        _DQ(bucket, lambda meta: (cdiv(max_seq_len, meta["BLOCK_M"]), batch * heads),
            DQ=dq, stride_dqt=dq.stride(0), stride_dqh=dq.stride(1), **shared)
    else:
        dq.zero_()
        dk.zero_()
        dv.zero_()
    # the kernel sums unscaled dS; the 1/N of the output applies once here
    dpos = (dpos * (1.0 / max_seq_len)).to(pos_bias.dtype) if pos_grad else dpos.new_empty(0)
    dtime = (dtime * (1.0 / max_seq_len)).to(time_bias.dtype) if time_grad else dtime.new_empty(0)
    return dq, dk, dv, dpos, dtime


# ---------------------------------------------------------------------------------------------------------
# custom ops (torch.compile traces around them) and autograd
# ---------------------------------------------------------------------------------------------------------
def _fwd_fake(q, k, v, offsets, num_targets, timestamps, pos_bias, time_bias, max_seq_len, alpha, causal,
              local_window, global_prefix):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


def _bwd_fake(dout, q, k, v, offsets, num_targets, timestamps, pos_bias, time_bias, max_seq_len, alpha, causal,
              local_window, global_prefix, need_pos_grad, need_time_grad):
    use_time = time_bias is not None and timestamps is not None
    none = q.new_empty(0, dtype=torch.float32)
    dpos = pos_bias.new_empty(pos_bias.shape) if need_pos_grad and pos_bias is not None else none
    dtime = time_bias.new_empty(time_bias.shape) if need_time_grad and use_time else none
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dpos, dtime


def _setup_context(ctx, inputs, output):
    q, k, v, offsets, num_targets, timestamps, pos_bias, time_bias = inputs[:8]
    ctx.save_for_backward(q, k, v, offsets, num_targets, timestamps, pos_bias, time_bias)
    ctx.params = inputs[8:]


def _backward(ctx, bwd, dout):
    q, k, v, offsets, num_targets, timestamps, pos_bias, time_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, dv, dpos, dtime = bwd(dout.contiguous(), q, k, v, offsets, num_targets, timestamps, pos_bias,
                                  time_bias, *ctx.params, bool(need[6]), bool(need[7]))
    return (dq, dk, dv, None, None, None, dpos if need[6] else None, dtime if need[7] else None,
            None, None, None, None, None)


_OP = KernelOp("hstu_attention", _fwd_impl, _fwd_fake, _bwd_impl, _bwd_fake, _setup_context, _backward,
               grad_inputs=(0, 1, 2, 6, 7))


def triton_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    *,
    num_targets: Optional[torch.Tensor] = None,
    causal: bool = True,
    local_window: Optional[int] = None,
    global_prefix: int = 0,
    timestamps: Optional[torch.Tensor] = None,
    pos_bias: Optional[torch.Tensor] = None,
    time_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Jagged HSTU attention: q, k [total, H, Dqk], v [total, H, Dv], offsets [B + 1] -> [total, H, Dv].

    max_seq_len must bound every sequence length (the dispatcher checks); it is also the 1/N scale.
    """
    return _OP(q, k, v, offsets, num_targets, timestamps, pos_bias, time_bias, int(max_seq_len), float(alpha),
               bool(causal), int(local_window or 0), int(global_prefix))
