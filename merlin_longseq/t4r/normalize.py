"""L2 normalisation for Transformers4Rec next-item models: cosine scores, as the HSTU reference trains them.

The reference scores an item by the dot product of the L2-normalised sequence output and the L2-normalised item
embedding, divided by a temperature (0.05 on MovieLens). In a T4R model with weight tying both pieces fit in
without touching T4R:

    input_module = tr.TabularSequenceFeatures.from_schema(schema, ..., masking="clm")
    body = tr.SequentialBlock(input_module, block, L2Normalize())          # unit-norm sequence output
    task = tr.NextItemPredictionTask(weight_tying=True, softmax_temperature=0.05, ...)
    model = tr.Model(tr.Head(body, task, inputs=input_module))
    l2_normalize_embedding(input_module.item_embedding_table)             # unit-norm item rows, in and out

The item table is one nn.Embedding, read by the input lookup and (weight tying) by the output layer at every
forward, so one parametrization of its weight normalises both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from transformers4rec.torch.block.base import BlockBase


class L2Normalize(BlockBase):
    """[..., D] -> the same vectors scaled to unit L2 norm; zero vectors (padded positions) stay zero."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, inputs: torch.Tensor, **kwargs) -> torch.Tensor:
        return F.normalize(inputs, p=2.0, dim=-1, eps=self.eps)

    def forward_output_size(self, input_size):
        return input_size


class UnitRows(torch.nn.Module):
    """Parametrization: every row of a [V, D] table scaled to unit norm, row `padding_idx` (if any) zero."""

    def __init__(self, padding_idx: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.padding_idx, self.eps = padding_idx, eps

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = F.normalize(weight, p=2.0, dim=-1, eps=self.eps)
        if self.padding_idx is None:
            return rows
        # set by the parametrization itself, so the padding row gets no gradient (normalising a zero row would
        # otherwise scale its gradient by 1/eps, e.g. from a full softmax's padding logit)
        return rows.index_fill(0, torch.tensor([self.padding_idx], device=weight.device), 0.0)


def l2_normalize_embedding(embedding: torch.nn.Embedding, eps: float = 1e-6) -> torch.nn.Embedding:
    """Make every read of `embedding.weight` unit-norm per row (padding row zero); returns the embedding.

    The trained parameter becomes `embedding.parametrizations.weight.original`; the optimiser must be built
    after this call (tr.Trainer builds it at train()).
    """
    if parametrize.is_parametrized(embedding, "weight"):
        raise ValueError("the embedding's weight is already parametrized")
    parametrize.register_parametrization(embedding, "weight", UnitRows(embedding.padding_idx, eps))
    return embedding
