"""PyTorch reference for the STCA history projection (one layer's user side, models/stca.py STCALayer).

For every history token x [N, d] (all requests back to back; the op is row-wise, so no offsets):

    SwiGLU(x) = down(SiLU(gate x) * up x)      gate/up: the two halves of one Linear(d, 2h, bias=False)
    z = x + SwiGLU(x)   (residual=True)   or   z = SwiGLU(x)   (residual=False)
    y = LayerNorm(z)                           (weight, bias, eps)
    [K | V] = y W_kv^T                         W_kv: Linear(d, 2 H Dh, bias=False)

K and V come back as [N, H, Dh] each (views of one [N, 2 H Dh] product, as STCALayer.keys_values returns
them). The ops and their order are those of the nn modules (SwiGLU, nn.LayerNorm, nn.Linear), so in fp32 the
result is bit-identical to the module composition. It materialises [N, 2h] and [N, h] intermediates: the
ground truth for the fused Triton kernel, not the fast path. Plain torch ops only: TorchScript can trace it.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def pytorch_history_projection(
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [N, d]; w_gate_up [2h, d]; w_down [d, h]; ln_weight, ln_bias [d]; w_kv [2 H Dh, d] -> K, V [N, H, Dh]."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)  # [N, h] each
    ffn = F.linear(F.silu(gate) * up, w_down)  # [N, d]
    z = x + ffn if residual else ffn
    y = F.layer_norm(z, (x.shape[-1],), ln_weight, ln_bias, eps)  # [N, d]
    k, v = F.linear(y, w_kv).chunk(2, dim=-1)  # [N, H Dh] each
    head_dim = w_kv.shape[0] // (2 * num_heads)
    return k.reshape(-1, num_heads, head_dim), v.reshape(-1, num_heads, head_dim)
