"""One contract, every registered architecture (merlin_longseq.registry): a new registry entry is tested here
without a line of new test code.

Ranking architectures: request-level batching equals the per-target layout, cached scoring equals uncached,
the served model step (PredictLongSeq, run in-process) equals the model, save/load through the registry's JSON
description and a weights_only state dict round-trips, bad input gets the validator's clear error, TorchScript
works where the registry says it does and refuses otherwise. Next-item architectures: served candidate scores
and top-k equal the in-process item scores.
"""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from merlin_longseq import registry
from merlin_longseq.request import RequestBatch, RequestError, check_history, inputs_checked, validate_request
from merlin_longseq.serving.scoring import UserStateCache, make_scorer
from request_factory import random_requests

NUM_ITEMS, NUM_USERS, NUM_ACTIONS = 40, 6, 3
RANKING = registry.names(registry.RANKING)


def requests(lengths=(7, 0, 12, 3), candidates=(3, 2, 4, 1), seed=0) -> RequestBatch:
    return random_requests(lengths, candidates, num_items=NUM_ITEMS, num_actions=NUM_ACTIONS, seed=seed,
                           request_times=[20_000] * len(lengths), with_users=True)


def ranking_model(arch: str, tasks=("click", "like")):
    spec = registry.get(arch)
    torch.manual_seed(0)
    cfg = spec.config_class(num_items=NUM_ITEMS, num_actions=NUM_ACTIONS, num_users=NUM_USERS, **spec.tiny)
    return spec.model_class(cfg.with_tasks(tasks)).eval()


def test_registry_names_every_architecture_once():
    assert set(RANKING) >= {"stca", "longer", "mean-pool", "din"}
    assert registry.names(registry.NEXT_ITEM) == ("hstu", "hstu-t4r")
    with pytest.raises(ValueError, match="unknown architecture"):
        registry.get("transformer-xl")
    for arch in RANKING:
        assert registry.of_model(ranking_model(arch)).name == arch  # DIN subclasses mean pooling: still "din"


@pytest.mark.parametrize("arch", RANKING)
def test_request_level_batching_equals_per_target(arch):
    model = ranking_model(arch)
    batch = requests()
    with torch.no_grad():
        together = model(**batch.model_inputs)
        alone = model(**batch.per_target().model_inputs)
    assert together.shape == (batch.cand_item_ids.numel(), 2)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", RANKING)
def test_cached_equals_uncached(arch):
    model = ranking_model(arch)
    batch = requests()
    cache = UserStateCache(max_entries=8)
    scorer = make_scorer(model, max_history=64, cache=cache)
    uncached = scorer.score(batch, use_cache=False)
    scorer.score(batch)  # fills the cache
    cached = scorer.score(batch)
    assert cache.hits == batch.num_requests
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(uncached, model(**batch.model_inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", RANKING)
def test_save_load_round_trip_through_json_and_weights_only(arch):
    model = ranking_model(arch)
    description = registry.model_to_dict(model)
    import json

    rebuilt = registry.model_from_dict(json.loads(json.dumps(description)))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    batch = requests(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**batch.model_inputs), model(**batch.model_inputs))


@pytest.mark.parametrize("arch", RANKING)
@pytest.mark.parametrize("change, message", [
    (dict(cand_item_ids=torch.zeros(10, dtype=torch.int64)), "below the smallest item id 1"),
    (dict(hist_timestamps=torch.full((22,), 30_000)), "at or after its request_time"),
    (dict(hist_item_ids=torch.full((22,), NUM_ITEMS + 1)), r"must lie in \[0, 40\]"),
    (dict(cand_offsets=torch.tensor([0, 3, 3, 9, 10])), "request 1 has zero candidates"),
    (dict(labels=torch.zeros(9, 1)), "one label per candidate"),
])
def test_bad_input_gets_the_validators_clear_error(arch, change, message):
    import dataclasses

    model = ranking_model(arch)
    batch = dataclasses.replace(requests(), **change)
    with pytest.raises(RequestError, match=message):
        validate_request(batch, model.limits)
    with pytest.raises(RequestError, match=message):
        make_scorer(model, max_history=64).score(batch)


@pytest.mark.parametrize("arch", RANKING)
def test_torchscript_where_supported(arch):
    from merlin_longseq.serving.torchscript import example_request, trace_stca

    model = ranking_model(arch, tasks=("click",))
    if not registry.get(arch).traceable:
        with pytest.raises(ValueError, match="does not trace"):
            trace_stca(model)
        return
    traced = trace_stca(model)
    example = example_request(model)
    with torch.no_grad():
        assert traced(*example)[0].shape == (int(example[7][-1]),)


@pytest.mark.parametrize("arch", RANKING)
def test_served_step_equals_the_model(arch):
    pytest.importorskip("merlin.systems")
    import numpy as np
    from merlin.table import TensorTable

    from merlin_longseq.serving.operator import PredictLongSeq
    from merlin_longseq.serving.scoring import serving_limits

    model = ranking_model(arch)
    step = PredictLongSeq(model, serving_limits(model, max_history=64), device="cpu")
    step.load_artifacts()
    batch = requests(lengths=(5, 2), candidates=(3, 2))
    hist, cand = batch.hist_offsets.numpy().astype(np.int32), batch.cand_offsets.numpy().astype(np.int32)
    table = TensorTable({
        "hist_item_id": (batch.hist_item_ids.numpy(), hist), "hist_action": (batch.hist_actions.numpy(), hist),
        "hist_timestamp": (batch.hist_timestamps.numpy(), hist), "cand_item_id": (batch.cand_item_ids.numpy(), cand),
        "request_time": batch.request_time.numpy(), "user_id": batch.user_ids.numpy()})
    out = step.transform(None, table)
    with torch.no_grad():
        expected = model(**batch.model_inputs).numpy()
    for t, name in enumerate(step.output_names):
        np.testing.assert_allclose(np.asarray(out[name].values), expected[:, t], atol=1e-5)


def test_next_item_top_k_and_candidate_scores_equal_the_item_scores():
    from merlin_longseq.models.hstu import HSTUConfig, HSTUNextItemModel

    spec = registry.get("hstu")
    torch.manual_seed(0)
    model = HSTUNextItemModel(NUM_ITEMS, HSTUConfig(**spec.tiny, dropout=0.0), num_actions=NUM_ACTIONS).eval()
    batch = requests(lengths=(5, 9), candidates=(3, 0))
    import dataclasses

    from merlin_longseq.serving.scoring import serving_limits

    limits = dataclasses.replace(serving_limits(model), min_candidates=0)
    scorer = make_scorer(model, limits)
    with torch.no_grad():
        hidden = model(batch.hist_item_ids, batch.hist_offsets, action_ids=batch.hist_actions,
                       timestamps=batch.hist_timestamps)
        full = model.item_scores(hidden[batch.hist_offsets[1:] - 1])  # [R, items + 1]
    ids, scores = scorer.top_k(batch, k=5)
    expected_scores, expected_ids = full.topk(5, dim=1)
    torch.testing.assert_close(scores, expected_scores)
    assert torch.equal(ids, expected_ids)
    cand = scorer.score(batch)[:, 0]
    torch.testing.assert_close(cand, full[0, batch.cand_item_ids[:3]])
    # excluding the history: no recommended item was seen by its request, the rest keep their order
    ids, _ = scorer.top_k(batch, k=5, exclude_history=True)
    for r in range(2):
        seen = set(batch.hist_item_ids[batch.hist_offsets[r]:batch.hist_offsets[r + 1]].tolist())
        assert not seen & set(ids[r].tolist())
    with pytest.raises(RequestError, match="k must lie in"):
        scorer.top_k(batch, k=NUM_ITEMS + 1)


@pytest.mark.parametrize("arch", RANKING)
def test_t4r_model_save_load_round_trip(arch, tmp_path):
    """tr.Model.save / tr.Model.load of a model over each request block gives the same probabilities."""
    tr = pytest.importorskip("transformers4rec.torch")
    from merlin_longseq.t4r import RequestBinaryClassificationTask, block_for

    spec = registry.get(arch)
    torch.manual_seed(0)
    cfg = spec.config_class(num_items=NUM_ITEMS, num_actions=NUM_ACTIONS, num_users=NUM_USERS, **spec.tiny)
    model = tr.Model(tr.Head(block_for(arch)(cfg.headless()), [RequestBinaryClassificationTask("click")]))
    batch = requests(lengths=(5, 0, 3), candidates=(2, 3, 1))

    def padded(values, offsets):
        from merlin_longseq.jagged import jagged_to_padded

        return jagged_to_padded(values, offsets, max(1, int((offsets[1:] - offsets[:-1]).max())))

    def inputs():  # fresh tensors: a T4R model may edit its input dict
        return {"hist_item_id": padded(batch.hist_item_ids, batch.hist_offsets),
                "hist_action": padded(batch.hist_actions, batch.hist_offsets),
                "hist_timestamp": padded(batch.hist_timestamps, batch.hist_offsets),
                "cand_item_id": padded(batch.cand_item_ids, batch.cand_offsets),
                "request_time": batch.request_time.clone(), "user_id": batch.user_ids.clone()}

    model.eval()
    with torch.no_grad():
        before = model(inputs())
    model.save(str(tmp_path))
    loaded = tr.Model.load(str(tmp_path)).eval()
    with torch.no_grad():
        after = loaded(inputs())
    assert type(loaded.heads[0].body).__name__ == spec.block
    torch.testing.assert_close(after, before)


def test_unknown_history_items_read_as_out_of_vocabulary_unknown_candidates_refused():
    """A new item in a history must not fail an active user's request; an unknown candidate cannot be scored."""
    import dataclasses

    model = ranking_model("stca")
    limits = dataclasses.replace(model.limits, unknown_item_ids=(1, 2))
    batch = requests()
    batch = dataclasses.replace(batch, hist_item_ids=batch.hist_item_ids.clamp(min=3),
                                cand_item_ids=batch.cand_item_ids.clamp(min=3))
    validate_request(batch, limits)
    history = batch.hist_item_ids.clone()
    history[0] = 2  # Categorify's out-of-vocabulary id
    validate_request(dataclasses.replace(batch, hist_item_ids=history), limits)
    with pytest.raises(RequestError, match="not in the model's vocabulary"):
        validate_request(dataclasses.replace(batch, hist_item_ids=history),
                         dataclasses.replace(limits, refuse_unknown_history=True))
    candidates = batch.cand_item_ids.clone()
    candidates[3] = 1
    with pytest.raises(RequestError, match=r"request 1: cand_item_ids\[0\] = 1 is not in the model's vocabulary"):
        validate_request(dataclasses.replace(batch, cand_item_ids=candidates), limits)


def test_inputs_checked_skips_only_the_models_own_checks():
    """A scorer validates a request on the host, then enters inputs_checked() so the model does not re-read it
    from the device; the contract itself (validate_request) is never skipped."""
    batch = requests()
    limits = dataclasses.replace(ranking_model("stca").limits, max_history=16)
    validate_request(batch, limits)  # the good batch passes
    bad = dataclasses.replace(batch, hist_item_ids=batch.hist_item_ids + 100)  # ids outside the vocabulary
    history = (bad.hist_item_ids, bad.hist_actions, bad.hist_timestamps, bad.hist_offsets, bad.request_time,
               bad.user_ids)
    with pytest.raises(RequestError, match="hist_item_ids"):
        check_history(limits, *history)
    with inputs_checked():
        check_history(limits, *history)  # trusted: no check, no read-back
        with pytest.raises(RequestError, match="hist_item_ids"):
            validate_request(bad, limits)
    with pytest.raises(RequestError, match="hist_item_ids"):  # and the context is left as found
        check_history(limits, *history)
