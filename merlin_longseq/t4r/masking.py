"""Length-extrapolation masking: train on a short recent window of every session, evaluate on all of it.

A causal (clm) Transformers4Rec masking. In training each session keeps only its most recent
BetaLengthSampler-drawn window (merlin_longseq/extrapolation.py: a fresh draw per session and batch); older
positions are neither labels nor tokens: their targets are dropped and `mask_schema` marks only the window.
Evaluation and inference see the full history, as plain clm masking does.

    masking = LengthExtrapolationMasking(hidden_size=64, sampler=BetaLengthSampler(max_train_len=200))
    input_module = tr.TabularSequenceFeatures.from_schema(schema, ..., d_output=64, masking=masking)
    body = tr.SequentialBlock(input_module, HSTUBlock(config, inputs=input_module))

HSTUBlock runs only on the window. Other T4R blocks still get every position, but clm masking replaces the
embeddings outside `mask_schema` by its trainable mask embedding, so the older events carry no item content.
Registered as "clm_length_extrapolation" (default sampler) for `from_schema(masking="...")`.
"""
from __future__ import annotations

import torch
from transformers4rec.torch.masking import CausalLanguageModeling, MaskingInfo, masking_registry

from merlin_longseq.extrapolation import BetaLengthSampler
from merlin_longseq.jagged import lengths_from_padding

# a window of one event has no next item to predict: windows are at least this long (sessions permitting)
MIN_WINDOW = 2


@masking_registry.register_with_multiple_names("clm_length_extrapolation", "length_extrapolation")
class LengthExtrapolationMasking(CausalLanguageModeling):
    """Causal masking whose training targets and tokens are each session's most recent Beta-drawn window.

    Args:
        hidden_size: width of the embeddings it masks (the input module's output width).
        sampler: the window draw; BetaLengthSampler() by default (max_train_len=1024, mean 256 events), so set
            max_train_len near the session lengths you train on (e.g. the input module's max_sequence_length).
        padding_idx, eval_on_last_item_seq_only, train_on_last_item_seq_only: as CausalLanguageModeling.

    After each training batch `window_lengths` [B] holds the number of events kept per session (None after an
    evaluation or inference batch), as `mask_schema` holds the token positions.
    """

    def __init__(self, hidden_size: int, sampler: BetaLengthSampler | None = None, padding_idx: int = 0,
                 eval_on_last_item_seq_only: bool = True, train_on_last_item_seq_only: bool = False, **kwargs):
        super().__init__(hidden_size=hidden_size, padding_idx=padding_idx,
                         eval_on_last_item_seq_only=eval_on_last_item_seq_only,
                         train_on_last_item_seq_only=train_on_last_item_seq_only, **kwargs)
        sampler = BetaLengthSampler() if sampler is None else sampler
        if not isinstance(sampler, BetaLengthSampler):
            raise TypeError(f"sampler must be a merlin_longseq.extrapolation.BetaLengthSampler, got {type(sampler)}")
        self.sampler = sampler
        self.window_lengths: torch.Tensor | None = None

    def _compute_masked_targets(self, item_ids: torch.Tensor, training: bool = False,
                                testing: bool = False) -> MaskingInfo:
        info = super()._compute_masked_targets(item_ids, training=training, testing=testing)
        if not training:
            self.window_lengths = None
            return info
        # right padding, as clm's shifted targets assume; anything else raises instead of being misread
        lengths = lengths_from_padding(item_ids, self.padding_idx)
        window = torch.maximum(self.sampler.sample(lengths), lengths.clamp(max=MIN_WINDOW))
        first_kept = (lengths - window).unsqueeze(1)  # [B, 1]
        keep = torch.arange(item_ids.shape[1], device=item_ids.device).unsqueeze(0) >= first_kept
        self.window_lengths = window
        schema = info.schema.bool() & keep
        targets = torch.where(keep, info.targets, torch.full_like(info.targets, self.padding_idx))
        return MaskingInfo(schema, targets)
