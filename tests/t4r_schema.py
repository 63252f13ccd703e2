"""A hand-written Transformers4Rec sequence schema, batches, and the smallest T4R model around HSTUBlock.

Shared by the T4R tests that need no parquet data (no ETL): the schema is what the NVTabular workflow of
workflows/sequences.py writes (item ids tagged ITEM_ID, timestamps tagged TIME).
"""
from __future__ import annotations

import torch


def sequence_schema(length: int, num_items: int = 40, time: bool = True):
    from merlin.schema import ColumnSchema, Schema, Tags

    def column(name, tags, properties=None):
        return ColumnSchema(name, tags=tags, dtype="int64", is_list=True, is_ragged=False,
                            properties={"value_count": {"min": length, "max": length}, **(properties or {})})

    columns = [column("item_id_seq", [Tags.ITEM_ID, Tags.ITEM, Tags.ID, Tags.CATEGORICAL, Tags.SEQUENCE, Tags.LIST],
                      {"domain": {"min": 0, "max": num_items - 1, "name": "item_id"}})]
    if time:
        columns.append(column("timestamp_seq", [Tags.TIME, Tags.SEQUENCE, Tags.LIST]))
    return Schema(columns)


def padded(rows: list[list[int]], width: int | None = None) -> torch.Tensor:
    width = width or max(len(r) for r in rows)
    return torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64)


def batch(items: list[list[int]], times: list[list[int]] | None = None, width: int | None = None) -> dict:
    """A right-padded batch {item_id_seq, timestamp_seq}: fresh tensors (tr.Model edits its input dict)."""
    out = {"item_id_seq": padded(items, width)}
    if times is not None:
        out["timestamp_seq"] = padded(times, width)
    return out


def input_module(schema, length: int, d_model: int = 8, masking="clm"):
    import transformers4rec.torch as tr

    return tr.TabularSequenceFeatures.from_schema(schema, max_sequence_length=length, aggregation="concat",
                                                  masking=masking, embedding_dim_default=d_model)


def hstu_model(schema, length: int, d_model: int = 8, masking="clm", top_k=None, **block_options):
    """tr.Model(Head(SequentialBlock(inputs, HSTUBlock), NextItemPredictionTask)) -> (model, block)."""
    import transformers4rec.torch as tr

    from merlin_longseq.t4r import HSTUBlock

    inputs = input_module(schema, length, d_model, masking)
    block = HSTUBlock(tr.XLNetConfig.build(d_model=d_model, n_head=2, n_layer=2), inputs=inputs, **block_options)
    head = tr.Head(tr.SequentialBlock(inputs, block), tr.NextItemPredictionTask(weight_tying=True), inputs=inputs)
    return tr.Model(head, top_k=top_k), block
