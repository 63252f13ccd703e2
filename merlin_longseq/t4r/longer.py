"""LONGER in Transformers4Rec: the LONGERBlock body, a drop-in for STCABlock on the same request-grouped data.

    loader = request_dataloader(dataset, batch_size=64, label_columns=["click", "like"])
    block = LONGERBlock.from_schema(dataset.schema, token_dim=16, merge_size=4, n_layers=2)
    head = tr.Head(block, [RequestBinaryClassificationTask("click"), RequestBinaryClassificationTask("like")])
    model = tr.Model(head)

The LONGER model is built headless (num_tasks = 0): the block returns the head MLP's hidden layer per
candidate, [B, C, head_hidden] (padded candidates as zeros), and the T4R prediction tasks put one sigmoid head
each on it. Every batch runs the user side once per request (RLB); `encode_user` / `score_candidates` split
the two halves for serving with a KV cache. Training-only behaviour (the length sampler) follows the module's
train()/eval() mode. The data contract, the task and the loader: merlin_longseq.t4r.request.
"""
from __future__ import annotations

import dataclasses

import torch

from merlin_longseq.jagged import jagged_to_padded, lengths_from_padding, padded_to_jagged, padding_mask
from merlin_longseq.models.longer import LONGERConfig, LONGERModel, UserCache
from merlin_longseq.t4r.request import RequestBlock, RequestColumns, columns_and_sizes


class LONGERBlock(RequestBlock):
    """LONGER as a Transformers4Rec body: request dict in, per-candidate vectors [B, C, head_hidden] out.

    After every forward, `candidate_mask` [B, C] (bool, True on real candidates) describes the output.
    """

    def __init__(self, config: LONGERConfig, columns: RequestColumns | None = None, schema=None):
        super().__init__()
        self.columns = columns or RequestColumns()
        if config.uses_users and self.columns.user_id is None:
            raise ValueError(f"global tokens {config.global_tokens} need a user id column, but columns.user_id is "
                             "None")
        if not config.uses_users and self.columns.user_id is not None:
            self.columns = dataclasses.replace(self.columns, user_id=None)  # no token reads it: do not load it
        self.longer_config = dataclasses.replace(config, num_tasks=0)  # the T4R tasks are the heads
        self.model = LONGERModel(self.longer_config)
        self.candidate_mask = None
        self.schema = schema

    @classmethod
    def from_schema(cls, schema, columns: RequestColumns | None = None, use_user_id: bool = True,
                    **config_fields) -> "LONGERBlock":
        """Sizes from the schema's int domains (num_items: both item columns; num_actions; num_users).

        config_fields: any LONGERConfig field (token_dim, merge_size, merge_mode, num_recent_queries, n_layers,
        global_tokens, mixed_precision, recompute, length_sampler, ...); an explicit num_items, num_actions or
        num_users wins over the schema. Without a user column (or use_user_id=False) num_users is 0 and the
        default global tokens leave out the user tokens.
        """
        schema, columns, sizes = columns_and_sizes(schema, columns, use_user_id, config_fields)
        config_fields = {**sizes, **config_fields}
        config_fields.setdefault("num_tasks", 0)
        return cls(LONGERConfig(**config_fields), columns, schema=schema)

    # ---- serving halves: encode a batch of requests once, score candidates against it as often as needed

    def encode_user(self, inputs) -> UserCache:
        """The history columns of a padded request dict [B, ...] -> the LONGER user cache of those B requests
        (candidate columns, if present, are not read)."""
        return self.model.encode_user(**self.history_inputs(inputs))

    def score_candidates(self, cache: UserCache, cand_item_id: torch.Tensor) -> torch.Tensor:
        """Padded candidates [B, C] (0 = padding) of the cached requests -> [B, C, hidden]; sets candidate_mask
        like forward, so the T4R tasks can be applied to the result."""
        if cand_item_id.dim() != 2 or cand_item_id.shape[0] != cache.num_requests:
            raise ValueError(f"cand_item_id must be [B, C] with B = {cache.num_requests} cached requests, got "
                             f"{tuple(cand_item_id.shape)}")
        lengths = lengths_from_padding(cand_item_id)
        cand_items, cand_offsets = padded_to_jagged(cand_item_id, lengths)
        hidden = self.model.candidate_hidden(cache, cand_items, cand_offsets)
        self.candidate_mask = padding_mask(lengths, cand_item_id.shape[1])
        return jagged_to_padded(hidden, cand_offsets, cand_item_id.shape[1])


__all__ = ["LONGERBlock"]
