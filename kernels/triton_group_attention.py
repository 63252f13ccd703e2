"""Triton group attention (LONGER's InnerTransformer inside K-token groups): forward and backward.

For group g, head h, query slot i (the contract is ops/pytorch/pt_group_attention.py):

    out[g, i, h] = sum_j softmax_j(scale * q[g, i, h] . k[g, j, h]) v[g, j, h]   over j with slot_valid[g, j] or j == i

Supports
  - q, k, v [G, K, H, Dh] with any strides whose last dim is contiguous (the model's q, k, v are views of a
    Linear's output), slot_valid [G, K] bool (any strides); out and the gradients come back contiguous;
  - group sizes K = 1..64 and head dims Dh = 1..256, neither a power of two necessarily (padded to KP, DP and
    masked); fp32, bf16, fp16 inputs with fp32 softmax and accumulation;
  - a program owns BLOCK_G whole groups of one head, so the backward needs no atomics: a group's dq, dk and
    dv are all computed inside the program that recomputes its scores. Nothing is saved for the backward but
    the inputs (no log-sum-exp, no output: Delta_i = sum_j P_ij dP_ij equals rowsum(dO * O));
  - two variants of the same math (kept side by side so benchmarks/bench_group_attention.py can compare):
      "dot"    BLOCK_G groups x KP slots are one tile of ROWS rows; the [ROWS, ROWS] scores come from one
               tl.dot (tensor cores) and are masked to the block diagonal (a row sees its own group only);
               does ROWS / KP times the needed dot and softmax work, but every op is a plain 2-D one;
      "bcast"  [BLOCK_G, KP, DP] tiles; the [BLOCK_G, KP, KP] scores and the weighted sums are broadcast
               multiply-reduces on CUDA cores (no wasted entries, no tensor cores); small groups only
               (KP^2 * DP <= _BCAST_BUDGET = 4096 elements per group: K <= 8 at Dh <= 64);
    the default is "dot", or MERLIN_LONGSEQ_GA_VARIANT (dot | bcast) as set when this module is imported;
  - torch.library custom ops merlin_longseq::group_attention_fwd / _bwd with autograd and fake
    implementations (_common.KernelOp), so torch.compile traces around them; eager calls launch directly, and
    a repeated (dtype, K, Dh, variant) skips the checks and the autotuner (_common.Launcher).
GPUs tested: none yet (written for H100, bf16). Every kept config of both variants compiles for sm_90 (checked
without a GPU through triton 3.9's ptxas: no register spills; the fp32 "dot" tiles of 128 rows and "bcast"
tiles of 64 products per thread spilled and are pruned). CPU through TRITON_INTERPRET=1, fp32.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (KernelOp, Launcher, autotune_off, block_d, cdiv, config, dot_precision, interpret_configs,
                      interpreting, last_dim_contiguous, next_pow2, set_interpret_tiles)

_LOG2E = 1.4426950408889634
VARIANTS = ("dot", "bcast")
MAX_SLOTS = 64
MAX_HEAD_DIM = 256
# "bcast" keeps [BLOCK_G, KP, KP, DP] fp32 products in registers: at most _BCAST_PER_THREAD of them per thread
# (sm_90 compiles, triton 3.9: 64 per thread spilled in the backward at 4 warps, 32 did not), and a group's
# KP^2 * DP at most _BCAST_BUDGET (8 warps then still hold 2 groups: no size-1 group axis)
_BCAST_PER_THREAD = 32
_BCAST_BUDGET = 4096
# Under TRITON_INTERPRET the tile sizes come from here (tests change them to get several programs).
_INTERPRET = {"ROWS": 16}


# read once at import, so a torch.compile'd caller sees a constant instead of an environment lookup
_DEFAULT_VARIANT = os.environ.get("MERLIN_LONGSEQ_GA_VARIANT", "dot")


def _default_variant() -> str:
    if _DEFAULT_VARIANT not in VARIANTS:
        raise ValueError(f"MERLIN_LONGSEQ_GA_VARIANT must be one of {VARIANTS}, got {_DEFAULT_VARIANT!r}")
    return _DEFAULT_VARIANT


def _cfg(rows, warps):
    # ROWS: the rows (group slots) a program owns; _prune turns it into BLOCK_G whole groups
    return config(warps, 1, ROWS=rows)


# The problem is memory-bound (K = 4, Dh = 32, bf16: 512 FLOPs per row and head against 256 bytes of q, k, v
# and out): small tiles, many programs in flight.
# First config = the one used when MERLIN_LONGSEQ_GA_AUTOTUNE=0.
_CONFIGS = [_cfg(64, 4), _cfg(32, 2), _cfg(128, 4), _cfg(128, 8)]


def _groups_per_program(variant: str, rows: int, kp: int, dp: int, warps: int) -> int:
    if variant == "dot":
        return max(1, max(rows, 16) // kp)  # tl.dot needs >= 16 rows
    return max(2, min(rows // kp, _BCAST_PER_THREAD * 32 * warps // (kp * kp * dp)))


def _fits(variant: str, rows: int, kp: int, dp: int, warps: int, prec: str) -> bool:
    """False for tiles that spill registers (seen in sm_90 compiles of this file, triton 3.9)."""
    if variant == "dot":
        # fp32 operands (tf32x3 dots) at 128 rows: 255 registers and 3 KB of spills in the backward;
        # wide heads: q, k, v, dO tiles of [ROWS, DP] and [ROWS, ROWS] scores in registers
        return (prec == "tf32" or rows <= 64) and max(rows, 16, kp) * dp <= 8192
    return 2 * kp * kp * dp <= _BCAST_PER_THREAD * 32 * warps


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    variant, kp, dp, prec = args["VARIANT"], args["KP"], args["DP"], args["PREC"]
    if interpreting():
        configs = interpret_configs(_INTERPRET)
    else:
        if autotune_off("MERLIN_LONGSEQ_GA_AUTOTUNE"):
            configs = configs[:1]
        configs = [c for c in configs if _fits(variant, c.kwargs["ROWS"], kp, dp, c.num_warps, prec)] or \
            [_cfg(32, 8 if variant == "bcast" else 2)]  # nothing fits: the smallest tile (most warps for bcast)
    kept, seen = [], set()
    for c in configs:
        block_g = _groups_per_program(variant, c.kwargs["ROWS"], kp, dp, c.num_warps)
        if (block_g, c.num_warps) not in seen:
            seen.add((block_g, c.num_warps))
            kept.append(config(c.num_warps, 1, BLOCK_G=block_g, ROWS=block_g * kp))
    return kept


def _set_interpret_rows(rows: int) -> None:
    """Test hook: the interpreter's rows per program (clears the autotune choices)."""
    set_interpret_tiles(_INTERPRET, (_FWD, _BWD), ROWS=rows)


_KEY = ["K", "D", "KP", "DP", "VARIANT"]


# ---------------------------------------------------------------------------------------------------------
# "dot": BLOCK_G groups as one block-diagonal [ROWS, ROWS] tile
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _rows_layout(pid, G, K: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr):
    """Row r of the tile is slot r % KP of group pid * BLOCK_G + r // KP."""
    r = tl.arange(0, ROWS)
    local_g = r // KP
    slot = r % KP
    g = pid * BLOCK_G + local_g
    row_ok = (g < G) & (slot < K)
    return r, local_g, g.to(tl.int64), slot, row_ok


@triton.jit
def _load_rows(Base, g, slot, stride_g, stride_k, row_ok, D: tl.constexpr, DP: tl.constexpr):
    """[ROWS, DP] tile of rows (g, slot); padded rows and head-dim columns read as 0."""
    d = tl.arange(0, DP)
    ptrs = Base + g[:, None] * stride_g + slot[:, None] * stride_k + d[None, :]
    if DP == D:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return tl.load(ptrs, mask=row_ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _store_rows(Base, x, g, slot, stride_g, stride_k, row_ok, D: tl.constexpr, DP: tl.constexpr):
    d = tl.arange(0, DP)
    ptrs = Base + g[:, None] * stride_g + slot[:, None] * stride_k + d[None, :]
    tl.store(ptrs, x.to(Base.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _dot_probs(q, k, valid, r, local_g, scale_log2, PREC: tl.constexpr):
    """Softmax weights [ROWS, ROWS] (fp32): zero off the block diagonal and on empty keys, the diagonal kept."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # log2 domain: exp2 is one instruction
    allowed = (local_g[:, None] == local_g[None, :]) & (valid[None, :] | (r[:, None] == r[None, :]))
    s = tl.where(allowed, s, float("-inf"))
    p = tl.math.exp2(s - tl.max(s, 1)[:, None])  # every row keeps its diagonal: the max is finite
    return p / tl.sum(p, 1)[:, None]


# ---------------------------------------------------------------------------------------------------------
# "bcast": [BLOCK_G, KP, DP] tiles, broadcast multiply-reduce
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _groups_layout(pid, G, K: tl.constexpr, KP: tl.constexpr, BLOCK_G: tl.constexpr):
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)  # [BLOCK_G]
    slot = tl.arange(0, KP)  # [KP]
    ok = (g[:, None] < G) & (slot[None, :] < K)  # [BLOCK_G, KP]
    return g.to(tl.int64), slot, ok


@triton.jit
def _load_groups(Base, g, slot, stride_g, stride_k, ok, D: tl.constexpr, DP: tl.constexpr):
    """[BLOCK_G, KP, DP] fp32 tile; padded groups, slots and head-dim columns read as 0."""
    d = tl.arange(0, DP)[None, None, :]
    ptrs = Base + g[:, None, None] * stride_g + slot[None, :, None] * stride_k + d
    if DP == D:
        x = tl.load(ptrs, mask=ok[:, :, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=ok[:, :, None] & (d < D), other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_groups(Base, x, g, slot, stride_g, stride_k, ok, D: tl.constexpr, DP: tl.constexpr):
    d = tl.arange(0, DP)[None, None, :]
    ptrs = Base + g[:, None, None] * stride_g + slot[None, :, None] * stride_k + d
    tl.store(ptrs, x.to(Base.dtype.element_ty), mask=ok[:, :, None] & (d < D))


@triton.jit
def _bcast_probs(q, k, valid, slot, scale_log2):
    """Softmax weights [BLOCK_G, KP(query), KP(key)] (fp32), empty keys masked, the diagonal kept."""
    s = tl.sum(q[:, :, None, :] * k[:, None, :, :], axis=3) * scale_log2
    allowed = valid[:, None, :] | (slot[:, None] == slot[None, :])[None, :, :]
    s = tl.where(allowed, s, float("-inf"))
    p = tl.math.exp2(s - tl.max(s, 2)[:, :, None])
    return p / tl.sum(p, 2)[:, :, None]


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _ga_fwd_kernel(Q, Kx, V, Valid, Out, G,
                   stride_qg, stride_qk, stride_qh, stride_kg, stride_kk, stride_kh,
                   stride_vg, stride_vk, stride_vh, stride_sg, stride_sk, stride_og, stride_ok, stride_oh,
                   scale_log2,
                   K: tl.constexpr, D: tl.constexpr, KP: tl.constexpr, DP: tl.constexpr, VARIANT: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_G: tl.constexpr, ROWS: tl.constexpr):
    """Program (block of BLOCK_G groups, head): out = softmax(masked scores) v for every slot of its groups."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    Q += h * stride_qh
    Kx += h * stride_kh
    V += h * stride_vh
    Out += h * stride_oh
    if VARIANT == "dot":
        r, local_g, g, slot, row_ok = _rows_layout(pid, G, K, KP, ROWS, BLOCK_G)
        q = _load_rows(Q, g, slot, stride_qg, stride_qk, row_ok, D, DP)
        k = _load_rows(Kx, g, slot, stride_kg, stride_kk, row_ok, D, DP)
        v = _load_rows(V, g, slot, stride_vg, stride_vk, row_ok, D, DP)
        valid = tl.load(Valid + g * stride_sg + slot * stride_sk, mask=row_ok, other=0) != 0
        p = _dot_probs(q, k, valid, r, local_g, scale_log2, PREC)
        out = tl.dot(p.to(v.dtype), v, input_precision=PREC)
        _store_rows(Out, out, g, slot, stride_og, stride_ok, row_ok, D, DP)
    else:
        g, slot, ok = _groups_layout(pid, G, K, KP, BLOCK_G)
        q = _load_groups(Q, g, slot, stride_qg, stride_qk, ok, D, DP)
        k = _load_groups(Kx, g, slot, stride_kg, stride_kk, ok, D, DP)
        v = _load_groups(V, g, slot, stride_vg, stride_vk, ok, D, DP)
        valid = tl.load(Valid + g[:, None] * stride_sg + slot[None, :] * stride_sk, mask=ok, other=0) != 0
        p = _bcast_probs(q, k, valid, slot, scale_log2)
        out = tl.sum(p[:, :, :, None] * v[:, None, :, :], axis=2)  # [BLOCK_G, KP, DP]
        _store_groups(Out, out, g, slot, stride_og, stride_ok, ok, D, DP)


@triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _ga_bwd_kernel(Q, Kx, V, Valid, DO, DQ, DK, DV, G,
                   stride_qg, stride_qk, stride_qh, stride_kg, stride_kk, stride_kh,
                   stride_vg, stride_vk, stride_vh, stride_sg, stride_sk, stride_dog, stride_dok, stride_doh,
                   stride_gg, stride_gk, stride_gh, scale, scale_log2,
                   K: tl.constexpr, D: tl.constexpr, KP: tl.constexpr, DP: tl.constexpr, VARIANT: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_G: tl.constexpr, ROWS: tl.constexpr):
    """Program (block of BLOCK_G groups, head): P recomputed, dP = dO V^T, dS = P (dP - rowsum(P dP)),
    dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO. DQ, DK, DV share one (contiguous) layout."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    Q += h * stride_qh
    Kx += h * stride_kh
    V += h * stride_vh
    DO += h * stride_doh
    DQ += h * stride_gh
    DK += h * stride_gh
    DV += h * stride_gh
    if VARIANT == "dot":
        r, local_g, g, slot, row_ok = _rows_layout(pid, G, K, KP, ROWS, BLOCK_G)
        q = _load_rows(Q, g, slot, stride_qg, stride_qk, row_ok, D, DP)
        k = _load_rows(Kx, g, slot, stride_kg, stride_kk, row_ok, D, DP)
        v = _load_rows(V, g, slot, stride_vg, stride_vk, row_ok, D, DP)
        do = _load_rows(DO, g, slot, stride_dog, stride_dok, row_ok, D, DP)
        valid = tl.load(Valid + g * stride_sg + slot * stride_sk, mask=row_ok, other=0) != 0
        p = _dot_probs(q, k, valid, r, local_g, scale_log2, PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])  # zero wherever p is (other groups, empty keys)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC) * scale
        dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        _store_rows(DQ, dq, g, slot, stride_gg, stride_gk, row_ok, D, DP)
        _store_rows(DK, dk, g, slot, stride_gg, stride_gk, row_ok, D, DP)
        _store_rows(DV, dv, g, slot, stride_gg, stride_gk, row_ok, D, DP)
    else:
        g, slot, ok = _groups_layout(pid, G, K, KP, BLOCK_G)
        q = _load_groups(Q, g, slot, stride_qg, stride_qk, ok, D, DP)
        k = _load_groups(Kx, g, slot, stride_kg, stride_kk, ok, D, DP)
        v = _load_groups(V, g, slot, stride_vg, stride_vk, ok, D, DP)
        do = _load_groups(DO, g, slot, stride_dog, stride_dok, ok, D, DP)
        valid = tl.load(Valid + g[:, None] * stride_sg + slot[None, :] * stride_sk, mask=ok, other=0) != 0
        p = _bcast_probs(q, k, valid, slot, scale_log2)  # [BLOCK_G, i, j]
        dp = tl.sum(do[:, :, None, :] * v[:, None, :, :], axis=3)
        ds = p * (dp - tl.sum(p * dp, 2)[:, :, None])
        dq = tl.sum(ds[:, :, :, None] * k[:, None, :, :], axis=2) * scale  # over keys j
        dk = tl.sum(ds[:, :, :, None] * q[:, :, None, :], axis=1) * scale  # over queries i
        dv = tl.sum(p[:, :, :, None] * do[:, :, None, :], axis=1)
        _store_groups(DQ, dq, g, slot, stride_gg, stride_gk, ok, D, DP)
        _store_groups(DK, dk, g, slot, stride_gg, stride_gk, ok, D, DP)
        _store_groups(DV, dv, g, slot, stride_gg, stride_gk, ok, D, DP)


# ---------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------
_FWD = Launcher(_ga_fwd_kernel)
_BWD = Launcher(_ga_bwd_kernel)


def _padded_dims(slots: int, head_dim: int, variant: str) -> tuple[int, int]:
    # the bcast tiles keep a slot axis of at least 2 (a size-1 axis buys nothing and is a rarer layout)
    kp = next_pow2(slots) if variant == "dot" else max(2, next_pow2(slots))
    return kp, block_d(head_dim)


def check_supported(q: torch.Tensor, variant: str) -> None:
    """ValueError when the kernel cannot run this shape / variant (the dispatcher calls it first)."""
    _constexprs(q, variant)


# (dtype, K, Dh, variant) -> the kernels' constexprs, for the inputs that passed the checks once. A plain dict,
# not lru_cache: torch.compile traces check_supported, and reads a dict without a warning.
_CONSTEXPRS: dict = {}


def _constexprs(q: torch.Tensor, variant: str) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    key = (q.dtype, q.shape[1], q.shape[3], variant)
    if torch.compiler.is_compiling():  # traced, where shapes may be symbolic: checked, not memoised
        return _checked_constexprs(*key)
    if key not in _CONSTEXPRS:
        _CONSTEXPRS[key] = _checked_constexprs(*key)
    return _CONSTEXPRS[key]


def _checked_constexprs(dtype: torch.dtype, slots: int, head_dim: int, variant: str) -> dict:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton group attention takes float32, bfloat16 or float16, got {dtype}")
    if not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"the Triton group attention takes K = 1..{MAX_SLOTS} slots per group, got K={slots}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"the Triton group attention takes head dims 1..{MAX_HEAD_DIM}, got Dh={head_dim}")
    kp, dp = _padded_dims(slots, head_dim, variant)
    if variant == "bcast" and kp * kp * dp > _BCAST_BUDGET:
        raise ValueError(f"variant 'bcast' keeps KP^2 * DP = {kp * kp * dp} products per group in registers "
                         f"(limit {_BCAST_BUDGET}; K={slots}, Dh={head_dim}): use variant 'dot'")
    return dict(K=slots, D=head_dim, KP=kp, DP=dp, VARIANT=variant, PREC=dot_precision(dtype))


def _grid(groups: int, heads: int):
    return lambda meta: (cdiv(groups, meta["BLOCK_G"]), heads)


def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_valid: torch.Tensor, scale: float,
              variant: str) -> torch.Tensor:
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    groups, slots, heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if groups == 0 or heads == 0:
        return out
    valid = slot_valid.view(torch.uint8)  # same bytes; Triton reads uint8 more predictably than bool
    # the bucket: the constexprs' key and the dtype of every tensor argument (the autotuner keys on them)
    _FWD((q.device, q.dtype, k.dtype, v.dtype, slots, head_dim, variant), _grid(groups, heads),
         Q=q, Kx=k, V=v, Valid=valid, Out=out, G=groups,
         stride_qg=q.stride(0), stride_qk=q.stride(1), stride_qh=q.stride(2),
         stride_kg=k.stride(0), stride_kk=k.stride(1), stride_kh=k.stride(2),
         stride_vg=v.stride(0), stride_vk=v.stride(1), stride_vh=v.stride(2),
         stride_sg=valid.stride(0), stride_sk=valid.stride(1),
         stride_og=out.stride(0), stride_ok=out.stride(1), stride_oh=out.stride(2),
         scale_log2=float(scale) * _LOG2E, **_constexprs(q, variant))
    return out


def _bwd_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_valid: torch.Tensor,
              scale: float, variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, dout = (last_dim_contiguous(x) for x in (q, k, v, dout))
    groups, slots, heads, head_dim = q.shape
    # fresh contiguous gradients (what the fake implementation promises), whatever the inputs' strides
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if groups == 0 or heads == 0:
        return dq, dk, dv
    valid = slot_valid.view(torch.uint8)
    _BWD((q.device, q.dtype, k.dtype, v.dtype, slots, head_dim, variant, dout.dtype), _grid(groups, heads),
         Q=q, Kx=k, V=v, Valid=valid, DO=dout, DQ=dq, DK=dk, DV=dv, G=groups,
         stride_qg=q.stride(0), stride_qk=q.stride(1), stride_qh=q.stride(2),
         stride_kg=k.stride(0), stride_kk=k.stride(1), stride_kh=k.stride(2),
         stride_vg=v.stride(0), stride_vk=v.stride(1), stride_vh=v.stride(2),
         stride_sg=valid.stride(0), stride_sk=valid.stride(1),
         stride_dog=dout.stride(0), stride_dok=dout.stride(1), stride_doh=dout.stride(2),
         stride_gg=dq.stride(0), stride_gk=dq.stride(1), stride_gh=dq.stride(2),
         scale=float(scale), scale_log2=float(scale) * _LOG2E, **_constexprs(q, variant))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# custom ops (torch.compile traces around them) and autograd
# ---------------------------------------------------------------------------------------------------------
def _fwd_fake(q, k, v, slot_valid, scale, variant):
    return q.new_empty(q.shape)


def _bwd_fake(dout, q, k, v, slot_valid, scale, variant):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, slot_valid, scale, variant = inputs
    ctx.save_for_backward(q, k, v, slot_valid)
    ctx.params = (scale, variant)


def _backward(ctx, bwd, dout):
    q, k, v, slot_valid = ctx.saved_tensors
    dq, dk, dv = bwd(dout, q, k, v, slot_valid, *ctx.params)
    return dq, dk, dv, None, None, None


_OP = KernelOp("group_attention", _fwd_impl, _fwd_fake, _bwd_impl, _bwd_fake, _setup_context, _backward,
               grad_inputs=(0, 1, 2))


def triton_group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_valid: torch.Tensor,
    *,
    scale: Optional[float] = None,
    variant: Optional[str] = None,
) -> torch.Tensor:
    """q, k, v [G, K, H, Dh] (last dim contiguous, else copied), slot_valid [G, K] bool -> [G, K, H, Dh].

    variant: "dot" or "bcast" (module docstring); None = MERLIN_LONGSEQ_GA_VARIANT, else "dot".
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    variant = _default_variant() if variant is None else variant
    check_supported(q, variant)
    return _OP(q, k, v, slot_valid, float(scale), variant)
