"""Random, valid request batches for model tests: histories oldest first and strictly before their request."""
from __future__ import annotations

import torch

from merlin_longseq.request import RequestBatch


def random_requests(lengths, candidates, *, num_items: int, num_actions: int = 3, seed: int = 0,
                    max_time: int = 10_000, request_times=None, with_users: bool = False) -> RequestBatch:
    """Event times uniform in [0, max_time); request_times default to max_time for every request."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    times = torch.cat([torch.sort(torch.randint(0, max_time, (length,), generator=g)).values for length in lengths])
    request_times = [max_time] * len(lengths) if request_times is None else list(request_times)
    return RequestBatch.from_lengths(
        hist_lengths=list(lengths), cand_lengths=list(candidates),
        hist_item_ids=torch.randint(1, num_items + 1, (n,), generator=g),
        hist_actions=torch.randint(0, num_actions + 1, (n,), generator=g), hist_timestamps=times,
        cand_item_ids=torch.randint(1, num_items + 1, (sum(candidates),), generator=g),
        request_time=torch.tensor(request_times), user_ids=torch.arange(1, len(lengths) + 1) if with_users else None)
