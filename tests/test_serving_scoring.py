"""Request-level scoring without a server (torch only): the user-side cache gives the uncached scores, is
bounded (LRU) and refreshes when the history changes; bad requests raise a clear RequestError."""
from __future__ import annotations

import pytest
import torch

from merlin_longseq.models.longer import LONGERConfig, LONGERModel
from merlin_longseq.models.stca import STCAConfig, STCAModel
from merlin_longseq.request import RequestBatch, RequestError
from merlin_longseq.serving.scoring import UserStateCache, make_scorer


def batch_of(lengths, candidates, users, num_items=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    hist_offsets = torch.tensor([0] + lengths).cumsum(0)
    cand_offsets = torch.tensor([0] + candidates).cumsum(0)
    request_time = torch.full((len(lengths),), 10 ** 6, dtype=torch.int64)
    return RequestBatch(hist_item_ids=torch.randint(1, num_items + 1, (n,), generator=g), hist_offsets=hist_offsets,
                        cand_item_ids=torch.randint(1, num_items + 1, (sum(candidates),), generator=g),
                        cand_offsets=cand_offsets, hist_actions=torch.randint(0, 4, (n,), generator=g),
                        hist_timestamps=torch.sort(torch.randint(0, 10 ** 6, (n,), generator=g)).values,
                        request_time=request_time, user_ids=torch.tensor(users))


MODELS = {
    "stca": lambda: STCAModel(STCAConfig(num_items=50, num_users=5, d_model=16, n_heads=2, tasks=("a", "b"))),
    "longer": lambda: LONGERModel(LONGERConfig(num_items=50, num_users=5, token_dim=8, merge_size=3,
                                               num_recent_queries=2, head_hidden=8)),
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_cached_scores_equal_uncached_and_forward(arch):
    model = MODELS[arch]().eval()
    batch = batch_of([7, 0, 13], [3, 2, 4], [1, 2, 3])
    with torch.no_grad():
        forward = model(batch.hist_item_ids, batch.hist_actions, batch.hist_timestamps, batch.hist_offsets,
                        batch.request_time, batch.cand_item_ids, batch.cand_offsets, batch.user_ids)
    cache = UserStateCache(max_entries=3)
    scorer = make_scorer(model, max_history=32, cache=cache)
    uncached = scorer.score(batch, use_cache=False)
    torch.testing.assert_close(uncached, forward, atol=1e-5, rtol=0)
    first = scorer.score(batch)  # fills the cache
    again = scorer.score(batch)
    torch.testing.assert_close(first, forward, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, forward, atol=1e-5, rtol=0)
    assert len(cache) == 3 and cache.hits == 3  # the second pass hit every user
    # every history changes: the entry is refreshed, scores follow the new history
    changed = batch_of([7, 0, 13], [3, 2, 4], [1, 2, 3], seed=1)
    with torch.no_grad():
        new_forward = model(changed.hist_item_ids, changed.hist_actions, changed.hist_timestamps,
                            changed.hist_offsets, changed.request_time, changed.cand_item_ids, changed.cand_offsets,
                            changed.user_ids)
    refreshes = cache.refreshes
    torch.testing.assert_close(scorer.score(changed), new_forward, atol=1e-5, rtol=0)
    assert cache.refreshes > refreshes


def test_cache_is_bounded_in_bytes():
    cache = UserStateCache(max_entries=100, max_bytes=3 * 400)
    for user in range(10):
        cache.put(user, b"x", [torch.zeros(100)])  # 400 bytes each
    assert len(cache) == 3 and cache.nbytes == 1200
    assert cache.get(9, b"x") is not None and cache.get(0, b"x") is None


@pytest.mark.parametrize("change, message", [
    (dict(cand_offsets=torch.tensor([0, 0, 4, 8])), "request 0 has zero candidates"),
    (dict(hist_item_ids=torch.full((20,), 51)), r"hist_item_ids must lie in \[0, 50\]"),
    (dict(hist_actions=None), "needs hist_actions"),
    (dict(request_time=torch.tensor([0, 0, 0])), "at or after its request_time"),
])
def test_bad_requests_raise_clear_errors(change, message):
    scorer = make_scorer(MODELS["stca"]().eval(), max_history=32)
    batch = batch_of([7, 0, 13], [2, 2, 4], [1, 2, 3])
    with pytest.raises(RequestError, match=message):
        scorer.score(RequestBatch(**{**batch.__dict__, **change}))


def test_history_longer_than_max_is_refused():
    scorer = make_scorer(MODELS["longer"]().eval(), max_history=10)
    with pytest.raises(RequestError, match="more than the maximum 10"):
        scorer.score(batch_of([7, 11], [1, 1], [1, 2]))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_cached_scoring_on_cuda(arch):
    # the cache path scores request by request: offsets made for the slice must stay on the batch's device
    torch.manual_seed(0)
    model = MODELS[arch]()
    batch = batch_of([3, 2], [2, 4], [1, 2])
    expected = make_scorer(model, max_history=8).score(batch)
    cached = make_scorer(model, max_history=8, device="cuda", cache=UserStateCache(4))
    for _ in range(2):  # a miss, then a hit
        torch.testing.assert_close(cached.score(batch), expected, rtol=1e-4, atol=1e-4)
