"""The one history tokenizer of the ranking architectures (STCA, LONGER, mean pooling, DIN).

    x_j = item_vector_j + action_emb(action_j) + time_emb(log2 bucket of request_time - t_j)
          + recency_emb(log2 bucket of rank_j)                  (rank_j = 0 for the most recent event)

The item vectors come in from the model, whose item table the candidates share. No absolute position
table: both buckets are logarithmic and clamp into their last bucket, so a history longer than any seen
in training maps onto known buckets. By default the action, time and recency tables start at zero: a bucket
that training never reached adds nothing rather than noise. A bucket count of 0 leaves that part out.
"""
from __future__ import annotations

import torch
from torch import nn

from merlin_longseq.buckets import log2_buckets
from merlin_longseq.jagged import jagged_positions, lengths_from_offsets


class HistoryTokenizer(nn.Module):
    def __init__(self, dim: int, num_actions: int, num_time_buckets: int = 0, num_rank_buckets: int = 0,
                 zero_init: bool = True):
        super().__init__()
        if dim < 1 or num_actions < 0 or num_time_buckets < 0 or num_rank_buckets < 0:
            raise ValueError("HistoryTokenizer needs dim >= 1 and non-negative table sizes")
        self.action_embedding = nn.Embedding(num_actions + 1, dim, padding_idx=0)
        self.time_embedding = nn.Embedding(num_time_buckets, dim) if num_time_buckets else None
        self.recency_embedding = nn.Embedding(num_rank_buckets, dim) if num_rank_buckets else None
        if zero_init:
            for table in (self.action_embedding, self.time_embedding, self.recency_embedding):
                if table is not None:
                    nn.init.zeros_(table.weight)

    def forward(self, item_vectors, actions, timestamps, offsets, request_time):
        """item_vectors [N, d], actions / timestamps [N], offsets [R + 1], request_time [R] -> tokens [N, d]."""
        tokens = item_vectors + self.action_embedding(actions)
        if self.time_embedding is None and self.recency_embedding is None:
            return tokens
        seq_index, positions = jagged_positions(offsets)
        if self.time_embedding is not None:
            age = request_time[seq_index].to(torch.int64) - timestamps.to(torch.int64)
            tokens = tokens + self.time_embedding(log2_buckets(age, self.time_embedding.num_embeddings))
        if self.recency_embedding is not None:
            rank = lengths_from_offsets(offsets)[seq_index] - 1 - positions  # 0 = most recent
            tokens = tokens + self.recency_embedding(log2_buckets(rank, self.recency_embedding.num_embeddings))
        return tokens


__all__ = ["HistoryTokenizer"]
