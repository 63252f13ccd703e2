"""RequestGrouping (NVTabular): impression log + event log -> one row per request, checked on hand-built logs
with known answers, against a brute-force reference, through Workflow save/load, and end to end with
build_request_workflow on synthetic data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.merlin

nvt = pytest.importorskip("nvtabular")
from merlin.io import Dataset  # noqa: E402
from merlin.schema import Tags  # noqa: E402

from merlin_longseq.extrapolation import BetaLengthSampler  # noqa: E402
from merlin_longseq.workflows.request_grouping import (  # noqa: E402
    RequestGrouping,
    build_request_workflow,
    check_request_partitions,
)

LIST_COLUMNS = ("hist_", "cand_")


# ---- helpers ----------------------------------------------------------------------------------------------
def group(events, impressions, label_columns=("click",), max_history=10, **kwargs):
    """Run RequestGrouping over every impression column through a fitted Workflow; pandas out."""
    workflow = nvt.Workflow(list(impressions.columns) >> RequestGrouping(
        events, label_columns=list(label_columns), max_history=max_history, **kwargs))
    workflow.fit(Dataset(impressions))
    return workflow.transform(impressions)


def as_python(frame) -> dict:
    """{request_id: {column: python value or list}} for exact comparisons."""
    records = {}
    for row in frame.to_dict("records"):
        records[int(row["request_id"])] = {
            k: [x.item() if hasattr(x, "item") else x for x in v] if isinstance(v, (np.ndarray, list)) else v
            for k, v in row.items()
        }
    return records


def reference(events, impressions, label_columns, max_history, event_features, candidate_features):
    """Brute force, row by row: the contract written as plainly as possible."""
    ordered_events = sorted(events.to_dict("records"), key=lambda e: e["timestamp"])  # stable: ties by row
    out = {}
    for row in impressions.to_dict("records"):
        request = out.setdefault(int(row["request_id"]), {
            "user_id": row["user_id"], "request_id": row["request_id"], "request_time": row["request_time"],
            "_seen": set(), "cand_item_id": [],
            **{f"cand_{f}": [] for f in candidate_features}, **{label: [] for label in label_columns},
        })
        if row["item_id"] in request["_seen"]:
            continue  # a duplicate impression: the first row wins
        request["_seen"].add(row["item_id"])
        request["cand_item_id"].append(row["item_id"])
        for f in candidate_features:
            request[f"cand_{f}"].append(row[f])
        for label in label_columns:
            request[label].append(row[label])
    for request in out.values():
        del request["_seen"]
        past = [e for e in ordered_events
                if e["user_id"] == request["user_id"] and e["timestamp"] < request["request_time"]]
        past = past[-max_history:] if past else []
        request["hist_item_id"] = [e["item_id"] for e in past]
        request["hist_timestamp"] = [e["timestamp"] for e in past]
        for f in event_features:
            request[f"hist_{f}"] = [e[f] for e in past]
    return out


def tags_of(schema, name) -> set:
    # compound tags (USER_ID = USER + ID, ...) are stored atomized; select_by_tag understands both
    return {tag for tag in Tags if name in schema.select_by_tag(tag).column_names}


@pytest.fixture
def events():
    # user 1: five events, two of them tied at t=20 (item 12 listed before 13); user 2: one event at t=5
    return pd.DataFrame({
        "user_id":   [1, 1, 1, 1, 1, 2],
        "item_id":   [11, 12, 13, 14, 15, 21],
        "timestamp": [10, 20, 20, 30, 40, 5],
        "action":    [1, 2, 3, 1, 2, 1],
    })


@pytest.fixture
def impressions():
    return pd.DataFrame({
        "user_id":      [1, 1, 1, 1, 1, 3, 2],
        "request_id":   [100, 100, 101, 101, 101, 102, 103],
        "request_time": [30, 30, 99, 99, 99, 7, 5],
        "item_id":      [50, 51, 52, 50, 53, 54, 55],
        "price":        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        "click":        [0, 1, 1, 0, 0, 0, 1],
        "like":         [0, 1, 0, 0, 1, 0, 0],
    })


# ---- histories --------------------------------------------------------------------------------------------
def test_histories_strictly_before_request_most_recent_last(events, impressions):
    out = as_python(group(events, impressions, label_columns=["click", "like"]))
    # request 100 at t=30: the event AT t=30 (item 14) is excluded
    assert out[100]["hist_item_id"] == [11, 12, 13]
    assert out[100]["hist_timestamp"] == [10, 20, 20]
    assert out[101]["hist_item_id"] == [11, 12, 13, 14, 15]
    assert out[101]["hist_action"] == [1, 2, 3, 1, 2]
    # request 103 of user 2 at t=5: its only event is at t=5, so nothing is strictly before
    assert out[103]["hist_item_id"] == [] and out[103]["hist_timestamp"] == []


def test_history_cap_keeps_most_recent(events, impressions):
    out = as_python(group(events, impressions, max_history=2))
    assert out[100]["hist_item_id"] == [12, 13]
    assert out[101]["hist_item_id"] == [14, 15]
    assert out[101]["hist_timestamp"] == [30, 40]


def test_user_without_events_gets_empty_history_and_still_appears(events, impressions):
    out = group(events, impressions)
    assert sorted(out["request_id"].tolist()) == [100, 101, 102, 103]
    row = as_python(out)[102]
    assert row["user_id"] == 3 and row["hist_item_id"] == [] and row["hist_action"] == []
    assert row["cand_item_id"] == [54]


def test_equal_timestamps_follow_event_log_row_order(events, impressions):
    out = as_python(group(events, impressions, max_history=1))
    assert out[100]["hist_item_id"] == [13]  # 12 and 13 tie at t=20; 13 is listed later, so it is "more recent"
    swapped = events.iloc[[0, 2, 1, 3, 4, 5]].reset_index(drop=True)
    out = as_python(group(swapped, impressions, max_history=3))
    assert out[100]["hist_item_id"] == [11, 13, 12]


def test_unsorted_input_gives_the_same_requests(events, impressions):
    expected = as_python(group(events, impressions))
    # ties (t=20) must keep their relative order in the shuffled event log for identical output
    shuffled_events = events.iloc[[5, 4, 1, 0, 2, 3]].reset_index(drop=True)
    shuffled_impressions = impressions.iloc[[6, 3, 1, 5, 0, 2, 4]].reset_index(drop=True)
    got = as_python(group(shuffled_events, shuffled_impressions))
    for request_id, row in expected.items():
        assert got[request_id]["hist_item_id"] == row["hist_item_id"]
        assert got[request_id]["hist_timestamp"] == row["hist_timestamp"]
        # candidates follow their row order in the impression log
        assert sorted(got[request_id]["cand_item_id"]) == sorted(row["cand_item_id"])
    assert got[101]["cand_item_id"] == [50, 52, 53]


def test_output_rows_sorted_by_request_and_candidates_in_log_order(events, impressions):
    out = group(events, impressions.iloc[::-1].reset_index(drop=True))
    assert out["request_id"].tolist() == [100, 101, 102, 103]
    assert as_python(out)[101]["cand_item_id"] == [53, 50, 52]


def test_duplicate_impressions_keep_first_row(events, impressions):
    duplicated = pd.concat([impressions, pd.DataFrame([{
        "user_id": 1, "request_id": 101, "request_time": 99, "item_id": 52, "price": 9.0, "click": 0, "like": 1,
    }])], ignore_index=True)
    out = as_python(group(events, duplicated, label_columns=["click", "like"]))
    assert out[101]["cand_item_id"] == [52, 50, 53]
    assert out[101]["cand_price"] == [3.0, 4.0, 5.0]  # the first row of item 52 (price 3.0), not 9.0
    assert out[101]["click"] == [1, 0, 0] and out[101]["like"] == [0, 0, 1]


def test_several_labels_and_features_line_up_with_candidates(events, impressions):
    out = group(events, impressions, label_columns=["click", "like"])
    rows = as_python(out)
    assert rows[100]["cand_item_id"] == [50, 51]
    assert rows[100]["cand_price"] == [1.0, 2.0]
    assert rows[100]["click"] == [0, 1] and rows[100]["like"] == [0, 1]
    for row in rows.values():
        n = len(row["cand_item_id"])
        assert n >= 1 and len(row["cand_price"]) == len(row["click"]) == len(row["like"]) == n
        assert len(row["hist_action"]) == len(row["hist_item_id"]) == len(row["hist_timestamp"])
    assert list(out.columns) == ["user_id", "request_id", "request_time", "hist_item_id", "hist_timestamp",
                                 "hist_action", "cand_item_id", "cand_price", "click", "like"]
    assert out["user_id"].dtype == np.int64 and out["request_time"].dtype == np.int64
    assert out["hist_item_id"].iloc[0].dtype == np.int64 and out["cand_price"].iloc[0].dtype == np.float64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_logs_match_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    n_events, n_requests = 300, 40
    events = pd.DataFrame({
        "user_id": rng.integers(0, 8, n_events),
        "item_id": rng.integers(0, 30, n_events),
        "timestamp": rng.integers(0, 60, n_events),  # small range: many ties and events at request times
        "dwell": rng.random(n_events),
    })
    rows = []
    for request_id in rng.permutation(n_requests):
        user, time = int(rng.integers(0, 10)), int(rng.integers(0, 70))  # users 8, 9 have no events
        for item in rng.integers(0, 30, int(rng.integers(1, 6))):  # repeats give duplicate impressions
            rows.append((user, int(request_id), time, int(item), int(rng.integers(0, 5)), int(rng.integers(0, 2))))
    impressions = pd.DataFrame(rows, columns=["user_id", "request_id", "request_time", "item_id", "slot", "click"])
    impressions = impressions.sample(frac=1.0, random_state=seed).reset_index(drop=True)

    got = as_python(group(events, impressions, max_history=7))
    expected = reference(events, impressions, ["click"], 7, ["dwell"], ["slot"])
    assert got.keys() == expected.keys()
    for request_id, row in expected.items():
        assert got[request_id] == row, request_id


# ---- errors -----------------------------------------------------------------------------------------------
def test_missing_impression_columns_are_named(events, impressions):
    with pytest.raises(ValueError, match="request_time"):
        group(events, impressions.drop(columns=["request_time"]))
    with pytest.raises(ValueError, match="like"):
        group(events, impressions.drop(columns=["like"]), label_columns=["click", "like"])


def test_missing_event_columns_are_named(events):
    with pytest.raises(ValueError, match="timestamp"):
        RequestGrouping(events.drop(columns=["timestamp"]), label_columns=["click"], max_history=4)
    with pytest.raises(ValueError, match="dwell"):
        RequestGrouping(events, label_columns=["click"], max_history=4, event_features=["dwell"])


def test_transform_names_missing_columns_of_the_frame(events, impressions):
    op = RequestGrouping(events, label_columns=["click"], max_history=4)
    from merlin.dag import ColumnSelector

    with pytest.raises(ValueError, match="item_id"):
        op.transform(ColumnSelector(list(impressions.columns)), impressions.drop(columns=["item_id"]))


def test_null_label_is_a_length_mismatch_error(events, impressions):
    broken = impressions.astype({"click": "float64"})
    broken.loc[3, "click"] = np.nan
    with pytest.raises(ValueError, match="click"):
        group(events, broken)


def test_request_with_two_users_or_times_is_an_error(events, impressions):
    broken = impressions.copy()
    broken.loc[1, "user_id"] = 2
    with pytest.raises(ValueError, match="request 100"):
        group(events, broken)
    broken = impressions.copy()
    broken.loc[1, "request_time"] = 31
    with pytest.raises(ValueError, match="request 100"):
        group(events, broken)


def test_datetime_times_work_and_must_match(events, impressions):
    base = pd.Timestamp("2024-01-01")
    dated_events = events.assign(timestamp=base + pd.to_timedelta(events["timestamp"], unit="s"))
    dated_impressions = impressions.assign(
        request_time=base + pd.to_timedelta(impressions["request_time"], unit="s"))
    out = as_python(group(dated_events, dated_impressions))
    assert out[100]["hist_item_id"] == [11, 12, 13]  # the event at the request time stays out
    assert out[100]["request_time"] == (base + pd.Timedelta(seconds=30)).value  # int64 nanoseconds
    with pytest.raises(TypeError, match="request_time"):
        group(events, dated_impressions)


def test_bad_arguments(events):
    with pytest.raises(ValueError, match="max_history"):
        RequestGrouping(events, label_columns=["click"], max_history=0)
    with pytest.raises(ValueError, match="hist_action|twice"):
        # an event feature 'action' and a label named 'hist_action' would collide
        RequestGrouping(events, label_columns=["hist_action"], max_history=3)
    with pytest.raises(TypeError, match="events"):
        RequestGrouping(42, label_columns=["click"], max_history=3)


def test_item_encoded_before_grouping_is_refused(events, impressions, tmp_path):
    encoded = ["item_id"] >> nvt.ops.Categorify(out_path=str(tmp_path))
    rest = ["user_id", "request_id", "request_time", "click"]
    workflow = nvt.Workflow((encoded + rest) >> RequestGrouping(events, label_columns=["click"], max_history=3))
    with pytest.raises(ValueError, match="item_id.*encoded"):
        workflow.fit(Dataset(impressions[rest + ["item_id"]]))


# ---- schema -----------------------------------------------------------------------------------------------
def test_output_schema_tags_dtypes_and_shapes(events, impressions):
    workflow = nvt.Workflow(list(impressions.columns) >> RequestGrouping(
        events, label_columns=["click", "like"], max_history=6))
    workflow.fit(Dataset(impressions))
    schema = workflow.output_schema
    assert schema.column_names == ["user_id", "request_id", "request_time", "hist_item_id", "hist_timestamp",
                                   "hist_action", "cand_item_id", "cand_price", "click", "like"]

    def tags(name):
        return tags_of(schema, name)

    assert {Tags.USER_ID, Tags.USER, Tags.CATEGORICAL} <= tags("user_id")
    assert schema.select_by_tag(Tags.USER_ID).column_names == ["user_id"]
    assert Tags.ID in tags("request_id") and Tags.CATEGORICAL not in tags("request_id")
    assert {Tags.ITEM_ID, Tags.ITEM, Tags.CATEGORICAL, Tags.LIST, Tags.SEQUENCE} <= tags("hist_item_id")
    assert {Tags.ITEM_ID, Tags.ITEM, Tags.CATEGORICAL, Tags.LIST} <= tags("cand_item_id")
    assert Tags.SEQUENCE not in tags("cand_item_id")
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["hist_item_id", "cand_item_id"]
    assert {Tags.LIST, Tags.SEQUENCE, Tags.CATEGORICAL} <= tags("hist_action")
    assert {Tags.LIST, Tags.CONTINUOUS} <= tags("cand_price")
    for label in ("click", "like"):
        assert {Tags.TARGET, Tags.BINARY_CLASSIFICATION, Tags.LIST} <= tags(label)
    assert schema.select_by_tag(Tags.TARGET).column_names == ["click", "like"]

    for name in ("user_id", "request_id", "request_time"):
        assert not schema[name].is_list and schema[name].dtype.to_numpy == np.int64
    for name in ("hist_item_id", "hist_timestamp", "hist_action", "cand_item_id", "cand_price", "click"):
        assert schema[name].is_list and schema[name].is_ragged, name
    for name in ("hist_item_id", "hist_timestamp", "hist_action"):
        assert schema[name].shape.dims[1].max == 6
        assert schema[name].properties["value_count"]["max"] == 6
    assert schema["cand_item_id"].shape.dims[1].min == 1
    assert schema["hist_item_id"].dtype.to_numpy == np.int64
    assert schema["cand_price"].dtype.to_numpy == np.float64
    assert schema["click"].dtype.to_numpy == np.int64


def test_integer_event_features_get_the_event_logs_int_domain(events, impressions):
    """The operator holds the whole event log, so it states the range of an integer event feature (what a
    request block sizes its action table from); float features and the raw user ids get none."""
    logged = events.assign(action=[1, 2, 7, 1, 2, 1], dwell=np.linspace(0.5, 3.0, 6))
    workflow = nvt.Workflow(list(impressions.columns) >> RequestGrouping(
        logged, label_columns=["click"], max_history=6))
    workflow.fit(Dataset(impressions))
    schema = workflow.output_schema
    assert schema["hist_action"].properties["domain"] == {"min": 1, "max": 7}
    assert schema["hist_action"].int_domain.max == 7
    assert "domain" not in schema["hist_dwell"].properties
    assert "domain" not in schema["user_id"].properties
    # no action column in the log: no hist_action column (the request blocks read every action as 0)
    bare = nvt.Workflow(list(impressions.columns) >> RequestGrouping(
        events.drop(columns=["action"]), label_columns=["click"], max_history=6))
    bare.fit(Dataset(impressions))
    assert [c for c in bare.output_schema.column_names if c.startswith("hist_")] == ["hist_item_id",
                                                                                   "hist_timestamp"]


def test_narrow_integer_ids_become_int64(events, impressions):
    narrow = impressions.astype({"user_id": "int32", "request_id": "int32", "item_id": "int16"})
    narrow_events = events.astype({"user_id": "int32", "item_id": "int16", "timestamp": "int32"})
    out = group(narrow_events, narrow)
    assert out["user_id"].dtype == np.int64 and out["request_id"].dtype == np.int64
    assert out["hist_item_id"].iloc[1].dtype == np.int64 and out["cand_item_id"].iloc[1].dtype == np.int64
    assert as_python(out) == as_python(group(events, impressions))


# ---- workflow persistence ---------------------------------------------------------------------------------
def test_workflow_save_load_round_trip(events, impressions, tmp_path):
    events_path = tmp_path / "events.parquet"
    events.to_parquet(events_path)
    workflow = nvt.Workflow(list(impressions.columns) >> RequestGrouping(
        str(events_path), label_columns=["click", "like"], max_history=3))
    workflow.fit(Dataset(impressions))
    before = workflow.transform(impressions)

    workflow.save(str(tmp_path / "workflow"))
    events_path.unlink()  # the events travel inside the saved workflow
    loaded = nvt.Workflow.load(str(tmp_path / "workflow"))
    after = loaded.transform(impressions)

    assert as_python(after) == as_python(before)
    assert list(after.columns) == list(before.columns)
    assert loaded.output_schema == workflow.output_schema


# ---- length extrapolation ---------------------------------------------------------------------------------
def sampler_logs(n_requests=60):
    events = pd.DataFrame({"user_id": 1, "item_id": np.arange(100, 140), "timestamp": np.arange(40) * 10})
    impressions = pd.DataFrame({
        "user_id": 1, "request_id": np.arange(n_requests),
        "request_time": np.linspace(5, 400, n_requests).astype(np.int64), "item_id": 7, "click": 1,
    })
    return events, impressions


def test_length_sampler_only_shortens_and_keeps_the_most_recent():
    events, impressions = sampler_logs()
    full = as_python(group(events, impressions, max_history=30))
    sampler = BetaLengthSampler(max_train_len=12, min_len=1)
    sampled = as_python(group(events, impressions, max_history=30, length_sampler=sampler, seed=3))
    shorter = 0
    for request_id, row in full.items():
        hist, cut = row["hist_item_id"], sampled[request_id]["hist_item_id"]
        assert len(cut) <= min(len(hist), 12)
        assert cut == hist[len(hist) - len(cut):]  # a suffix: the most recent events
        assert sampled[request_id]["hist_timestamp"] == row["hist_timestamp"][len(hist) - len(cut):]
        assert (len(cut) >= 1) == (len(hist) >= 1)  # min_len=1 keeps non-empty histories non-empty
        shorter += len(cut) < len(hist)
    assert shorter > len(full) // 2


def test_length_sampler_is_deterministic_for_a_seed():
    events, impressions = sampler_logs()
    sampler = BetaLengthSampler(max_train_len=12)

    def lengths(seed):
        out = group(events, impressions, max_history=30, length_sampler=sampler, seed=seed)
        return [len(h) for h in out["hist_item_id"]]

    assert lengths(5) == lengths(5)
    assert lengths(5) != lengths(6)
    # off by default: the full capped history
    plain = group(events, impressions, max_history=30)
    assert max(len(h) for h in plain["hist_item_id"]) == 30


# ---- build_request_workflow end to end ----------------------------------------------------------------------
@pytest.fixture
def synthetic(tmp_path):
    from merlin_longseq.data.synthetic import generate_impressions

    events, impressions = generate_impressions(num_users=20, min_history=20, max_history=80,
                                               requests_per_user=3, candidates_per_request=8)
    path = tmp_path / "impressions.parquet"
    impressions.to_parquet(path)
    return events, impressions, path


def run_to_parquet(workflow, dataset, out_dir):
    workflow.fit(dataset)
    workflow.transform(dataset).to_parquet(output_path=str(out_dir))
    back = Dataset(str(out_dir), engine="parquet")
    return back, back.to_ddf().compute().sort_values("request_id").reset_index(drop=True)


def test_build_request_workflow_end_to_end(synthetic, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written to the working directory lands in tmp_path
    events, impressions, path = synthetic
    raw_flow = build_request_workflow(events, label_columns=["click", "like"], max_history=32, categorify=False)
    _, raw = run_to_parquet(raw_flow, Dataset(str(path), engine="parquet"), tmp_path / "raw")
    flow = build_request_workflow(events, label_columns=["click", "like"], max_history=32,
                                  out_path=str(tmp_path / "cats"))
    back, encoded = run_to_parquet(flow, Dataset(str(path), engine="parquet"), tmp_path / "encoded")

    n_requests = impressions["request_id"].nunique()
    assert len(raw) == len(encoded) == n_requests
    assert raw["request_id"].tolist() == encoded["request_id"].tolist()
    contract = ["user_id", "request_id", "request_time", "hist_item_id", "hist_timestamp", "hist_action",
                "cand_item_id", "click", "like"]
    assert list(encoded.columns) == list(raw.columns) == contract
    assert encoded["request_id"].dtype == np.int64

    # one id space: a raw item gets one code, in histories and among candidates alike, and codes differ
    codes = {}
    for column in ("hist_item_id", "cand_item_id"):
        for raw_row, code_row in zip(raw[column], encoded[column]):
            assert len(raw_row) == len(code_row)
            for item, code in zip(raw_row, code_row):
                assert codes.setdefault(int(item), int(code)) == int(code)
    assert len(set(codes.values())) == len(codes)
    assert min(codes.values()) >= 3  # 0 pad, 1 null, 2 out-of-vocabulary are reserved by Categorify

    # history and candidate contracts hold on the data read back
    for _, row in raw.iterrows():
        assert len(row["hist_item_id"]) <= 32
        assert all(t < row["request_time"] for t in row["hist_timestamp"])
        assert list(row["hist_timestamp"]) == sorted(row["hist_timestamp"])
        assert len(row["cand_item_id"]) == len(row["click"]) == len(row["like"]) >= 1
    some_user = events[events["user_id"] == raw["user_id"].iloc[0]]
    expected = some_user[some_user["timestamp"] < raw["request_time"].iloc[0]]["item_id"].tolist()[-32:]
    assert list(raw["hist_item_id"].iloc[0]) == expected

    schema = back.schema
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["hist_item_id", "cand_item_id"]
    assert {Tags.CATEGORICAL, Tags.SEQUENCE, Tags.LIST} <= tags_of(schema, "hist_item_id")
    assert {Tags.CATEGORICAL, Tags.LIST} <= tags_of(schema, "cand_item_id")
    assert schema["hist_item_id"].properties["domain"] == schema["cand_item_id"].properties["domain"]
    assert schema["hist_item_id"].value_count.max == 32
    assert sorted(schema.select_by_tag(Tags.BINARY_CLASSIFICATION).column_names) == ["click", "like"]
    assert (tmp_path / "cats" / "categories").is_dir()

    # the encoding workflow survives save/load: same codes on a second transform
    flow.save(str(tmp_path / "saved"))
    loaded = nvt.Workflow.load(str(tmp_path / "saved"))
    again = loaded.transform(Dataset(str(path), engine="parquet")).to_ddf().compute()
    assert as_python(again) == as_python(encoded)


def test_build_request_workflow_needs_out_path_to_categorify(events):
    with pytest.raises(ValueError, match="out_path"):
        build_request_workflow(events, label_columns=["click"], max_history=4)


def test_partitions_shuffled_by_request_give_the_same_rows(synthetic, tmp_path):
    events, impressions, _ = synthetic
    flow = build_request_workflow(events, label_columns=["click"], max_history=16, categorify=False)
    single = Dataset(impressions)
    flow.fit(single)
    expected = as_python(flow.transform(single).to_ddf().compute())
    split = Dataset(impressions, npartitions=3).shuffle_by_keys(["request_id"])
    got = as_python(flow.transform(split).to_ddf().compute())
    assert got == expected


def test_float_times_and_ids_beyond_int64_are_refused():
    """A float time could move an event across its request time; a uint64 id above int64 would wrap negative."""
    import numpy as np
    import pandas as pd
    from merlin.dag import ColumnSelector

    events = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 7], "timestamp": [10, 20, 30]})
    impressions = pd.DataFrame({"user_id": [1, 2], "request_id": [10, 11], "request_time": [50, 60],
                                "item_id": [5, 7], "click": [1, 0]})
    op = RequestGrouping(events, label_columns=["click"], max_history=8)
    columns = ColumnSelector(list(impressions.columns))
    with pytest.raises(TypeError, match="never floats"):
        op.transform(columns, impressions.assign(request_time=impressions["request_time"].astype(float)))
    with pytest.raises(TypeError, match="never floats"):
        RequestGrouping(events.assign(timestamp=events["timestamp"].astype(float)), label_columns=["click"],
                        max_history=8)
    huge = impressions.assign(item_id=np.array([5, 2 ** 63 + 5], dtype=np.uint64))
    with pytest.raises(ValueError, match="above the int64 maximum"):
        op.transform(columns, huge)
    fine = op.transform(columns, impressions.assign(item_id=impressions["item_id"].astype(np.uint64)))
    assert fine["cand_item_id"].tolist() == [[5], [7]]


# ---- empty histories everywhere -------------------------------------------------------------------------------
def in_partitions(*frames):
    """A merlin Dataset whose partitions are exactly these frames, in this order."""
    import dask.dataframe as dd

    return Dataset(dd.concat([dd.from_pandas(f.reset_index(drop=True), npartitions=1, sort=False) for f in frames]))


def new_users_day(impressions):
    """The impressions again, as other requests of users with no event at all."""
    return impressions.assign(user_id=impressions["user_id"] + 1000, request_id=impressions["request_id"] + 1000)


def dtypes_of(schema) -> dict:
    return {name: schema[name].dtype for name in schema.column_names}  # DType holds the list shape too


@pytest.mark.parametrize("cause", ["new_users", "empty_event_log"])
def test_all_empty_histories_fit_and_keep_the_usual_dtypes(events, impressions, cause):
    """Every history of the dataset empty: merlin's dtype capture in Workflow.fit found no value to read a dtype
    from (TypeError); fit and transform must work and give typed empty lists and the usual schema."""
    log, day = (events, new_users_day(impressions)) if cause == "new_users" else (events.iloc[:0], impressions)
    workflow = nvt.Workflow(list(day.columns) >> RequestGrouping(log, label_columns=["click"], max_history=5))
    workflow.fit(Dataset(day))
    out = workflow.transform(Dataset(day)).to_ddf().compute()

    assert sorted(out["request_id"]) == sorted(day["request_id"].unique())
    for name in ("hist_item_id", "hist_timestamp", "hist_action"):
        assert all(len(row) == 0 and row.dtype == np.int64 for row in out[name]), name
    assert [len(row) for row in out.sort_values("request_id")["cand_item_id"]] == [2, 3, 1, 1]
    usual = nvt.Workflow(list(impressions.columns) >> RequestGrouping(events, label_columns=["click"],
                                                                      max_history=5))
    usual.fit(Dataset(impressions))
    assert dtypes_of(workflow.output_schema) == dtypes_of(usual.output_schema)


@pytest.mark.parametrize("empty_partition", [0, 1])
def test_one_partition_of_new_users_among_others(events, impressions, tmp_path, empty_partition):
    """merlin.io.Dataset(df, npartitions=2) with one partition whose histories are all empty, through the jobs'
    workflow (joint Categorify: its fit transforms every partition), equals the one-partition run."""
    frames = [impressions, new_users_day(impressions)]
    if empty_partition == 0:
        frames.reverse()
    whole = pd.concat(frames, ignore_index=True)
    dataset = Dataset(whole, npartitions=2)
    parts = [dataset.to_ddf().partitions[i].compute() for i in range(2)]
    assert (parts[empty_partition]["user_id"] >= 1000).all() and (parts[1 - empty_partition]["user_id"] < 1000).all()

    flow = build_request_workflow(events, label_columns=["click"], max_history=5, out_path=str(tmp_path / "split"))
    flow.fit(dataset)
    flow.transform(dataset).to_parquet(output_path=str(tmp_path / "out"))
    got = Dataset(str(tmp_path / "out"), engine="parquet").to_ddf().compute()
    single = build_request_workflow(events, label_columns=["click"], max_history=5, out_path=str(tmp_path / "one"))
    single.fit(Dataset(whole))
    expected = single.transform(Dataset(whole)).to_ddf().compute()

    assert as_python(got) == as_python(expected)
    assert all(len(row) == 0 for row in got[got["user_id"] >= 1000]["hist_item_id"])
    assert dtypes_of(flow.output_schema) == dtypes_of(single.output_schema)
    # every written file, the all-empty partition's too, stores the lists as lists of int64
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((tmp_path / "out").glob("*.parquet"))
    assert len(files) == 2
    for path in files:
        for name in ("hist_item_id", "hist_timestamp", "hist_action"):
            assert pq.read_schema(path).field(name).type.value_type == pa.int64(), (path.name, name)


# ---- requests and partitions --------------------------------------------------------------------------------
def test_request_split_over_partitions_is_refused_at_fit(events, impressions, tmp_path):
    # request 101 has three rows: two in the first partition, one in the second
    split = in_partitions(impressions.iloc[:4], impressions.iloc[4:])
    workflow = nvt.Workflow(list(impressions.columns) >> RequestGrouping(events, label_columns=["click"],
                                                                         max_history=4))
    with pytest.raises(ValueError, match=r"request_id 101 has rows in 2 partitions.*shuffle_by_keys"):
        workflow.fit(split)
    flow = build_request_workflow(events, label_columns=["click"], max_history=4, out_path=str(tmp_path))
    with pytest.raises(ValueError, match="request_id 101 has rows in 2 partitions"):
        flow.fit(split)


def test_request_split_is_refused_when_transforming_a_dataset_never_fitted_on(events, impressions, tmp_path):
    flow = build_request_workflow(events, label_columns=["click"], max_history=4, categorify=False)
    flow.fit(Dataset(impressions))
    split = in_partitions(impressions.iloc[:4], impressions.iloc[4:])
    with pytest.raises(ValueError, match="request_id 101 has rows in 2 partitions"):
        flow.transform(split)
    flow.save(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="request_id 101"):
        nvt.Workflow.load(str(tmp_path / "saved")).transform(split)
    # the helper for plain workflows: the first split request by id, and how many more
    with pytest.raises(ValueError, match=r"request_id 100 has rows in 2 partitions \(and 1 more"):
        check_request_partitions(in_partitions(impressions.iloc[:1], impressions.iloc[1:3], impressions.iloc[3:]))
    check_request_partitions(Dataset(impressions))  # one partition: nothing can be split
    check_request_partitions(in_partitions(impressions.iloc[:2], impressions.iloc[2:5], impressions.iloc[5:]))


@pytest.mark.parametrize("categorify", [False, True])
def test_whole_requests_over_partitions_give_the_single_partition_rows(synthetic, tmp_path, categorify):
    events, impressions, _ = synthetic
    # three partitions, each request whole in one of them, rows in log order
    frames = [impressions[impressions["request_id"] % 3 == k] for k in range(3)]
    assert all(len(frame) for frame in frames)

    def run(dataset, name):
        flow = build_request_workflow(events, label_columns=["click", "like"], max_history=16, categorify=categorify,
                                      out_path=str(tmp_path / name))
        flow.fit(dataset)
        return as_python(flow.transform(dataset).to_ddf().compute())

    expected = run(Dataset(impressions), "single")
    got = run(in_partitions(*frames), "three")
    assert got == expected and len(got) == impressions["request_id"].nunique()


def test_request_and_event_times_must_be_of_one_kind(events, impressions):
    """Both integers (any width: both become int64) or both datetime64; a mix, floats or booleans are refused."""
    from merlin.dag import ColumnSelector

    columns = ColumnSelector(list(impressions.columns))
    dated = events.assign(timestamp=pd.Timestamp("2024-01-01") + pd.to_timedelta(events["timestamp"], unit="s"))
    with pytest.raises(TypeError, match="request_time.*datetime64"):
        RequestGrouping(dated, label_columns=["click"], max_history=4).transform(columns, impressions)
    op = RequestGrouping(events, label_columns=["click"], max_history=4)
    with pytest.raises(TypeError, match="request_time"):
        op.transform(columns, impressions.assign(request_time=impressions["request_time"] > 50))
    with pytest.raises(TypeError, match="timestamp"):
        RequestGrouping(events.assign(timestamp=events["timestamp"] > 20), label_columns=["click"], max_history=4)
    narrow = group(events.astype({"timestamp": "int16"}), impressions.astype({"request_time": "uint32"}))
    assert narrow["request_time"].dtype == np.int64
    assert as_python(narrow) == as_python(group(events, impressions))
