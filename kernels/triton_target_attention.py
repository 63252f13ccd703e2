"""Triton target-to-history cross attention (STCA under request level batching): forward and backward.

For request r, its targets q_offsets[r]:q_offsets[r+1] attend (softmax, per head) to its own history
kv_offsets[r]:kv_offsets[r+1]:

    out_t = sum_j softmax_j(scale * q_t . k_j) v_j

The contract (key padding only; zeros and no gradient for an empty history) is the docstring of
ops/pytorch/pt_target_attention.py.

Supports
  - jagged q [total_targets, H, D], k [total_history, H, D], v [total_history, H, Dv] with two offsets
    tensors [R + 1]; never builds a [T, L] score matrix (online softmax over key tiles);
  - an optional per-target key limit [total_targets]: target t sees only the first key_limit[t] keys of its
    request (a causal or prefix mask: LONGER's recent queries, padded key blocks);
  - the log-sum-exp as a second, differentiable output, so partial attentions over disjoint key sets can be
    merged exactly outside the kernel (LONGER's hybrid layer);
  - fp32 (three-pass tf32 dots on CUDA), bf16 and fp16 (fp32 accumulation); head dims up to 256 (padded to a
    power of two >= 16 with masked loads);
  - split-KV: each request's keys may be cut into equal chunks run by separate programs, merged by a small
    combine kernel (log-sum-exp weights). That keeps the GPU busy when there are few (request, head) pairs,
    and balances ragged histories: a program's work is bounded by the chunk, not the longest history;
  - backward: a dK/dV kernel (a program per key block: every key belongs to one program, no atomics) and a
    dQ kernel (a program per query block and key chunk; fp32 atomics across chunks when split);
  - torch.library custom ops merlin_longseq::target_attention_fwd / _bwd with fake implementations and
    autograd (_common.KernelOp), so torch.compile can trace them; eager calls launch the kernels directly;
  - each (dtype, head dims, length buckets, split count) bucket's constexprs and tuned configs are kept
    (_common.Launcher): a repeated call of a bucket only launches.
GPUs tested: H100 (see docs/PERFORMANCE.md); CPU through TRITON_INTERPRET=1, fp32.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (KernelOp, Launcher, area_limited, block_d, cdiv, dot_precision, interpreting, last_dim_contiguous,
                      load_rows, mn_config as _cfg, pow2_bucket, pruner, set_interpret_tiles)

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Under TRITON_INTERPRET the tile sizes and split count come from here (tests change them).
_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 16}
_INTERPRET_SPLITS: Optional[int] = None
# Split-KV only when (request, head, query block) programs would leave SMs idle: measured on the H100,
# R=64 T=128 L=10240 ran at 2.68 TB/s unsplit and 2.50 TB/s in 3 chunks (partials + combine cost more).
_PROGRAMS_PER_SM = 1
_MIN_CHUNK = 512  # never split a history into chunks shorter than this (the partials would cost more)

_FWD_CONFIGS = [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 2),
                _cfg(64, 128, 4, 3)]
_DKDV_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(32, 128, 8, 2), _cfg(64, 128, 8, 2), _cfg(32, 64, 4, 3)]
_DQ_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 2), _cfg(64, 128, 8, 2)]


def _fitting(configs, args):
    # wide heads or fp32 operands: smaller tiles, or registers spill
    small = max(args["BLOCK_D"], args["BLOCK_DV"]) > 64 or args["PREC"] != "tf32"
    return area_limited(configs, 64 * 64 if small else 1 << 30, "MERLIN_LONGSEQ_TA_AUTOTUNE")


_prune = pruner(_INTERPRET, _fitting)


def _set_interpret_blocks(block_m: int, block_n: int, splits: Optional[int] = None) -> None:
    """Test hook: the interpreter's tile sizes and split count (clears the autotune choices)."""
    global _INTERPRET_SPLITS
    _INTERPRET_SPLITS = splits
    set_interpret_tiles(_INTERPRET, (_FWD, _DKDV, _DQ), BLOCK_M=block_m, BLOCK_N=block_n)


_KEY = ["tgt_bucket", "len_bucket", "D", "DV", "n_splits", "HAS_LIMIT"]


# ---------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(acc, m_i, l_i, q, K_base, V_base, s0, hi, row_hi, stride_kt, stride_vt, scale_log2,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              PREC: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key tile [s0, s0 + BLOCK_N) of the online softmax. MASKED: keys >= hi are padding and row i sees
    keys < row_hi[i] only; unmasked tiles are fully visible to every row."""
    cols = s0 + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    k = load_rows(K_base, cols, stride_kt, tl.arange(0, BLOCK_D), col_ok, D, BLOCK_D, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # log2 domain: exp2 is one instruction
    if MASKED:
        s = tl.where(col_ok[None, :] & (cols[None, :] < row_hi[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.math.exp2(s - m_new_safe[:, None])
        correction = tl.math.exp2(m_i - m_new_safe)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every row sees every key of the tile
        p = tl.math.exp2(s - m_new[:, None])
        correction = tl.math.exp2(m_i - m_new)
    l_i = l_i * correction + tl.sum(p, 1)
    v = load_rows(V_base, cols, stride_vt, tl.arange(0, BLOCK_DV), col_ok, DV, BLOCK_DV, MASKED)
    acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _row_limits(KeyLimit, q_start, rows, row_ok, n_kv, hi, HAS_LIMIT: tl.constexpr):
    """(row_hi [BLOCK_M]: keys each row may see, hi: the block's last key to visit, full_end: keys below it are
    seen by every row). Without a limit every row sees the whole history."""
    if HAS_LIMIT:
        limit = tl.load(KeyLimit + q_start + rows, mask=row_ok, other=0).to(tl.int32)
        row_hi = tl.minimum(limit, n_kv)
        hi = tl.minimum(hi, tl.max(row_hi))
        full_end = tl.minimum(hi, tl.min(tl.where(row_ok, row_hi, n_kv)))
    else:
        row_hi = tl.zeros_like(rows) + n_kv
        full_end = hi
    return row_hi, hi, full_end


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _ta_fwd_kernel(Q, K, V, Out, Lse, PartAcc, PartM, PartL, QOffsets, KVOffsets, KeyLimit,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                   num_heads, max_targets, total_rows, scale_log2, max_kv_len, n_splits, tgt_bucket, len_bucket,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   SPLIT: tl.constexpr, HAS_LIMIT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Program (query block, request, head) x key chunk. Not split: writes Out and Lse (log2 domain).
    Split: writes the chunk's unnormalised accumulator, running max and sum for _ta_combine_kernel."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_qblocks = tl.cdiv(max_targets, BLOCK_M)
    qb = pid % n_qblocks  # query blocks of one (request, head) run side by side: they share K/V in L2
    rh = pid // n_qblocks
    r = rh // num_heads
    h = rh % num_heads
    q_start = tl.load(QOffsets + r)
    n_q = (tl.load(QOffsets + r + 1) - q_start).to(tl.int32)
    m0 = qb * BLOCK_M
    if m0 < n_q:
        kv_start = tl.load(KVOffsets + r)
        n_kv = (tl.load(KVOffsets + r + 1) - kv_start).to(tl.int32)
        chunk = tl.cdiv(tl.cdiv(max_kv_len, n_splits), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n_kv)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_q
        row_hi, hi, full_end = _row_limits(KeyLimit, q_start, rows, row_ok, n_kv, hi, HAS_LIMIT)
        q = load_rows(Q + q_start * stride_qt + h * stride_qh, rows, stride_qt, tl.arange(0, BLOCK_D), row_ok,
                       D, BLOCK_D, True)
        K_base = K + kv_start * stride_kt + h * stride_kh
        V_base = V + kv_start * stride_vt + h * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        full_hi = lo + tl.maximum(full_end - lo, 0) // BLOCK_N * BLOCK_N
        for s0 in range(lo, full_hi, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K_base, V_base, s0, hi, row_hi, stride_kt, stride_vt,
                                      scale_log2, D, DV, BLOCK_D, BLOCK_DV, PREC, False, BLOCK_N)
        for s0 in range(full_hi, hi, BLOCK_N):  # the ragged end of the history, or of the rows' limits
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K_base, V_base, s0, hi, row_hi, stride_kt, stride_vt,
                                      scale_log2, D, DV, BLOCK_D, BLOCK_DV, PREC, True, BLOCK_N)
        offs_dv = tl.arange(0, BLOCK_DV)
        flat = (q_start + rows).to(tl.int64) * num_heads + h  # row index into [total_targets * H]
        if SPLIT:
            base = split.to(tl.int64) * total_rows
            tl.store(PartAcc + (base + flat)[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=row_ok[:, None])
            tl.store(PartM + base + flat, m_i, mask=row_ok)
            tl.store(PartL + base + flat, l_i, mask=row_ok)
        else:
            # no key at all (empty history): l = 0, acc = 0 -> output 0, lse = -inf
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            out_ptrs = Out + (q_start + rows)[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_dv[None, :]
            tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
            tl.store(Lse + flat, tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf")),
                     mask=row_ok)


@triton.jit
def _ta_combine_kernel(Out, Lse, PartAcc, PartM, PartL, total_rows, n_splits, num_heads, stride_ot, stride_oh,
                       DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr):
    """Merge the chunks of BLOCK_R (target, head) rows: weights 2^(m_s - max_s m_s)."""
    flat = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = flat < total_rows
    offs_dv = tl.arange(0, BLOCK_DV)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(PartM + s * total_rows + flat, mask=ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a row with no key anywhere: every weight is then 0
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(0, n_splits):
        base = s * total_rows
        w = tl.math.exp2(tl.load(PartM + base + flat, mask=ok, other=float("-inf")) - m_safe)
        l += w * tl.load(PartL + base + flat, mask=ok, other=0.0)
        part = tl.load(PartAcc + (base + flat.to(tl.int64))[:, None] * BLOCK_DV + offs_dv[None, :],
                       mask=ok[:, None], other=0.0)
        acc += w[:, None] * part
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    t = flat // num_heads
    h = flat % num_heads
    out_ptrs = Out + t[:, None].to(tl.int64) * stride_ot + (h * stride_oh)[:, None] + offs_dv[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(Lse + flat, tl.where(l > 0, m + tl.math.log2(tl.where(l > 0, l, 1.0)), float("-inf")), mask=ok)


# ---------------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_DKDV_CONFIGS, key=["tgt_bucket", "len_bucket", "D", "DV", "HAS_LIMIT"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _ta_bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DVout, QOffsets, KVOffsets, KeyLimit,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                        stride_dkt, stride_dkh, stride_dvt, stride_dvh, num_heads, max_kv_len, scale, scale_log2,
                        tgt_bucket, len_bucket,
                        D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                        HAS_LIMIT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Program (key block, request, head): dV = P^T dO, dK = scale * dS^T Q over all the request's targets,
    P recomputed from the saved log-sum-exp, dS = P * (dO V^T - Delta), Delta = rowsum(dO * O) - dLse."""
    pid = tl.program_id(0)
    n_kblocks = tl.cdiv(max_kv_len, BLOCK_N)
    kb = pid % n_kblocks
    rh = pid // n_kblocks
    r = rh // num_heads
    h = rh % num_heads
    kv_start = tl.load(KVOffsets + r)
    n_kv = (tl.load(KVOffsets + r + 1) - kv_start).to(tl.int32)
    n0 = kb * BLOCK_N
    if n0 < n_kv:
        q_start = tl.load(QOffsets + r)
        n_q = (tl.load(QOffsets + r + 1) - q_start).to(tl.int32)
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_kv
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        k = load_rows(K + kv_start * stride_kt + h * stride_kh, cols, stride_kt, offs_d, col_ok, D, BLOCK_D, True)
        v = load_rows(V + kv_start * stride_vt + h * stride_vh, cols, stride_vt, offs_dv, col_ok, DV, BLOCK_DV,
                       True)
        Q_base = Q + q_start * stride_qt + h * stride_qh
        DO_base = DO + q_start * stride_dot + h * stride_doh
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for r0 in range(0, n_q, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < n_q
            q = load_rows(Q_base, rows, stride_qt, offs_d, row_ok, D, BLOCK_D, True)
            do = load_rows(DO_base, rows, stride_dot, offs_dv, row_ok, DV, BLOCK_DV, True)
            flat = (q_start + rows).to(tl.int64) * num_heads + h
            lse = tl.load(Lse + flat, mask=row_ok, other=float("inf"))  # padding rows: p = 0
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row that saw no key: p = 0
            delta = tl.load(Delta + flat, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * scale_log2  # [keys, rows]
            p_t = tl.math.exp2(s_t - lse[None, :])
            if HAS_LIMIT:
                limit = tl.load(KeyLimit + q_start + rows, mask=row_ok, other=0)
                p_t = tl.where(cols[:, None] < limit[None, :], p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
        dk = dk * scale
        dk_ptrs = DK + (kv_start + cols)[:, None].to(tl.int64) * stride_dkt + h * stride_dkh + offs_d[None, :]
        dv_ptrs = DVout + (kv_start + cols)[:, None].to(tl.int64) * stride_dvt + h * stride_dvh + offs_dv[None, :]
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
        tl.store(dv_ptrs, dv.to(DVout.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K_base, V_base, s0, hi, row_hi, stride_kt, stride_vt, scale_log2,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             PREC: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = s0 + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    k = load_rows(K_base, cols, stride_kt, tl.arange(0, BLOCK_D), col_ok, D, BLOCK_D, MASKED)
    v = load_rows(V_base, cols, stride_vt, tl.arange(0, BLOCK_DV), col_ok, DV, BLOCK_DV, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(col_ok[None, :] & (cols[None, :] < row_hi[:, None]), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                 reset_to_zero=["DQacc"])
@triton.jit
def _ta_bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, DQacc, QOffsets, KVOffsets, KeyLimit,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                      stride_dqt, stride_dqh, num_heads, max_targets, scale, scale_log2, max_kv_len, n_splits,
                      tgt_bucket, len_bucket,
                      D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                      SPLIT: tl.constexpr, HAS_LIMIT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Program (query block, request, head) x key chunk: dQ = scale * dS K. Split: fp32 atomics into DQacc
    [total_targets, H, BLOCK_D]; not split: a plain store into DQ."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_qblocks = tl.cdiv(max_targets, BLOCK_M)
    qb = pid % n_qblocks
    rh = pid // n_qblocks
    r = rh // num_heads
    h = rh % num_heads
    q_start = tl.load(QOffsets + r)
    n_q = (tl.load(QOffsets + r + 1) - q_start).to(tl.int32)
    m0 = qb * BLOCK_M
    if m0 < n_q:
        kv_start = tl.load(KVOffsets + r)
        n_kv = (tl.load(KVOffsets + r + 1) - kv_start).to(tl.int32)
        chunk = tl.cdiv(tl.cdiv(max_kv_len, n_splits), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n_kv)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_q
        row_hi, hi, full_end = _row_limits(KeyLimit, q_start, rows, row_ok, n_kv, hi, HAS_LIMIT)
        # not split: rows with an empty history still get their zero gradient stored
        if (lo < hi) | (n_splits == 1):
            offs_d = tl.arange(0, BLOCK_D)
            q = load_rows(Q + q_start * stride_qt + h * stride_qh, rows, stride_qt, offs_d, row_ok, D, BLOCK_D,
                           True)
            do = load_rows(DO + q_start * stride_dot + h * stride_doh, rows, stride_dot, tl.arange(0, BLOCK_DV),
                            row_ok, DV, BLOCK_DV, True)
            flat = (q_start + rows).to(tl.int64) * num_heads + h
            lse = tl.load(Lse + flat, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row that saw no key: p = 0
            delta = tl.load(Delta + flat, mask=row_ok, other=0.0)
            K_base = K + kv_start * stride_kt + h * stride_kh
            V_base = V + kv_start * stride_vt + h * stride_vh
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            full_hi = lo + tl.maximum(full_end - lo, 0) // BLOCK_N * BLOCK_N
            for s0 in range(lo, full_hi, BLOCK_N):
                dq = _dq_tile(dq, q, do, lse, delta, K_base, V_base, s0, hi, row_hi, stride_kt, stride_vt,
                              scale_log2, D, DV, BLOCK_D, BLOCK_DV, PREC, False, BLOCK_N)
            for s0 in range(full_hi, hi, BLOCK_N):
                dq = _dq_tile(dq, q, do, lse, delta, K_base, V_base, s0, hi, row_hi, stride_kt, stride_vt,
                              scale_log2, D, DV, BLOCK_D, BLOCK_DV, PREC, True, BLOCK_N)
            dq = dq * scale
            if SPLIT:
                tl.atomic_add(DQacc + flat[:, None] * BLOCK_D + offs_d[None, :], dq, mask=row_ok[:, None],
                              sem="relaxed")
            else:
                dq_ptrs = DQ + (q_start + rows)[:, None].to(tl.int64) * stride_dqt + h * stride_dqh + offs_d[None, :]
                tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------
_FWD = Launcher(_ta_fwd_kernel)
_DKDV = Launcher(_ta_bwd_dkdv_kernel)
_DQ = Launcher(_ta_bwd_dq_kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _num_splits(device: torch.device, requests: int, heads: int, max_targets: int, max_kv_len: int,
                forced: Optional[int]) -> int:
    """Key chunks per (request, head): enough programs to fill the GPU several times over, chunks of at
    least _MIN_CHUNK keys."""
    if forced is not None:
        return max(1, int(forced))
    if interpreting():
        return _INTERPRET_SPLITS or 1
    base = requests * heads * cdiv(max(max_targets, 1), 128)
    want = cdiv(_PROGRAMS_PER_SM * _sm_count(device), max(base, 1))
    return int(max(1, min(want, max_kv_len // _MIN_CHUNK)))


def _bucket(q, k, v, q_offsets, kv_offsets, key_limit, max_targets, max_kv_len, splits):
    """All that the constexprs and the autotuners' keys depend on (the dtype of every tensor argument too)."""
    return (q.device, q.dtype, k.dtype, v.dtype, q.shape[2], v.shape[2], pow2_bucket(max_targets, 16),
            pow2_bucket(max_kv_len, 64), splits, None if key_limit is None else key_limit.dtype, q_offsets.dtype,
            kv_offsets.dtype)


@functools.lru_cache(maxsize=None)
def _constexprs(bucket) -> dict:
    """The kernels' arguments fixed by the bucket: computed once per bucket."""
    _, dtype, _, _, d, dv, tgt_bucket, len_bucket, _, limit, _, _ = bucket
    return dict(tgt_bucket=tgt_bucket, len_bucket=len_bucket, D=d, DV=dv, BLOCK_D=block_d(d), BLOCK_DV=block_d(dv),
                HAS_LIMIT=limit is not None, PREC=dot_precision(dtype))


def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor,
              kv_offsets: torch.Tensor, key_limit: Optional[torch.Tensor], scale: float, max_targets: int,
              max_history_len: int, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """num_splits 0: the heuristic's split count."""
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    total_q, heads, _ = q.shape
    out = torch.empty((total_q, heads, v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.empty((total_q, heads), dtype=torch.float32, device=q.device)
    requests = q_offsets.numel() - 1
    if total_q == 0 or requests == 0:
        return out, lse
    if max_history_len == 0 or k.shape[0] == 0:  # no history anywhere
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    splits = _num_splits(q.device, requests, heads, max_targets, max_history_len,
                         num_splits if num_splits > 0 else None)
    bucket = _bucket(q, k, v, q_offsets, kv_offsets, key_limit, max_targets, max_history_len, splits)
    constexprs = _constexprs(bucket)
    block_dv = constexprs["BLOCK_DV"]
    rows = total_q * heads
    if splits > 1:
        part_acc = torch.empty((splits, rows, block_dv), dtype=torch.float32, device=q.device)
        part_m = torch.empty((splits, rows), dtype=torch.float32, device=q.device)
        part_l = torch.empty((splits, rows), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_m = part_l = lse  # never read: SPLIT is off
    _FWD(bucket, lambda meta: (requests * heads * cdiv(max_targets, meta["BLOCK_M"]), splits),
         Q=q, K=k, V=v, Out=out, Lse=lse, PartAcc=part_acc, PartM=part_m, PartL=part_l,
         QOffsets=q_offsets, KVOffsets=kv_offsets, KeyLimit=key_limit if key_limit is not None else q_offsets,
         stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
         stride_vt=v.stride(0), stride_vh=v.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
         num_heads=heads, max_targets=max_targets, total_rows=rows, scale_log2=float(scale) * _LOG2E,
         max_kv_len=max_history_len, n_splits=splits, SPLIT=splits > 1, **constexprs)
    if splits > 1:
        block_r = 64 if interpreting() else 32
        _ta_combine_kernel[(cdiv(rows, block_r),)](
            Out=out, Lse=lse, PartAcc=part_acc, PartM=part_m, PartL=part_l, total_rows=rows, n_splits=splits,
            num_heads=heads, stride_ot=out.stride(0), stride_oh=out.stride(1), DV=constexprs["DV"],
            BLOCK_DV=block_dv, BLOCK_R=block_r)
    return out, lse


def _bwd_impl(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q_offsets: torch.Tensor,
              kv_offsets: torch.Tensor, key_limit: Optional[torch.Tensor], scale: float, max_targets: int,
              max_history_len: int, num_splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, dout = (last_dim_contiguous(x) for x in (q, k, v, dout))
    total_q, heads, d = q.shape
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    requests = q_offsets.numel() - 1
    if total_q == 0 or requests == 0 or max_history_len == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    # Delta = rowsum(dO * O): [total_q, H] fp32, a tiny pass next to the attention itself. A gradient on the
    # log-sum-exp adds dLse * P to dS: the same as lowering Delta by dLse (natural units; Lse is log2 here)
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float() * _LOG2E
    delta = delta.contiguous()
    splits = _num_splits(q.device, requests, heads, max_targets, max_history_len,
                         num_splits if num_splits > 0 else None)
    bucket = _bucket(q, k, v, q_offsets, kv_offsets, key_limit, max_targets, max_history_len, splits)
    constexprs = _constexprs(bucket)
    bucket += (dout.dtype, lse.dtype)
    shared = dict(Q=q, K=k, V=v, DO=dout, Lse=lse, Delta=delta, QOffsets=q_offsets, KVOffsets=kv_offsets,
                  KeyLimit=key_limit if key_limit is not None else q_offsets,
                  stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
                  stride_vt=v.stride(0), stride_vh=v.stride(1), stride_dot=dout.stride(0),
                  stride_doh=dout.stride(1), num_heads=heads, scale=float(scale), scale_log2=float(scale) * _LOG2E,
                  max_kv_len=max_history_len, **constexprs)
    _DKDV(bucket, lambda meta: (requests * heads * cdiv(max_history_len, meta["BLOCK_N"]),),
          DK=dk, DVout=dv, stride_dkt=dk.stride(0), stride_dkh=dk.stride(1), stride_dvt=dv.stride(0),
          stride_dvh=dv.stride(1), **shared)
    dq = torch.empty_like(q)
    # the fp32 atomic target when split; otherwise a 1-element stand-in of its own (the autotuner zeroes
    # DQacc between trial runs, so it must never alias a real input such as lse)
    dq_acc = torch.zeros((total_q, heads, constexprs["BLOCK_D"]) if splits > 1 else (1,), dtype=torch.float32,
                         device=q.device)
    _DQ(bucket, lambda meta: (requests * heads * cdiv(max_targets, meta["BLOCK_M"]), splits),
        DQ=dq, DQacc=dq_acc, stride_dqt=dq.stride(0), stride_dqh=dq.stride(1), max_targets=max_targets,
        n_splits=splits, SPLIT=splits > 1, **shared)
    if splits > 1:
        dq = dq_acc[..., :d].to(q.dtype)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# custom ops (torch.compile traces around them) and autograd
# ---------------------------------------------------------------------------------------------------------
def _fwd_fake(q, k, v, q_offsets, kv_offsets, key_limit, scale, max_targets, max_history_len, num_splits):
    return (q.new_empty((q.shape[0], q.shape[1], v.shape[2])),
            q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32))


def _bwd_fake(dout, dlse, q, k, v, out, lse, q_offsets, kv_offsets, key_limit, scale, max_targets, max_history_len,
              num_splits):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, q_offsets, kv_offsets, key_limit = inputs[:6]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_offsets, kv_offsets, key_limit)
    ctx.params = inputs[6:]


def _backward(ctx, bwd, dout, dlse):
    # lse is the log2-domain log-sum-exp; its gradient (None when unused) goes into the kernels' Delta
    q, k, v, out, lse, q_offsets, kv_offsets, key_limit = ctx.saved_tensors
    dout = dout.contiguous() if dout is not None else torch.zeros_like(out)
    dq, dk, dv = bwd(dout, dlse, q, k, v, out, lse, q_offsets, kv_offsets, key_limit, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None


_OP = KernelOp("target_attention", _fwd_impl, _fwd_fake, _bwd_impl, _bwd_fake, _setup_context, _backward,
               grad_inputs=(0, 1, 2))


def triton_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    *,
    scale: Optional[float] = None,
    max_history_len: Optional[int] = None,
    max_targets: Optional[int] = None,
    num_splits: Optional[int] = None,
    key_limit: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """q [total_targets, H, D], k [total_history, H, D], v [total_history, H, Dv] -> [total_targets, H, Dv].

    max_history_len / max_targets bound every request's history / target count (computed from the offsets,
    one device sync each, when None). num_splits forces the number of key chunks (default: a heuristic).
    key_limit [total_targets] (int): target t sees the first key_limit[t] keys of its request only.
    return_lse: also return the natural log-sum-exp of the scores [total_targets, H] (float32, -inf for a row
    that saw no key), differentiable.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if max_history_len is None:
        max_history_len = int((kv_offsets[1:] - kv_offsets[:-1]).max()) if kv_offsets.numel() > 1 else 0
    if max_targets is None:
        max_targets = int((q_offsets[1:] - q_offsets[:-1]).max()) if q_offsets.numel() > 1 else 0
    out, lse2 = _OP(q, k, v, q_offsets, kv_offsets, key_limit, float(scale), int(max_targets), int(max_history_len),
                    int(num_splits or 0))
    if return_lse:
        return out, lse2 * _LN2
    return out
