"""Causality helpers for Transformers4Rec blocks under causal ("clm") masking.

T4R's XLNet block defaults to attn_type="bi" and T4R passes it no causal mask under clm masking, so position
i reads item i+1 -- its own target -- and its next-item metrics are inflated. attn_type="uni" crashes in the
pinned transformers 4.30, so `xlnet_causal_prepare()` adds XLNet's perm_mask instead.
"""
from __future__ import annotations


def xlnet_causal_prepare():
    """A TransformerPrepare class for tr.TransformerBlock(XLNetConfig, prepare_module=...) that makes XLNet causal."""
    import torch
    from transformers4rec.torch.block.transformer import TransformerPrepare

    class XLNetCausalPrepare(TransformerPrepare):
        """Adds XLNet's perm_mask: 1 where query i must not see key j (j > i)."""

        def forward(self, inputs_embeds):
            batch, seq = inputs_embeds.shape[:2]
            future = torch.ones(seq, seq, device=inputs_embeds.device, dtype=inputs_embeds.dtype).triu(1)
            return {"inputs_embeds": inputs_embeds, "perm_mask": future.expand(batch, seq, seq)}

    return XLNetCausalPrepare


def check_causal(model, batch: dict, position: int) -> float:
    """Largest change of the block outputs BEFORE `position` when the items at and after it are replaced.

    Zero for a causal block. Runs the body in evaluation mode on the padded batch {name: [B, S] tensor}.
    """
    import torch

    body = model.heads[0].body
    altered = {k: v.clone() for k, v in batch.items()}
    item_key = next(k for k in batch if k.startswith("item_id"))
    ids = altered[item_key]
    real = ids[:, position:] != 0
    ids[:, position:] = torch.where(real, (ids[:, position:] % 7) + 3, ids[:, position:])  # other real ids
    body.eval()
    with torch.no_grad():
        before = body(batch, testing=True)
        after = body(altered, testing=True)
    return float((before[:, :position] - after[:, :position]).abs().max())
