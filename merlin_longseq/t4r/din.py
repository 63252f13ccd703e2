"""DIN-style target attention in Transformers4Rec: the DINBlock body, a baseline for the request blocks.

Same contract, task and loader as STCABlock / LONGERBlock / MeanPoolBlock (merlin_longseq.t4r.request):

    block = DINBlock.from_schema(dataset.schema, d_model=32)
    model = tr.Model(tr.Head(block, [RequestBinaryClassificationTask("click")]))
"""
from __future__ import annotations

import dataclasses

from merlin_longseq.models.din import DINConfig, DINModel
from merlin_longseq.t4r.request import RequestBlock, RequestColumns, columns_and_sizes


class DINBlock(RequestBlock):
    """Candidate-weighted sum of the history tokens + target token -> MLP; request dict in, [B, C, hidden] out.

    Built headless (the heads are the T4R tasks). After every forward `candidate_mask` [B, C] marks the
    real candidates.
    """

    def __init__(self, config: DINConfig, columns: RequestColumns | None = None, schema=None):
        super().__init__()
        self.columns = columns or RequestColumns()
        if config.num_users == 0 and self.columns.user_id is not None:
            self.columns = dataclasses.replace(self.columns, user_id=None)  # no token reads it: do not load it
        self.din_config = dataclasses.replace(config, tasks=())
        self.model = DINModel(self.din_config)
        self.candidate_mask = None
        self.schema = schema

    @classmethod
    def from_schema(cls, schema, columns: RequestColumns | None = None, use_user_id: bool = True,
                    **config_fields) -> "DINBlock":
        """Sizes from the schema's int domains; config_fields: any DINConfig field (d_model, attention_dims, ...)."""
        schema, columns, sizes = columns_and_sizes(schema, columns, use_user_id, config_fields)
        return cls(DINConfig(**sizes, **config_fields), columns, schema=schema)


__all__ = ["DINBlock"]
