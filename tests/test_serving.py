"""Serving through a REAL Triton Inference Server (the nvidia-pytriton wheel's tritonserver, python backend).

One repository holds three ensembles (STCA, LONGER with the user-side cache, HSTU), each = the item
Categorify taken from a fitted training workflow + our PredictLongSeq step. One server, started through the
`merlin-longseq serve` CLI, serves the whole module; the last test stops it with SIGTERM while requests are
in flight. References are computed without the serving code: ids encoded by the TRAINING workflow, scores
by the model's own forward (STCA, LONGER) or its full-catalog next-item scores (HSTU).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.merlin
pytest.importorskip("nvtabular")
pytest.importorskip("merlin.systems")
pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")
pytest.importorskip("tritonclient.http")

from merlin.io import Dataset  # noqa: E402

from merlin_longseq.data.synthetic import generate_impressions  # noqa: E402
from merlin_longseq.models.hstu import HSTUConfig, HSTUNextItemModel  # noqa: E402
from merlin_longseq.models.longer import LONGERConfig, LONGERModel  # noqa: E402
from merlin_longseq.models.stca import STCAConfig, STCAModel  # noqa: E402
from merlin_longseq.serving.client import ScoringClient, ScoringError  # noqa: E402
from merlin_longseq.serving.repository import export  # noqa: E402
from merlin_longseq.serving.server import free_port  # noqa: E402
from merlin_longseq.workflows.request_grouping import build_request_workflow  # noqa: E402
from merlin_longseq.workflows.sequences import SequenceColumns, build_encode_workflow  # noqa: E402

MAX_HISTORY = 48
REQUEST_FEATURES = ("hist_item_id", "hist_action", "hist_timestamp", "cand_item_id", "request_time", "user_id")


def _jagged(lists):
    lengths = [len(x) for x in lists]
    values = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if lists else np.zeros(0, np.int64)
    return torch.from_numpy(values), torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, fitted workflows, three models, one repository and a server started by `merlin-longseq serve`."""
    tmp = tmp_path_factory.mktemp("serving")
    torch.manual_seed(0)
    events, impressions = generate_impressions(num_users=12, num_items=300, num_topics=30, min_history=20,
                                               max_history=40, requests_per_user=2, candidates_per_request=6)
    flow = build_request_workflow(events, label_columns=["click"], max_history=MAX_HISTORY,
                                  out_path=str(tmp / "cats"))
    flow.fit(Dataset(impressions))
    encoded = flow.transform(impressions).sort_values("request_id").reset_index(drop=True)
    raw_flow = build_request_workflow(events, label_columns=["click"], max_history=MAX_HISTORY, categorify=False)
    raw_flow.fit(Dataset(impressions))
    raw = raw_flow.transform(impressions).sort_values("request_id").reset_index(drop=True)
    num_items = flow.output_schema["cand_item_id"].properties["embedding_sizes"]["cardinality"] - 1
    num_users = int(events["user_id"].max())

    # HSTU trains on the next-item ETL (workflows/sequences.py): its item vocabulary is a plain item_id one
    seq_names = SequenceColumns()
    seq_flow = build_encode_workflow(seq_names, str(tmp / "seq_cats"))
    seq_flow.fit(Dataset(events))
    seq_items = seq_flow.output_schema["item_id"].properties["embedding_sizes"]["cardinality"] - 1

    models = {
        "stca": STCAModel(STCAConfig(num_items=num_items, num_users=num_users, d_model=16, n_heads=2,
                                     tasks=("click", "like"), mlp_dims=(16,))),
        "longer": LONGERModel(LONGERConfig(num_items=num_items, num_users=num_users, num_tasks=1, token_dim=8,
                                           merge_size=4, n_heads=2, num_recent_queries=3, head_hidden=16)),
        "hstu": HSTUNextItemModel(seq_items, HSTUConfig(d_model=16, n_heads=2, n_layers=2,
                                                        max_seq_len=MAX_HISTORY, dropout=0.0)),
    }
    for model in models.values():
        model.eval()
    repo = str(tmp / "repo")
    export(repo, flow, models["stca"], max_history=MAX_HISTORY, name="stca", device="cpu")
    export(repo, flow, models["longer"], max_history=MAX_HISTORY, name="longer", device="cpu", cache_entries=8)
    export(repo, seq_flow, models["hstu"], name="hstu", device="cpu")

    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    log = open(tmp / "serve.log", "w+")
    serve = subprocess.Popen(
        [sys.executable, "-m", "merlin_longseq.cli", "serve", repo, "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--exit-timeout", "20",
         "--log-file", str(tmp / "triton.log")], stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        log.seek(0)
        if "ready:" in log.read():
            break
        if serve.poll() is not None:
            log.seek(0)
            pytest.fail(f"merlin-longseq serve exited early:\n{log.read()}\n{open(tmp / 'triton.log').read()[-4000:]}")
        time.sleep(0.5)
    else:
        serve.kill()
        pytest.fail("server not ready in 240 s")
    info = dict(events=events, flow=flow, seq_flow=seq_flow, encoded=encoded, raw=raw, models=models,
                repo=repo, http=f"127.0.0.1:{http_port}", grpc=f"127.0.0.1:{grpc_port}", serve=serve, log=log,
                tmp=tmp)
    yield info
    if serve.poll() is None:  # a test failed before the shutdown test: stop cleanly, then insist
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    log.close()


def raw_request(world, i) -> dict:
    row = world["raw"].iloc[i]
    return {name: np.asarray(row[name]) for name in REQUEST_FEATURES}


def reference_logits(world, arch, i) -> np.ndarray:
    """The model's own forward on the TRAINING workflow's encoding of request i: [C, tasks]."""
    row = world["encoded"].iloc[i]
    hist, hist_offsets = _jagged([row["hist_item_id"]])
    cand, cand_offsets = _jagged([row["cand_item_id"]])
    with torch.no_grad():
        return world["models"][arch](
            hist, torch.as_tensor(np.asarray(row["hist_action"], dtype=np.int64)),
            torch.as_tensor(np.asarray(row["hist_timestamp"], dtype=np.int64)), hist_offsets,
            torch.tensor([int(row["request_time"])]), cand, cand_offsets,
            torch.tensor([int(row["user_id"])])).numpy()


def hstu_reference(world, request) -> np.ndarray:
    """HSTU's full-catalog next-item scores after the history, read at the candidates (encoded by the
    sequences workflow, as in training)."""
    import pandas as pd

    def encode(ids):
        frame = pd.DataFrame({"item_id": ids, "action": 1, "user_id": 1, "timestamp": 0})
        return torch.as_tensor(world["seq_flow"].transform(frame)["item_id"].to_numpy().astype(np.int64))

    hist, cand = encode(request["hist_item_id"]), encode(request["cand_item_id"])
    model = world["models"]["hstu"]
    with torch.no_grad():
        hidden = model(hist, torch.tensor([0, hist.numel()]))
        return model.item_scores(hidden[-1:])[0, cand].numpy()


# ---- served == in-process ----------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("arch", ["stca", "longer"])
def test_served_scores_equal_in_process(world, arch, protocol):
    url = world[protocol]
    with ScoringClient(url, protocol=protocol, model_name=arch) as client:
        for i in range(3):
            served = client.score(**raw_request(world, i))
            expected = reference_logits(world, arch, i)
            names = sorted(served)
            assert len(names) == expected.shape[1]
            for t, name in enumerate(names if arch == "longer" else ["score_click", "score_like"]):
                np.testing.assert_allclose(served[name], expected[:, t], atol=1e-5, rtol=0)


def test_served_hstu_equals_in_process(world):
    with ScoringClient(world["http"], model_name="hstu") as client:
        assert client.list_columns == ["cand_item_id", "hist_item_id"]
        known = set(world["events"]["item_id"].tolist())  # the next-item vocabulary: items of the event log
        for i in range(3):
            request = raw_request(world, i)
            request["cand_item_id"] = np.array([c for c in request["cand_item_id"] if c in known] + [
                int(request["hist_item_id"][0])])
            served = client.score(hist_item_id=request["hist_item_id"], cand_item_id=request["cand_item_id"],
                                  user_id=request["user_id"])
            np.testing.assert_allclose(served["score"], hstu_reference(world, request), atol=1e-5, rtol=0)


def test_cached_longer_equals_uncached_and_refreshes(world):
    """The LONGER ensemble caches user sides by user id: a repeat (hit), a changed history (refresh) and
    the original again must all give the uncached forward's scores."""
    with ScoringClient(world["http"], model_name="longer") as client:
        first = raw_request(world, 0)
        expected = reference_logits(world, "longer", 0)[:, 0]
        for _ in range(2):
            np.testing.assert_allclose(client.score(**first)["score"], expected, atol=1e-5, rtol=0)
        other = raw_request(world, 1)  # same user? force it: a different history under the same user id
        other["user_id"] = first["user_id"]
        served = client.score(**other)["score"]
        np.testing.assert_allclose(served, reference_logits_as_user(world, 1, int(first["user_id"])),
                                   atol=1e-5, rtol=0)
        np.testing.assert_allclose(client.score(**first)["score"], expected, atol=1e-5, rtol=0)


def reference_logits_as_user(world, i, user):
    row = world["encoded"].iloc[i]
    hist, hist_offsets = _jagged([row["hist_item_id"]])
    cand, cand_offsets = _jagged([row["cand_item_id"]])
    with torch.no_grad():
        return world["models"]["longer"](
            hist, torch.as_tensor(np.asarray(row["hist_action"], dtype=np.int64)),
            torch.as_tensor(np.asarray(row["hist_timestamp"], dtype=np.int64)), hist_offsets,
            torch.tensor([int(row["request_time"])]), cand, cand_offsets, torch.tensor([user])).numpy()[:, 0]


def test_query_cli(world):
    request = raw_request(world, 2)
    payload = json.dumps({k: np.asarray(v).tolist() for k, v in request.items()})
    out = subprocess.run([sys.executable, "-m", "merlin_longseq.cli", "query", world["grpc"], "--protocol", "grpc",
                          "--model", "stca", "--json", "-"], input=payload, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout)
    np.testing.assert_allclose(scores["score_click"], reference_logits(world, "stca", 2)[:, 0], atol=1e-5)


# ---- bad requests: a clear error, and the server keeps serving ------------------------------------------------
def _raw_tensor(client, name, array):
    tensor = client._tc.InferInput(name, list(array.shape), client_type(array))
    tensor.set_data_from_numpy(array)
    return tensor


def client_type(array):
    from tritonclient.utils import np_to_triton_dtype
    return np_to_triton_dtype(array.dtype)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_clear_errors(world, protocol):
    good = raw_request(world, 0)
    expected = reference_logits(world, "stca", 0)[:, 0]
    with ScoringClient(world[protocol], protocol=protocol, model_name="stca") as client:
        def fails(match, client_error=True, **features):
            with pytest.raises(ScoringError, match=match) as refused:
                client.score(strict_types=False, **features)
            # a client mistake: a client-error status and the reason, never a traceback or a server path
            assert "Traceback" not in str(refused.value) and "site-packages" not in str(refused.value)
            if client_error:
                assert refused.value.status in ("400", "StatusCode.INVALID_ARGUMENT"), refused.value.status
            # ... and the next good request is still answered correctly
            np.testing.assert_allclose(client.score(**good)["score_click"], expected, atol=1e-5)

        fails(r"data-type is 'FP32'.*expects 'INT64'", **{**good, "hist_item_id": good["hist_item_id"].astype(np.float32)})
        fails(r"zero candidates", **{**good, "cand_item_id": np.zeros(0, np.int64)})
        long_history = {k: np.resize(good[k], MAX_HISTORY + 1) for k in ("hist_item_id", "hist_action")}
        long_history["hist_timestamp"] = np.sort(np.resize(good["hist_timestamp"], MAX_HISTORY + 1))
        fails(r"more than the maximum 48", **{**good, **long_history})
        unknown = good["cand_item_id"].copy()
        unknown[1] = 10 ** 9
        fails(r"request 0: cand_item_ids\[1\] = \d+ is not in the model's vocabulary", **{**good, "cand_item_id": unknown})
        fails(r"(?i)expected \d+ inputs", **{k: v for k, v in good.items() if k != "hist_timestamp"})
        # wrong shape: a 2-D values tensor where the model declares [-1]
        inputs = client.build_inputs(good)
        inputs = [t for t in inputs if t.name() != "hist_item_id__values"]
        inputs.append(_raw_tensor(client, "hist_item_id__values", good["hist_item_id"].reshape(-1, 1)))
        with pytest.raises(ScoringError, match=r"(?i)shape|dims"):
            client.infer(inputs)
        np.testing.assert_allclose(client.score(**good)["score_click"], expected, atol=1e-5)


def test_client_refuses_missing_features(world):
    with ScoringClient(world["http"], model_name="stca") as client:
        with pytest.raises(ValueError, match="missing request feature"):
            client.score(hist_item_id=[1, 2], cand_item_id=[3])


# ---- bounded load test ---------------------------------------------------------------------------------------
def test_load_8_clients_x_200_requests(world):
    """8 concurrent clients x 200 requests each on loopback (HTTP): no errors, right scores; p50/p99 printed."""
    requests = [raw_request(world, i) for i in range(4)]
    expected = [reference_logits(world, "stca", i)[:, 0] for i in range(4)]
    latencies, errors = [], []
    lock = threading.Lock()

    def worker(k):
        with ScoringClient(world["http"], model_name="stca") as client:
            mine = []
            for j in range(200):
                i = (k + j) % 4
                start = time.perf_counter()
                try:
                    scores = client.score(**requests[i])["score_click"]
                    if not np.allclose(scores, expected[i], atol=1e-5):
                        raise AssertionError(f"wrong scores for request {i}")
                except Exception as err:  # collected, reported below
                    with lock:
                        errors.append(repr(err))
                mine.append(time.perf_counter() - start)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    print(f"\nload test: 8 clients x 200 requests, {len(ms)} done in {wall:.1f} s ({len(ms) / wall:.0f} req/s); "
          f"latency p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms")
    assert not errors, errors[:3]
    assert len(ms) == 1600


# ---- shutdown (last: stops the module's server) -----------------------------------------------------------------
def test_sigterm_lets_in_flight_requests_finish(world):
    """SIGTERM to `merlin-longseq serve` while 4 clients are sending: the request each has in flight at that
    moment completes with the right scores, the clients then hang up, the CLI exits 0 and Triton shuts down
    within its exit timeout (no forced exit)."""
    request, expected = raw_request(world, 0), reference_logits(world, "stca", 0)[:, 0]
    done, failed, wrong = [], [], []
    stop = threading.Event()
    started = threading.Barrier(5)

    def worker():
        with ScoringClient(world["http"], model_name="stca") as client:
            client.score(**request)
            started.wait()
            while not stop.is_set():  # the request in flight when stop is set still runs to its end
                try:
                    scores = client.score(**request)["score_click"]
                except Exception as err:  # collected, asserted below
                    failed.append(repr(err))
                    return
                (done if np.allclose(scores, expected, atol=1e-5) else wrong).append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.5)
    world["serve"].send_signal(signal.SIGTERM)
    sent = time.monotonic()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    code = world["serve"].wait(timeout=120)
    world["log"].seek(0)
    out = world["log"].read()
    triton_log = open(os.path.join(world["tmp"], "triton.log")).read()
    assert code == 0, out
    assert "stopped" in out
    assert not failed and not wrong, (failed, wrong)
    assert done and min(done) < sent
    assert "Exit timeout expired" not in triton_log
    assert "Waiting for in-flight requests to complete" in triton_log
