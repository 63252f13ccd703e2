"""Part 3 of the demo (jobs/serve_demo.py): the quick ranking job's trained STCA model is exported with the
job's fitted workflow, served by a REAL Triton server, queried with requests built from the raw eval logs.

The reference here is computed without serve_demo's helpers: the trained T4R model on the rows the RANKING
job's own ETL wrote (<ranking>/etl/eval), matched to the served requests by request id. One server start
(the STCA ensemble only, to keep the module near 40 s); LONGER's served form is checked in-process.
"""
from __future__ import annotations

import copy
import json
import socket
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.merlin
pytest.importorskip("nvtabular")

LABELS = ("click", "like")
NUM_REQUESTS = 4


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from merlin_longseq.jobs import ranking, serve_demo

    if serve_demo.serve_extra_missing():
        pytest.skip(f"serve extra: {serve_demo.serve_extra_missing()}")
    tmp = tmp_path_factory.mktemp("serve_demo")
    cfg = ranking.RankingJobConfig.quick(archs=("stca", "longer"), epochs=1)
    models, lines = {}, []
    ranking.run(str(tmp / "ranking"), cfg, log=lines.append, models_out=models)
    summary = serve_demo.run(str(tmp / "serving"), cfg, {"stca": models["stca"]},
                             str(tmp / "ranking" / "etl" / "workflow"), log=lines.append,
                             num_requests=NUM_REQUESTS, concurrency=2)
    return dict(cfg=cfg, tmp=tmp, models=models, summary=summary, lines=lines)


def _eval_rows(job) -> dict:
    """{request_id: row} of the eval split as the ranking job's ETL wrote it (workflow-encoded ids)."""
    import pandas as pd

    frame = pd.concat([pd.read_parquet(path) for path in sorted((job["tmp"] / "ranking" / "etl" / "eval")
                                                                   .glob("*.parquet"))], ignore_index=True)
    return {int(row["request_id"]): row for _, row in frame.iterrows()}


def _t4r_probabilities(model, row) -> np.ndarray:
    """[C, 2] probabilities of the trained T4R model on one request row (a padded batch of one)."""
    def batch(name):
        return torch.as_tensor(np.asarray(row[name], dtype=np.int64)).reshape(1, -1)
    inputs = {name: batch(name) for name in ("hist_item_id", "hist_action", "hist_timestamp", "cand_item_id")}
    inputs["request_time"] = torch.tensor([int(row["request_time"])])
    inputs["user_id"] = torch.tensor([int(row["user_id"])])
    model.eval()
    with torch.no_grad():
        out = model(inputs)
    return np.stack([out[next(k for k in out if k.split("/")[0] == label)][0].numpy() for label in LABELS], 1)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_served_scores_equal_the_trained_model(job):
    summary = job["summary"]
    assert summary is not None, job["lines"]
    entry = summary["models"]["stca"]
    assert entry["max_abs_diff_logits"] <= 1e-4 and entry["max_abs_diff_probabilities"] <= 1e-4
    rows = _eval_rows(job)
    served = summary["served_scores"]["stca"]
    assert len(served) == NUM_REQUESTS == len(summary["requests"]["request_ids"])
    worst = 0.0
    for request_id, logits in zip(summary["requests"]["request_ids"], served):
        expected = _t4r_probabilities(job["models"]["stca"], rows[request_id])
        assert logits.shape == expected.shape == (len(rows[request_id]["cand_item_id"]), 2)
        worst = max(worst, float(np.abs(_sigmoid(logits) - expected).max()))
    assert worst <= 1e-4
    # the comparison can fail: a slightly different model is far off on the same requests
    other = copy.deepcopy(job["models"]["stca"])
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    far = max(float(np.abs(_sigmoid(logits) - _t4r_probabilities(other, rows[r])).max())
              for r, logits in zip(summary["requests"]["request_ids"], served))
    assert far > 1e-3


def test_latency_json_and_report_are_written(job):
    run_dir = job["tmp"] / "serving"
    saved = json.loads((run_dir / "serving_latency.json").read_text())
    stats = saved["models"]["stca"]
    for mode in ("sequential", "concurrent_2"):
        assert stats[mode]["requests"] == NUM_REQUESTS
        assert 0 < stats[mode]["p50_ms"] <= stats[mode]["p99_ms"] <= stats[mode]["max_ms"]
        assert stats[mode]["requests_per_s"] > 0
    assert saved["requests"]["history_len_max"] <= job["cfg"].eval_max_history
    assert "served_scores" not in saved
    report = (run_dir / "report.md").read_text()
    assert "## Serving" in report and "| stca" in report and "p99 ms" in report
    assert (run_dir / "repo" / "merlin_longseq.json").exists()


def test_server_was_stopped_and_its_ports_are_free(job):
    summary = job["summary"]
    assert summary["server_exit_code"] == 0
    for port in summary["ports"].values():
        with socket.socket() as s:
            # SO_REUSEADDR: closed connections may linger in TIME_WAIT; on Linux bind still fails while any
            # socket LISTENS on the port, i.e. while the server would still hold it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(1)


def test_served_longer_form_scores_like_the_t4r_model(job):
    """servable folds the T4R task heads into a headed LONGERModel: sigmoid(its logits) = T4R's output."""
    from merlin_longseq.serving.repository import servable

    core, names = servable(job["models"]["longer"], LABELS)
    assert names == LABELS and core.cfg.num_tasks == 2
    for row in list(_eval_rows(job).values())[:3]:
        ids = {k: torch.as_tensor(np.asarray(row[k], dtype=np.int64)) for k in
               ("hist_item_id", "hist_action", "hist_timestamp", "cand_item_id")}
        with torch.no_grad():
            logits = core(ids["hist_item_id"], ids["hist_action"], ids["hist_timestamp"],
                          torch.tensor([0, ids["hist_item_id"].numel()]), torch.tensor([int(row["request_time"])]),
                          ids["cand_item_id"], torch.tensor([0, ids["cand_item_id"].numel()])).numpy()
        np.testing.assert_allclose(_sigmoid(logits), _t4r_probabilities(job["models"]["longer"], row), atol=1e-5)


def test_skips_with_one_line_without_the_serve_extra_or_a_servable_model(job, monkeypatch, tmp_path):
    from merlin_longseq.jobs import serve_demo

    workflow = str(job["tmp"] / "ranking" / "etl" / "workflow")
    lines = []
    assert serve_demo.run(str(tmp_path), job["cfg"], {"hstu": object()}, workflow, log=lines.append) is None
    monkeypatch.setitem(sys.modules, "pytriton", None)  # import pytriton now raises ImportError
    assert serve_demo.run(str(tmp_path), job["cfg"], job["models"], workflow, log=lines.append) is None
    assert len(lines) == 2 and all(line.startswith("part 3 skipped") for line in lines)
    assert "no servable model" in lines[0] and "pytriton" in lines[1]


def test_bad_input_is_refused(job):
    from merlin_longseq.jobs import serve_demo
    from merlin_longseq.serving.repository import servable

    with pytest.raises(ValueError, match="num_requests"):
        serve_demo.run("unused", job["cfg"], job["models"], "unused", num_requests=0)
    with pytest.raises(ValueError, match="Transformers4Rec model"):
        servable(torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match="no task for label"):
        servable(job["models"]["stca"], ("purchase",))


def test_cli_demo_runs_part_3_unless_no_serve(monkeypatch, tmp_path):
    """The wiring only (fakes for the jobs): part 3 gets part 2's models and fitted workflow; --no-serve skips."""
    from merlin_longseq import cli
    from merlin_longseq.jobs import ranking, serve_demo

    calls = []
    monkeypatch.setattr(ranking, "run", lambda run_dir, cfg, log=print, models_out=None: models_out.update(
        stca="trained"))
    monkeypatch.setattr(serve_demo, "run", lambda *args, **kwargs: calls.append(args))
    assert cli.main(["demo", "--quick", "--arch", "stca", "--out", str(tmp_path / "a")]) == 0
    assert len(calls) == 1
    run_dir, cfg, models, workflow = calls[0]
    assert run_dir == str(tmp_path / "a" / "serving") and models == {"stca": "trained"}
    assert workflow == str(tmp_path / "a" / "ranking" / "etl" / "workflow") and cfg.archs == ("stca",)
    assert cli.main(["demo", "--quick", "--arch", "stca", "--no-serve", "--out", str(tmp_path / "b")]) == 0
    assert len(calls) == 1
