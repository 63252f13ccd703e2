"""The product path, end to end, on a real Triton server: NVTabular ETL -> tr.Model with our block ->
tr.Trainer -> export of THAT model -> tritonserver -> raw-id requests -> scores (and next-item top-k) equal to
the in-process ones.

Two walks share one server start: the README's own python blocks, executed as written (the whole-path
example exports STCA), and the same path for every registered ranking architecture plus a T4R next-item
model with HSTUBlock served with top-k.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from merlin_longseq import registry

pytestmark = pytest.mark.merlin
pytest.importorskip("nvtabular")
pytest.importorskip("merlin.systems")
pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")

README = Path(__file__).resolve().parents[1] / "README.md"
MAX_HISTORY = 64
TOP_K = 5


def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Run the README blocks, then train and export one model per architecture; serve them all."""
    work = tmp_path_factory.mktemp("e2e")
    cwd = os.getcwd()
    os.chdir(work)  # the README writes (and its workflow later reads) relative paths under ./run
    try:
        yield from _build_and_serve(work)
    finally:
        os.chdir(cwd)


def _build_and_serve(work):
    import merlin.io
    import nvtabular as nvt
    import transformers4rec.torch as tr

    from merlin_longseq import registry
    from merlin_longseq.data.synthetic import generate_events
    from merlin_longseq.serving.repository import export
    from merlin_longseq.serving.server import TritonServer
    from merlin_longseq.t4r import HSTUBlock, HSTUConfig, RequestBinaryClassificationTask, block_for
    from merlin_longseq.t4r.training import training_arguments
    from merlin_longseq.workflows.sequences import run_next_item_etl

    namespace: dict = {}
    for block in readme_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    readme_model, workflow = namespace["trainer"].model, namespace["workflow"]
    schema = merlin.io.Dataset(str(work / "run" / "train"), engine="parquet").schema
    repo = str(work / "repo")
    export(repo, workflow, readme_model, max_history=MAX_HISTORY, name="readme")

    models = {"readme": readme_model}
    for arch in registry.names(registry.RANKING):
        torch.manual_seed(0)
        block = block_for(arch).from_schema(schema, **registry.get(arch).tiny)  # the one changed line
        model = tr.Model(tr.Head(block, [RequestBinaryClassificationTask("click")]))
        trainer = tr.Trainer(model=model, args=training_arguments(str(work / arch), epochs=1, batch_size=16,
                                                                  progress=False),
                             schema=schema, train_dataset_or_path=str(work / "run" / "train"))
        trainer.train()
        export(repo, workflow, model, max_history=MAX_HISTORY, name=arch)
        models[arch] = model

    # next item: the T4R tutorial model with HSTUBlock, exported with top-k
    events = generate_events(num_users=24, num_items=60, num_topics=20, interests_per_user=4, min_history=6,
                             max_history=30)
    paths = run_next_item_etl(events, str(work / "seq"), max_seq_len=32)
    seq_schema = merlin.io.Dataset(paths["train"], engine="parquet").schema.select_by_name(
        ["item_id_seq", "timestamp_seq"])
    torch.manual_seed(0)
    inputs = tr.TabularSequenceFeatures.from_schema(seq_schema, max_sequence_length=32, masking="clm",
                                                    embedding_dim_default=16)
    body = tr.SequentialBlock(inputs, HSTUBlock(HSTUConfig.build(d_model=16, n_head=2, n_layer=1,
                                                                 total_seq_length=32), inputs=inputs))
    hstu = tr.Model(tr.Head(body, tr.NextItemPredictionTask(weight_tying=True), inputs=inputs))
    args = training_arguments(str(work / "hstu"), epochs=1, batch_size=8, progress=False,
                              data_loader_engine="merlin", max_sequence_length=32)
    tr.Trainer(model=hstu, args=args, schema=seq_schema, train_dataset_or_path=paths["train"]).train()
    seq_flow = nvt.Workflow.load(paths["workflow"])
    export(repo, seq_flow, hstu, top_k=TOP_K, name="hstu")
    models["hstu"] = hstu

    server = TritonServer(repo, exit_timeout_s=10, log_file=str(work / "triton.log"))
    server.start(timeout_s=300)
    try:
        yield dict(models=models, workflow=workflow, seq_flow=seq_flow, events=namespace["events"],
                   impressions=namespace["impressions"], seq_events=events, url=server.http_url,
                   grpc=server.grpc_url)
    finally:
        server.stop()
        server.close()


def _requests(world, count=3):
    """Raw requests (what a client sends) and the workflow's encoded rows of the same requests."""
    from merlin_longseq.jobs.serve_demo import encoded_requests, raw_requests

    impressions = world["impressions"]
    ids = sorted(int(r) for r in impressions["request_id"].unique())[-count:]  # late requests: long histories
    encoded = encoded_requests(world["workflow"], impressions, ids)
    return raw_requests(world["events"], impressions, ids, MAX_HISTORY), encoded


@pytest.mark.parametrize("name", ["readme", *registry.names(registry.RANKING)])
def test_served_ranking_scores_equal_the_trained_tr_model(world, name):
    from merlin_longseq.jobs.serve_demo import REQUEST_FEATURES, t4r_probabilities
    from merlin_longseq.serving.client import ScoringClient

    model = world["models"][name]
    raw, encoded = _requests(world)
    with ScoringClient(world["url"], model_name=name) as client:
        for request in raw:
            served = client.score(**{k: request[k] for k in REQUEST_FEATURES})["score_click"]
            expected = t4r_probabilities(model, encoded[request["request_id"]], ("click",))[:, 0]
            assert served.shape == expected.shape and served.size == request["cand_item_id"].size
            np.testing.assert_allclose(_sigmoid(served), expected, atol=1e-5)


def test_every_registered_ranking_architecture_is_on_the_path(world):
    assert set(registry.names(registry.RANKING)) <= set(world["models"])


def test_served_next_item_top_k_equals_the_trained_tr_model(world):
    import merlin.io
    import pandas as pd

    from merlin_longseq.serving.client import ScoringClient
    from merlin_longseq.serving.repository import item_vocabulary

    model, events = world["models"]["hstu"], world["seq_events"]
    vocabulary = item_vocabulary(world["seq_flow"])
    for user in (1, 2, 3):
        history = events[events.user_id == user].sort_values("timestamp", kind="stable").tail(32)
        encoded = world["seq_flow"].transform(merlin.io.Dataset(history.reset_index(drop=True))).to_ddf().compute()
        encoded = encoded.to_pandas() if not isinstance(encoded, pd.DataFrame) else encoded
        items = torch.as_tensor(encoded["item_id"].to_numpy(np.int64)).reshape(1, -1)
        times = torch.as_tensor(encoded["timestamp"].to_numpy(np.int64)).reshape(1, -1)
        model.eval()
        with torch.no_grad():
            scores = model({"item_id_seq": items.clone(), "timestamp_seq": times.clone()}).clone()
        scores[:, :3] = float("-inf")  # padding, null and out-of-vocabulary ids are never recommended
        best, ids = scores.topk(TOP_K, dim=1)
        with ScoringClient(world["url"], model_name="hstu") as client:
            served = client.score(hist_item_id=history["item_id"].to_numpy(np.int64),
                                  hist_timestamp=history["timestamp"].to_numpy(np.int64),
                                  cand_item_id=np.zeros(0, np.int64), user_id=np.int64(user))
        np.testing.assert_array_equal(served["topk_item_id"], vocabulary[ids[0].numpy()])
        np.testing.assert_allclose(served["topk_score"], best[0].numpy(), atol=1e-5)


def test_cli_export_of_a_saved_tr_model(world, tmp_path):
    """`merlin-longseq export MODEL_DIR WORKFLOW_DIR REPO`: the tr.Model.save folder of the trained model."""
    from merlin_longseq import cli
    from merlin_longseq.serving.repository import read_manifest

    world["models"]["stca"].save(str(tmp_path / "model"))
    world["workflow"].save(str(tmp_path / "workflow"))
    repo = tmp_path / "repo"
    assert cli.main(["export", str(tmp_path / "model"), str(tmp_path / "workflow"), str(repo), "--max-history",
                     str(MAX_HISTORY), "--name", "stca_cli", "--device", "cpu"]) == 0
    entry = read_manifest(str(repo))["models"]["stca_cli"]
    assert entry["arch"] == "stca" and entry["outputs"] == ["score_click"]
    assert cli.main(["export", str(tmp_path / "missing"), str(tmp_path / "workflow"), str(repo)]) == 2
