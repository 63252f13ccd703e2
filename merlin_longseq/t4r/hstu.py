"""HSTUBlock: HSTU / ULTRA-HSTU as a Transformers4Rec sequence block.

Swap it in for `tr.TransformerBlock` with one changed line:

    body = tr.SequentialBlock(
        input_module, tr.MLPBlock([64]),
        HSTUBlock(transformer_config, masking=input_module.masking),   # was tr.TransformerBlock(...)
    )

Transformers4Rec hands a sequence block only the [B, S, D] embeddings, so the block takes its padding from
the masking module (`masking.mask_schema`, right-padded for causal masking in training, evaluation and
inference alike) and applies its own causal mask. Padding positions are dropped before any compute (the
block runs on jagged tokens) and come back as zeros.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers4rec.torch.block.base import BlockBase
from transformers4rec.torch.masking import CausalLanguageModeling, MaskSequence

from merlin_longseq.jagged import jagged_to_padded, lengths_from_padding, padded_to_jagged
from merlin_longseq.models.hstu import HSTUConfig, HSTUEncoder

# attribute names under which Transformers4Rec / Hugging Face configs keep the three sizes
_SIZE_ATTRIBUTES = {
    "d_model": ("d_model", "hidden_size", "n_embd"),
    "n_heads": ("n_head", "num_attention_heads"),
    "n_layers": ("n_layer", "num_hidden_layers"),
}


def hstu_config_from(config: Any, **overrides) -> HSTUConfig:
    """HSTUConfig from an HSTUConfig or any T4R transformer config (XLNetConfig, GPT2Config, ...)."""
    if isinstance(config, HSTUConfig):
        values = dict(config.__dict__)
    else:
        values = {}
        for field, names in _SIZE_ATTRIBUTES.items():
            found = next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
            if found is None:
                raise ValueError(f"cannot read {field} from {type(config).__name__}; pass an HSTUConfig")
            values[field] = int(found)
        dropout = getattr(config, "dropout", None)
        if dropout is not None:
            values["dropout"] = float(dropout)
    values.update(overrides)
    return HSTUConfig(**values)


class HSTUBlock(BlockBase):
    """Transformers4Rec block running an HSTUEncoder over [B, S, D] right-padded embeddings.

    Args:
        config: an HSTUConfig, or a T4R transformer config whose sizes are reused (d_model, heads, layers).
        masking: the input module's masking (`input_module.masking`); it must be causal (clm), since HSTU is.
        max_seq_len: the attention normaliser N; by default the padded length S of the inputs (constant in
            a T4R pipeline, whose loader pads every batch to the schema's max sequence length).
        **overrides: any HSTUConfig field (local_window, global_prefix, truncated_layers, backend, ...).
    """

    def __init__(self, config: Any = None, masking: MaskSequence | None = None, max_seq_len: int | None = None,
                 **overrides):
        super().__init__()
        if masking is not None and not isinstance(masking, CausalLanguageModeling):
            raise ValueError(
                f"HSTUBlock is causal and needs causal (clm) masking; got {type(masking).__name__}"
            )
        if overrides.get("num_transducers", 1) != 1:
            raise ValueError("Transformers4Rec passes no token types; use HSTUEncoder for a mixture of transducers")
        self.masking = masking
        self.fixed_max_seq_len = max_seq_len
        cfg = hstu_config_from(config if config is not None else HSTUConfig(), **overrides)
        # the encoder checks lengths against cfg.max_seq_len, so leave room for any padded length
        self.hstu_config = cfg
        self.encoder = HSTUEncoder(cfg)

    @property
    def d_model(self) -> int:
        return self.hstu_config.d_model

    def _lengths(self, inputs: torch.Tensor) -> torch.Tensor:
        schema = getattr(self.masking, "mask_schema", None) if self.masking is not None else None
        if schema is None:
            # no masking: every position is a token
            return torch.full((inputs.shape[0],), inputs.shape[1], dtype=torch.int64, device=inputs.device)
        if schema.shape != inputs.shape[:2]:
            raise ValueError(f"masking schema {tuple(schema.shape)} does not match inputs {tuple(inputs.shape[:2])}")
        return lengths_from_padding(schema.bool())

    def forward(self, inputs: torch.Tensor, **kwargs) -> torch.Tensor:
        if inputs.dim() != 3 or inputs.shape[-1] != self.d_model:
            raise ValueError(
                f"HSTUBlock expects [batch, seq, d_model={self.d_model}] embeddings, got {tuple(inputs.shape)}; "
                "put tr.MLPBlock([d_model]) before it when the input width differs"
            )
        seq_len = inputs.shape[1]
        # N of the 1/N normaliser; the encoder rejects real sequences longer than it
        self.encoder.cfg.max_seq_len = self.fixed_max_seq_len or seq_len
        lengths = self._lengths(inputs)
        values, offsets = padded_to_jagged(inputs, lengths)
        hidden = self.encoder(values, offsets)
        return jagged_to_padded(hidden, offsets, seq_len)

    def forward_output_size(self, input_size):
        return torch.Size([*input_size[:-1], self.d_model])
