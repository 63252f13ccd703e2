"""The model step alone behind Triton's dynamic batcher (serving/model_only.py): what the GPU machine serves.

In-process: requests merged by the batcher score exactly as one by one, a bad request is refused alone.
Real server (CPU, the nvidia-pytriton wheel): concurrent clients through ScoringClient get the in-process scores.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import urllib.request

import numpy as np
import pytest
import torch

from merlin_longseq.models.stca import STCAConfig, STCAModel
from merlin_longseq.request import RequestError
from merlin_longseq.serving.admission import RequestTooLarge
from merlin_longseq.serving.model_only import ModelOnlyScorer, export_model_only
from merlin_longseq.serving.scoring import make_scorer
from request_factory import random_requests

NUM_ITEMS, MAX_HISTORY = 50, 40


def _model():
    torch.manual_seed(0)
    return STCAModel(STCAConfig(num_items=NUM_ITEMS, num_users=9, d_model=16, n_heads=2, n_layers=1,
                                tasks=("click", "like"), mlp_dims=(16,), backend="pytorch")).eval()


def _wire(batch, r: int) -> dict:
    """Request r of a RequestBatch in the ensemble's wire format (flat arrays)."""
    one = batch.request(r)
    n, c = int(one.hist_offsets[-1]), int(one.cand_offsets[-1])
    offsets = lambda k: np.array([0, k], dtype=np.int32)  # noqa: E731
    return {"hist_item_id__values": one.hist_item_ids.numpy(), "hist_item_id__offsets": offsets(n),
            "hist_action__values": one.hist_actions.numpy(), "hist_action__offsets": offsets(n),
            "hist_timestamp__values": one.hist_timestamps.numpy(), "hist_timestamp__offsets": offsets(n),
            "cand_item_id__values": one.cand_item_ids.numpy(), "cand_item_id__offsets": offsets(c),
            "request_time": one.request_time.numpy(), "user_id": one.user_ids.numpy()}


def _requests(seed=0):
    return random_requests([7, 0, 33, 1, 12], [3, 2, 5, 1, 4], num_items=NUM_ITEMS, seed=seed, max_time=5_000,
                           request_times=[6_000 + r for r in range(5)], with_users=True)


def test_export_writes_a_batched_python_model(tmp_path):
    settings = export_model_only(str(tmp_path), _model(), name="stca", max_history=MAX_HISTORY, max_batch_size=8)
    config = (tmp_path / "stca" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 8" in config and "dynamic_batching" in config
    assert config.count("allow_ragged_batch: true") == 10  # 4 lists x (values, offsets) + 2 scalars
    assert "KIND_CPU" in config  # the default instance kind (the model itself may still run on CUDA)
    assert settings["outputs"] == ["score_click", "score_like"]
    saved = json.loads((tmp_path / "stca" / "1" / "model_only.json").read_text())
    assert set(saved["checksums"]) == {"merlin_longseq_model.json", "merlin_longseq_model.pt"}
    with pytest.raises(ValueError, match="max_history"):
        export_model_only(str(tmp_path / "other"), _model(), max_history=None)


def test_batched_requests_score_as_one_by_one_and_a_bad_one_is_refused_alone(tmp_path):
    model = _model()
    export_model_only(str(tmp_path), model, name="stca", max_history=MAX_HISTORY)
    core = ModelOnlyScorer(str(tmp_path / "stca" / "1"))
    batch = _requests()
    reference = make_scorer(model, max_history=MAX_HISTORY).score(batch).numpy()
    wires = [_wire(batch, r) for r in range(batch.num_requests)]
    bad = dict(wires[1], cand_item_id__values=np.array([3, NUM_ITEMS + 5]))  # an id the model does not know
    too_long = dict(wires[2], **{f"{c}__values": np.ones(MAX_HISTORY + 1, dtype=np.int64)
                                 for c in ("hist_item_id", "hist_action", "hist_timestamp")},
                    **{f"{c}__offsets": np.array([0, MAX_HISTORY + 1], dtype=np.int32)
                       for c in ("hist_item_id", "hist_action", "hist_timestamp")})
    results = core.score_requests([wires[0], bad, wires[2], too_long, wires[3], wires[4]])
    assert isinstance(results[1], RequestError) and "cand_item_ids" in str(results[1])
    assert isinstance(results[3], RequestTooLarge) and "history" in str(results[3])
    starts = batch.cand_offsets.tolist()
    for slot, r in ((0, 0), (2, 2), (4, 3), (5, 4)):
        for t, name in enumerate(("score_click__values", "score_like__values")):
            got = results[slot][name]
            assert got.shape == (1, starts[r + 1] - starts[r]) and got.dtype == np.float32
            np.testing.assert_allclose(got[0], reference[starts[r]:starts[r + 1], t], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_real_triton_server_with_dynamic_batching_answers_concurrent_clients_like_the_model(tmp_path):
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.http")
    from merlin_longseq.serving.client import ScoringClient, ScoringError
    from merlin_longseq.serving.server import TritonServer

    model = _model()
    export_model_only(str(tmp_path / "repo"), model, name="stca", max_history=MAX_HISTORY, device="cpu",
                      max_batch_size=8, max_queue_delay_us=20_000)
    batch = _requests(seed=3)
    reference = make_scorer(model, max_history=MAX_HISTORY).score(batch).numpy()
    starts = batch.cand_offsets.tolist()
    features = []
    for r in range(batch.num_requests):
        one = batch.request(r)
        features.append(dict(hist_item_id=one.hist_item_ids.numpy(), hist_action=one.hist_actions.numpy(),
                             hist_timestamp=one.hist_timestamps.numpy(), request_time=int(one.request_time[0]),
                             user_id=int(one.user_ids[0]), cand_item_id=one.cand_item_ids.numpy()))
    with TritonServer(str(tmp_path / "repo"), log_file=str(tmp_path / "server.log"), exit_timeout_s=10).start():
        pass  # started and stopped cleanly once
    server = TritonServer(str(tmp_path / "repo"), log_file=str(tmp_path / "server.log"), exit_timeout_s=10)
    with server.start():
        def score(r):
            with ScoringClient(server.http_url, model_name="stca") as client:
                return r, client.score(**features[r])

        # concurrent clients: the batcher (20 ms window) hands several requests to one execute
        with concurrent.futures.ThreadPoolExecutor(len(features)) as pool:
            answers = dict(pool.map(score, [r for r in range(len(features)) for _ in range(3)]))
        for r, out in answers.items():
            np.testing.assert_allclose(out["score_click"], reference[starts[r]:starts[r + 1], 0], rtol=1e-5,
                                       atol=1e-6)
            np.testing.assert_allclose(out["score_like"], reference[starts[r]:starts[r + 1], 1], rtol=1e-5,
                                       atol=1e-6)
        # Triton's own statistics: fewer model executions than requests = the batcher merged some
        stats = json.load(urllib.request.urlopen(f"http://{server.http_url}/v2/models/stca/stats", timeout=10))
        counts = stats["model_stats"][0]
        assert counts["inference_count"] == 15 and counts["execution_count"] < 15, counts
        with ScoringClient(server.http_url, model_name="stca") as client:
            with pytest.raises(ScoringError) as refused:
                client.score(**dict(features[0], cand_item_id=np.array([NUM_ITEMS + 1])))
        assert refused.value.status == "400" and "cand_item_ids" in str(refused.value)
    assert server.exited.is_set() and not server.unexpected_exit
    assert not os.path.exists(server.drain_file or "/nonexistent")
