"""The request-grouping workflow on a Dask LocalCluster of several worker processes gives the same rows as the
single-process run; requests split over partitions are caught; train_ddp's requests_from_logs (the operator
called directly on pandas frames, turned into a RequestBatch) equals the partitioned Dask ETL request by
request; the ETL output feeds train_ddp."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.merlin

nvt = pytest.importorskip("nvtabular")
distributed = pytest.importorskip("distributed")
from merlin.io import Dataset  # noqa: E402

from merlin_longseq.data.synthetic import SyntheticConfig, generate_impressions  # noqa: E402
from merlin_longseq.request import validate_request  # noqa: E402
from merlin_longseq.train_ddp import main as train_main, read_request_parquet, requests_from_logs  # noqa: E402
from merlin_longseq.workflows.distributed_etl import local_cluster, run_request_etl  # noqa: E402
from merlin_longseq.workflows.request_grouping import build_request_workflow, check_request_partitions  # noqa: E402

LABELS = ["click", "like"]
MAX_HISTORY = 25


@pytest.fixture(scope="module")
def logs():
    """Small synthetic logs plus the awkward cases: a duplicate impression (with flipped labels, the first row
    must win) and events exactly at a request's time (must stay out of its history)."""
    cfg = SyntheticConfig(num_users=30, num_items=300, num_topics=30, interests_per_user=4, min_history=10,
                          max_history=60, seed=3)
    events, impressions = generate_impressions(cfg, requests_per_user=3, candidates_per_request=6)
    impressions = impressions[["user_id", "request_id", "request_time", "item_id", *LABELS]]
    duplicate = impressions.iloc[[10]].copy()
    duplicate[LABELS] = 1 - duplicate[LABELS].to_numpy()
    impressions = pd.concat([impressions.iloc[:14], duplicate, impressions.iloc[14:]], ignore_index=True)
    at_request = impressions.groupby("request_id").head(1).iloc[::7]
    events = pd.concat([events, pd.DataFrame({
        "user_id": at_request["user_id"].to_numpy(), "item_id": np.full(len(at_request), 299),
        "timestamp": at_request["request_time"].to_numpy(), "action": np.full(len(at_request), 2)})],
        ignore_index=True)
    return events, impressions


def _by_request(frame) -> dict:
    """{request_id: {column: tuple or scalar}}: row order ignored, list contents compared exactly."""
    out = {}
    for row in frame.to_dict("records"):
        out[int(row["request_id"])] = {k: tuple(np.asarray(v).tolist()) if isinstance(v, (list, np.ndarray))
                                       else int(v) for k, v in row.items()}
    return out


def test_dask_cluster_matches_single_process(logs, tmp_path):
    events, impressions = logs
    single_wf = build_request_workflow(events, label_columns=LABELS, max_history=MAX_HISTORY,
                                       out_path=str(tmp_path / "single"))
    single_wf.fit(Dataset(impressions))
    single = single_wf.transform(Dataset(impressions)).to_ddf().compute()

    with local_cluster(n_workers=2, threads_per_worker=1) as client:
        with distributed.get_task_stream(client) as tasks:
            _, grouped = run_request_etl(impressions, events, label_columns=LABELS, max_history=MAX_HISTORY,
                                         npartitions=4, workflow_dir=str(tmp_path / "dask"),
                                         out_dir=str(tmp_path / "dask" / "grouped"))
        workers = {task["worker"] for task in tasks.data}
    assert len(workers) == 2, workers  # both worker processes did part of the work

    parts = Dataset(str(tmp_path / "dask" / "grouped"), engine="parquet").to_ddf()
    assert parts.npartitions >= 2
    multi = parts.compute()
    assert len(multi) == len(single) == impressions["request_id"].nunique()
    assert list(multi.columns) == list(single.columns)
    # every column, including the item ids encoded by the joint vocabulary fitted over all partitions
    assert _by_request(multi) == _by_request(single)


def test_split_requests_are_detected(logs):
    _, impressions = logs
    # row order interleaves requests, so a plain cut into partitions splits them
    shuffled = impressions.sample(frac=1.0, random_state=0).reset_index(drop=True)
    with pytest.raises(ValueError, match="partitions"):
        check_request_partitions(Dataset(shuffled, npartitions=3))
    check_request_partitions(Dataset(impressions.sort_values("request_id"), npartitions=1))
    with pytest.raises(ValueError, match="shuffle_by_keys"):  # the workflow itself refuses it at fit
        run_request_etl(shuffled, logs[0], label_columns=LABELS, max_history=5, partition=False, categorify=False,
                        npartitions=3)
    with pytest.raises(ValueError, match="workflow_dir"):
        run_request_etl(impressions, logs[0], label_columns=LABELS, max_history=5)


def test_requests_from_logs_match_the_dask_etl(logs):
    events, impressions = logs
    # the ETL path: partitioned by user into 3 Dask partitions, grouped by the workflow (raw item ids)
    _, grouped = run_request_etl(impressions, events, label_columns=LABELS, max_history=MAX_HISTORY,
                                 categorify=False, npartitions=3)
    frame = grouped.to_ddf().compute()
    expected = _by_request(frame)
    assert len(expected) == impressions["request_id"].nunique() == len(frame)
    # the training path: the operator on the whole pandas frames, turned into one RequestBatch
    data = requests_from_logs(events, impressions, MAX_HISTORY, LABELS)
    batch = data.batch
    validate_request(batch, data.limits)  # the at-request-time events stayed out, histories oldest first
    assert data.num_requests == len(expected) and data.label_names == tuple(LABELS)
    assert any(len(row["hist_item_id"]) == MAX_HISTORY for row in expected.values())  # the cap is exercised
    ho, co = batch.hist_offsets, batch.cand_offsets
    for r, request_id in enumerate(sorted(expected)):  # the operator emits requests in request-id order
        want = expected[request_id]
        h, c = slice(int(ho[r]), int(ho[r + 1])), slice(int(co[r]), int(co[r + 1]))
        assert int(batch.request_time[r]) == want["request_time"]
        assert int(batch.user_ids[r]) == want["user_id"]
        assert tuple(batch.hist_item_ids[h].tolist()) == want["hist_item_id"]
        assert tuple(batch.hist_timestamps[h].tolist()) == want["hist_timestamp"]
        assert tuple(batch.hist_actions[h].tolist()) == want["hist_action"]
        assert tuple(batch.cand_item_ids[c].tolist()) == want["cand_item_id"]
        for k, label in enumerate(LABELS):
            assert tuple(batch.labels[c, k].long().tolist()) == want[label]


def test_requests_from_logs_refuses_what_the_operator_refuses(logs):
    events, impressions = logs
    with pytest.raises(ValueError, match="max_history"):
        requests_from_logs(events, impressions, 0, LABELS)
    with pytest.raises(ValueError, match="missing column"):
        requests_from_logs(events, impressions.drop(columns=["like"]), MAX_HISTORY, LABELS)
    with pytest.raises(ValueError, match="label column"):
        requests_from_logs(events, impressions, MAX_HISTORY, [])


def test_etl_output_trains_with_train_ddp(logs, tmp_path):
    events, impressions = logs
    _, grouped = run_request_etl(impressions, events, label_columns=LABELS, max_history=MAX_HISTORY,
                                 npartitions=2, workflow_dir=str(tmp_path / "wf"), out_dir=str(tmp_path / "out"))
    data = read_request_parquet(str(tmp_path / "out"))
    assert data.label_names == tuple(LABELS) and data.num_requests == impressions["request_id"].nunique()
    summary_path = tmp_path / "summary.json"
    assert train_main(["--arch", "stca", "--data", str(tmp_path / "out"), "--device", "cpu", "--steps", "3",
                       "--warmup-steps", "1", "--batch-requests", "8", "--history-len", "0", "--threads", "1",
                       "--d-model", "16", "--out", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["data"]["requests"] == data.num_requests and np.isfinite(summary["losses"][-1][1])
