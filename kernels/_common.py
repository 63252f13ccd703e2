"""Plumbing shared by the Triton kernel files; each of them keeps its kernels and launcher only.

  - interpreter detection and the interpreter's tile knobs (tests change them);
  - autotune configs and the pruning steps the kernels share (area limit, MERLIN_LONGSEQ_*_AUTOTUNE=0);
  - Launcher: an autotuned kernel whose choice is kept per shape bucket, so a repeated call only launches;
  - host helpers: last-dim contiguity, padded head dims, power-of-two length buckets, the dot precision;
  - load_rows: the masked [rows, BLOCK_D] tile load of the attention kernels;
  - KernelOp: the torch.library custom ops (fake implementations, autograd) and the eager fast path.
"""
import os
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------------------
# autotune configs
# ---------------------------------------------------------------------------------------------------------
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def config(warps: int, stages: int, **tiles) -> triton.Config:
    return triton.Config(tiles, num_warps=warps, num_stages=stages)


def mn_config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    """The attention kernels' tile: BLOCK_M query rows x BLOCK_N key rows."""
    return config(warps, stages, BLOCK_M=block_m, BLOCK_N=block_n)


def interpret_configs(tiles: dict) -> list:
    # the interpreter runs one config: the tiles tests choose (warps and stages mean nothing there)
    return [config(4, 1, **tiles)]


def pruner(tiles: dict, keep: Callable) -> Callable:
    """An early_config_prune: the interpreter's tiles under TRITON_INTERPRET, else keep(configs, args) with
    args every launch argument by name."""
    def prune(configs, named_args, **kwargs):
        if interpreting():
            return interpret_configs(tiles)
        return keep(configs, {**named_args, **kwargs})

    return prune


def autotune_off(env_var: str) -> bool:
    """MERLIN_LONGSEQ_<KERNEL>_AUTOTUNE=0: each kernel runs the first config its pruning keeps."""
    return os.environ.get(env_var, "1") == "0"


def area_limited(configs: list, limit: int, env_var: str) -> list:
    """The configs whose BLOCK_M x BLOCK_N tile is at most `limit` (else the last, the smallest), only the first
    of them with autotuning off."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit] or configs[-1:]
    return kept[:1] if autotune_off(env_var) else kept


class Launcher:
    """One @triton.autotune kernel, launched with the config it chose for a shape bucket.

    A bucket's first call goes through the autotuner (pruning, benchmarking); later calls launch the JIT
    function directly with the kept choice, skipping the autotuner's per-call key building and lookup. A
    bucket must determine the autotuner's key (its key arguments and the dtype of every tensor argument)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._chosen = {}

    def __call__(self, bucket, grid, **kwargs) -> None:
        chosen = self._chosen.get(bucket)
        if chosen is not None:
            self.kernel.fn.run(grid=grid, warmup=False, **kwargs, **chosen)
            return
        self.kernel[grid](**kwargs)
        best = self.kernel.best_config
        if best.pre_hook is None:  # a config hook runs on every launch: keep those on the autotuner's path
            self._chosen[bucket] = best.all_kwargs()

    def clear(self) -> None:
        self.kernel.cache.clear()
        self._chosen.clear()


def set_interpret_tiles(tiles: dict, launchers: Sequence[Launcher], **values) -> None:
    """Test hook behind each kernel file's _set_interpret_*: new interpreter tiles, every cached choice dropped
    so they take effect."""
    tiles.update(values)
    for launcher in launchers:
        launcher.clear()


# ---------------------------------------------------------------------------------------------------------
# host helpers
# ---------------------------------------------------------------------------------------------------------
def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# Host arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr_functions, which cost
# microseconds per host call (triton 3.9), on the per-call path of every launch.
def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def block_d(d: int) -> int:
    """A head dim padded to a power of two >= 16 (tl.dot's smallest operand width)."""
    return max(16, next_pow2(d))


def pow2_bucket(n: int, low: int, high: Optional[int] = None) -> int:
    """n rounded up to a power of two in [low, high]: autotune keys that do not re-tune for every batch."""
    bucket = max(low, next_pow2(n))
    return bucket if high is None else min(high, bucket)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32: three tf32 passes (near-fp32 accuracy on the tensor cores; "ieee" falls off them); bf16 / fp16
    # operands ignore it
    return "tf32x3" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------------------
# tile helpers
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def load_rows(Base, rows, stride, offs_d, row_ok, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """[rows, BLOCK_D] tile; masks only where rows can run past the end (MASK_ROWS) or the head dim is padded."""
    ptrs = Base + rows[:, None].to(tl.int64) * stride + offs_d[None, :]
    if MASK_ROWS:
        if BLOCK_D == D:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if BLOCK_D == D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)


# ---------------------------------------------------------------------------------------------------------
# custom ops and autograd
# ---------------------------------------------------------------------------------------------------------
class KernelOp:
    """The custom ops merlin_longseq::<name>_fwd / _bwd (fake implementations, autograd on the forward), and
    the path every call takes:
      - torch.compile or torch.jit.trace: the forward op, opaque to them; its autograd calls the backward op;
      - eager, with an input that needs a gradient: an autograd.Function calling the two launchers directly,
        with the same setup_context and backward;
      - eager otherwise: the forward launcher alone.
    Eager calls skip the custom op's Python dispatch, which cost ~0.5 ms of host time per call on the H100
    machine's CPU (cProfile: custom_ops.backend_impl), more than a short kernel's GPU time.

    The ops are opaque custom_ops, not triton_ops: under TRITON_INTERPRET wrap_triton cannot see interpreted
    kernels, and on the H100 run (torch 2.11, triton 3.6) Inductor re-launching the autotuned kernels gave wrong
    forward outputs or did not build."""

    def __init__(self, name: str, fwd: Callable, fwd_fake: Callable, bwd: Callable, bwd_fake: Callable,
                 setup_context: Callable, backward: Callable, grad_inputs: Sequence[int]):
        """fwd, bwd: the launchers, type-annotated (the ops' schemas come from the annotations);
        backward(ctx, bwd, *grads) gets the backward op (the registered autograd, which tracing needs) or the
        backward launcher (eager); grad_inputs: positions of the inputs that can need a gradient."""
        self.fwd_op = torch.library.custom_op(f"merlin_longseq::{name}_fwd", fwd, mutates_args=())
        self.bwd_op = torch.library.custom_op(f"merlin_longseq::{name}_bwd", bwd, mutates_args=())
        self.fwd_op.register_fake(fwd_fake)
        self.bwd_op.register_fake(bwd_fake)
        bwd_op = self.bwd_op

        def op_backward(ctx, *grads):
            return backward(ctx, bwd_op, *grads)

        self.fwd_op.register_autograd(op_backward, setup_context=setup_context)

        def forward(ctx, *inputs):
            output = fwd(*inputs)
            setup_context(ctx, inputs, output)
            return output

        def eager_backward(ctx, *grads):
            return backward(ctx, bwd, *grads)

        # built with type() so that grad_fn names the op (HstuAttentionFunctionBackward, ...)
        self.function = type("".join(word.title() for word in name.split("_")) + "Function",
                             (torch.autograd.Function,),
                             dict(forward=staticmethod(forward), backward=staticmethod(eager_backward)))
        self.fwd = fwd
        self.grad_inputs = tuple(grad_inputs)

    def __call__(self, *inputs):
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.fwd_op(*inputs)
        if torch.is_grad_enabled():
            for i in self.grad_inputs:
                x = inputs[i]
                if x is not None and x.requires_grad:
                    return self.function.apply(*inputs)
        return self.fwd(*inputs)
