"""STCA in Transformers4Rec: the STCABlock body. The data contract, the masked task and the loader it works
with live in merlin_longseq.t4r.request (shared with LONGERBlock) and are importable from here as before.

    loader = request_dataloader(dataset, batch_size=64, label_columns=["click", "like"])
    block = STCABlock.from_schema(dataset.schema, d_model=64, n_layers=2)
    head = tr.Head(block, [RequestBinaryClassificationTask("click"), RequestBinaryClassificationTask("like")])
    model = tr.Model(head)
    for inputs, targets in loader:
        loss = model(inputs, targets=targets, training=True)["loss"]

STCABlock reads the request columns from the raw input dict (its embeddings are its own), runs STCA with
request level batching and returns one vector per candidate, [B, C, hidden], padded candidates as zeros.
"""
from __future__ import annotations

import dataclasses

from merlin_longseq.models.stca import STCAConfig, STCAModel
from merlin_longseq.t4r.request import (  # noqa: F401  (re-exported: these names lived here first)
    RequestBatchPadding,
    RequestBinaryClassificationTask,
    RequestBlock,
    RequestColumns,
    columns_and_sizes,
    request_dataloader,
)


class STCABlock(RequestBlock):
    """STCA as a Transformers4Rec body: request dict in, per-candidate vectors [B, C, hidden] out.

    The STCA model is built headless: the heads are the T4R prediction tasks (RequestBinaryClassificationTask).
    Training-only behaviour (the length sampler) follows the module's train()/eval() mode.
    After every forward, `candidate_mask` [B, C] (bool, True on real candidates) describes the output.
    """

    def __init__(self, config: STCAConfig, columns: RequestColumns | None = None, schema=None):
        super().__init__()
        self.columns = columns or RequestColumns()
        if config.num_users == 0 and self.columns.user_id is not None:
            self.columns = dataclasses.replace(self.columns, user_id=None)
        self.stca_config = dataclasses.replace(config, tasks=())
        self.model = STCAModel(self.stca_config)
        self.candidate_mask = None
        self.schema = schema

    @classmethod
    def from_schema(cls, schema, columns: RequestColumns | None = None, use_user_id: bool = True,
                    **config_fields) -> "STCABlock":
        """Sizes from the schema's int domains (num_items: both item columns; num_actions; num_users).

        config_fields: any STCAConfig field (d_model, n_layers, length_sampler, ...); an explicit num_items,
        num_actions or num_users wins over the schema.
        """
        schema, columns, sizes = columns_and_sizes(schema, columns, use_user_id, config_fields)
        return cls(STCAConfig(**sizes, **config_fields), columns, schema=schema)


__all__ = ["RequestBatchPadding", "RequestBinaryClassificationTask", "RequestColumns", "STCABlock",
           "request_dataloader"]
