"""Taobao request ranking: the reader and the request definition on a hand-made CSV (Beijing days, labels, noise
rows, the leakage rule, error messages), the item_token (category) grouping, the job's config, a --quick run on a
synthetic CSV, and checks on the real 814-user head (skipped when ../shared/data is absent: the data is
research-only and never copied into the repository)."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taobao_fixture import DAY, FIRST_DAY, write_taobao_csv

pytestmark = pytest.mark.merlin

tb = pytest.importorskip("merlin_longseq.workflows.taobao")
job = pytest.importorskip("merlin_longseq.jobs.request_ranking")

D0 = FIRST_DAY  # 2017-11-25 00:00 Beijing = 2017-11-24 16:00 UTC
# user, item, category, behaviour, time; the comment says why the row is there
ROWS = [
    (1, 10, 100, "pv", D0 + 3600),            # 25th: candidate 10
    (1, 11, 101, "pv", D0 + 7200),            # 25th: candidate 11 ...
    (1, 11, 101, "cart", D0 + 7300),          # ... carted that day: positive
    (1, 12, 102, "cart", D0 + 8000),          # a cart without a view: no candidate (history only)
    (1, 10, 100, "pv", D0 + DAY - 1800),      # 23:30 Beijing on the 25th (15:30 UTC): candidate 10 again, one row
    (1, 14, 102, "fav", D0 + DAY + 100),      # 26th: the day's first event, before its view: positive
    (1, 14, 102, "pv", D0 + DAY + 200),
    (1, 13, 101, "pv", D0 + DAY + 1800),      # 00:30 Beijing on the 26th, the same UTC day as the 23:30 row
    (1, 10, 100, "pv", D0 + DAY + 3000),      # 26th: viewed ...
    (1, 10, 100, "buy", D0 + DAY + 3600),     # ... and bought: positive on the 26th only
    (1, 15, 103, "pv", D0 + 2 * DAY + 5000),  # 27th
    (2, 20, 200, "pv", 1505089000),           # 2017-09-11: noise, dropped
    (2, 21, 201, "pv", D0 + 3 * DAY + 10),    # 28th: candidate 21, viewed twice
    (2, 22, 201, "pv", D0 + 3 * DAY + 20),
    (2, 21, 201, "pv", D0 + 3 * DAY + 30),
    (2, 22, 201, "buy", D0 + 3 * DAY + 40),
    (2, 23, 202, "cart", D0 + 4 * DAY + 50),  # 29th: no view, no request
    (2, 24, 203, "pv", D0 + 5 * DAY + 60),    # 30th
    (2, 25, 204, "pv", D0 + 9 * DAY + 10),    # 2017-12-04 00:00:10 Beijing: after the window, dropped
]


def _write(path, rows=ROWS):
    path.write_text("".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


@pytest.fixture
def events(tmp_path):
    return tb.read_taobao(_write(tmp_path / "UserBehavior.csv"))


# ---------------------------------------------------------------------------------------------------- reader
def test_reader_types_actions_beijing_days_and_noise(events, tmp_path):
    assert list(events.columns) == ["user_id", "item_id", "category_id", "timestamp", "behavior", "action", "day"]
    assert len(events) == len(ROWS) - 2  # the two rows outside 2017-11-25 .. 12-03 (Beijing) are gone
    assert 20 not in events.item_id.values and 25 not in events.item_id.values
    assert events.groupby("user_id").timestamp.apply(lambda t: t.is_monotonic_increasing).all()
    assert dict(zip(events.behavior, events.action)) == {"pv": 1, "cart": 2, "fav": 3, "buy": 4}
    first = pd.Timestamp("2017-11-25").toordinal() - pd.Timestamp("1970-01-01").toordinal()
    day_of = dict(zip(events.timestamp, events.day - first))
    assert day_of[D0 + DAY - 1800] == 0 and day_of[D0 + DAY + 1800] == 1  # one UTC day, two Beijing days
    assert (D0 + DAY - 1800) // DAY == (D0 + DAY + 1800) // DAY
    kept = tb.read_taobao(tmp_path / "UserBehavior.csv", window=None)
    assert len(kept) == len(ROWS)
    assert len(tb.read_taobao(tmp_path)) == len(events)  # a folder holding one .csv


def test_reader_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no Taobao UserBehavior file.*{tb.ENV_TAOBAO}"):
        tb.read_taobao(tmp_path / "missing.csv")
    cases = {
        "four_fields.csv": ("1,2,3,1511539300\n", "expected 5 comma-separated fields"),
        "header.csv": ("user_id,item_id,category_id,behavior_type,timestamp\n1,2,3,pv,1511539300\n",
                       "line 1 .*no header"),
        "text_id.csv": ("1,2,3,pv,1511539300\n1,x,3,pv,1511539400\n", "line 2 has a missing or non-numeric"),
        "behaviour.csv": ("1,2,3,pv,1511539300\n1,2,3,click,1511539400\n", r"unknown behavior_type \['click'\]"),
        "empty.csv": ("", "empty"),
        "outside.csv": ("1,2,3,pv,1505089000\n", "no event inside the window"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            tb.read_taobao(tmp_path / name)


# ---------------------------------------------------------------------------------------------------- requests
def test_day_requests_candidates_and_labels(events):
    requests = tb.daily_requests(events)
    got = {rid: (frame.user_id.iloc[0], frame.request_time.iloc[0], frame.item_id.tolist(), frame.positive.tolist(),
                 frame.category_id.tolist())
           for rid, frame in requests.groupby("request_id")}
    assert got == {
        0: (1, D0 + 3600, [10, 11], [0, 1], [100, 101]),  # 10 once although viewed twice; 12 (cart only) absent
        1: (1, D0 + DAY + 100, [14, 13, 10], [1, 0, 1], [102, 101, 100]),  # first-view order; time = the fav
        2: (1, D0 + 2 * DAY + 5000, [15], [0], [103]),
        3: (2, D0 + 3 * DAY + 10, [21, 22], [0, 1], [201, 201]),
        4: (2, D0 + 5 * DAY + 60, [24], [0], [203]),  # the 29th (a cart only) makes no request
    }
    with pytest.raises(ValueError, match="missing column"):
        tb.daily_requests(events.drop(columns="behavior"))


def _grouped(events, columns=("user_id", "item_id", "timestamp", "action", "category_id"), **options):
    import merlin.io

    from merlin_longseq.workflows.request_grouping import build_request_workflow

    workflow = build_request_workflow(events[list(columns)], label_columns=["positive"], max_history=50,
                                      categorify=False, **options)
    out = workflow.fit_transform(merlin.io.Dataset(tb.daily_requests(events))).to_ddf().compute()
    return out.set_index("request_id")


def test_history_leakage_rule_nothing_of_the_day(events):
    out = _grouped(events, event_features=["action"])
    day_of = dict(zip(events.timestamp, events.day))
    for rid, row in out.iterrows():
        request_day = day_of[row.request_time]
        assert all(day_of[t] < request_day for t in row.hist_timestamp)  # nothing of the request's own day
        mine = events[(events.user_id == row.user_id) & (events.day < request_day)]
        assert list(row.hist_item_id) == mine.item_id.tolist()  # ... and every earlier event, in time order
        assert list(row.hist_action) == mine.action.tolist()
    assert list(out.loc[1, "hist_item_id"]) == [10, 11, 11, 12, 10]  # the 23:30 view is the 25th's
    assert list(out.loc[1, "hist_action"]) == [1, 1, 2, 2, 1]
    assert len(out.loc[0, "hist_item_id"]) == 0 and len(out.loc[3, "hist_item_id"]) == 0  # first days


def test_item_token_writes_categories_but_keeps_one_candidate_per_item(events):
    out = _grouped(events, item_token="category_id")
    assert list(out.loc[1, "hist_item_id"]) == [100, 101, 101, 102, 100]
    assert list(out.loc[1, "cand_item_id"]) == [102, 101, 100] and list(out.loc[1, "positive"]) == [1, 0, 1]
    # two items of category 201 stay two candidates
    assert list(out.loc[3, "cand_item_id"]) == [201, 201] and list(out.loc[3, "positive"]) == [0, 1]
    assert "hist_category_id" not in out.columns and "cand_category_id" not in out.columns
    with pytest.raises(ValueError, match="not a column of the event log"):
        _grouped(events, columns=("user_id", "item_id", "timestamp", "action"), item_token="category_id")
    with pytest.raises(ValueError, match="column of its own"):
        _grouped(events, item_token="item_id")


def test_item_token_with_categorify_is_joint_and_sizes_the_blocks(events, tmp_path):
    import merlin.io

    from merlin_longseq.t4r.request import block_for
    from merlin_longseq.workflows.request_grouping import build_request_workflow

    log = events[["user_id", "item_id", "timestamp", "action", "category_id"]]
    workflow = build_request_workflow(log, label_columns=["positive"], max_history=50, item_token="category_id",
                                      out_path=str(tmp_path / "categories"))
    out = workflow.fit_transform(merlin.io.Dataset(tb.daily_requests(events))).to_ddf().compute()
    out = out.set_index("request_id")
    hist, cand = list(out.loc[1, "hist_item_id"]), list(out.loc[1, "cand_item_id"])
    # raw [100, 101, 101, 102, 100] and [102, 101, 100]: one vocabulary for both lists
    assert hist[0] == hist[4] == cand[2] and hist[1] == hist[2] == cand[1] and hist[3] == cand[0]
    assert len({hist[0], hist[1], hist[3]}) == 3
    schema = workflow.output_schema
    assert schema.column_names[:4] == ["user_id", "request_id", "request_time", "hist_item_id"]
    block = block_for("mean-pool").from_schema(schema, use_user_id=False, d_model=4, mlp_dims=(4,))
    assert block.model.cfg.num_items >= 7 and block.model.cfg.num_actions == 4  # 7 categories, 4 behaviours


# ---------------------------------------------------------------------------------------------------- the job
def _parquet(folder):
    """The rows of an ETL split folder (its part_*.parquet files; the folder also holds the schema files)."""
    return pd.concat([pd.read_parquet(p) for p in sorted(Path(folder).glob("*.parquet"))], ignore_index=True)


def test_config_datasets_and_presets():
    ml = job.RequestRankingConfig()
    assert (ml.dataset, ml.item_key, ml.archs) == ("ml-100k", "item", ("stca", "longer", "mean-pool", "din"))
    assert (ml.learning_rate, ml.epochs, ml.seeds, ml.eval_lengths) == (1e-2, 4, (0, 1, 2), (8, 32, 128, 512))
    taobao = job.RequestRankingConfig.preset("taobao")
    assert taobao.archs == job.ARCHS and "ultra-hstu" in taobao.archs and taobao.seeds == (0, 1, 2, 3, 4)
    assert taobao.item_token == "category_id" and taobao.block_options("din")["num_actions"] == 4
    assert taobao.block_options("ultra-hstu")["max_seq_len"] == taobao.max_history
    with pytest.raises(ValueError, match="item_key 'category' is not available for ml-100k"):
        job.RequestRankingConfig(item_key="category")
    with pytest.raises(ValueError, match="unknown dataset"):
        job.RequestRankingConfig(dataset="criteo")
    with pytest.raises(ValueError, match="cannot be downloaded"):
        job.load_events(job.RequestRankingConfig.quick("taobao", download=True))


def test_repeat_counts():
    request = np.array([0, 0, 1, 1, 1])
    items = np.array([3, 4, 3, 5, 9])
    hist = [np.array([3, 3, 7]), np.array([5] * 12 + [3])]
    assert job.repeat_counts(request, items, hist).tolist() == [2, 0, 1, job.REPEAT_CAP, 0]


def test_taobao_quick_run_on_a_synthetic_file(tmp_path):
    """The whole job (--quick: every arch, one epoch, one seed) on a synthetic UserBehavior file: seconds."""
    csv = write_taobao_csv(tmp_path / "UserBehavior.csv")
    cfg = job.RequestRankingConfig.quick("taobao", data_dir=str(csv))
    out = job.run(str(tmp_path / "run"), cfg, log=lambda *_: None)
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "taobao_ranking.json").read_text())
    report = (run_dir / "report.md").read_text()
    assert "## Taobao UserBehavior ranking" in report and all(f"| {arch} |" in report for arch in job.ARCHS)
    assert [s["arch"] for s in saved["summary"]] == list(job.ARCHS)
    assert set(out["references"]) == {"popularity", "user history rate", "repeat", "random"}
    for row in out["runs"]:
        for length in cfg.eval_lengths:
            assert 0.0 <= row[f"auc_positive@{length}"] <= 1.0
            assert 0.0 < row[f"logloss_positive@{length}"] < 5.0
    for metrics in out["references"].values():
        assert 0.0 <= metrics["auc_positive"] <= 1.0 and math.isfinite(metrics["logloss_positive"])
    counts = saved["counts"]
    assert counts["train"]["requests"] > counts["eval"]["requests"] > 0
    # --tune: a validation split inside train, the eval days never read
    tuned = job.run_ranking_etl(job.load_events(cfg)[0], str(tmp_path / "tune"),
                                job.RequestRankingConfig.quick("taobao", data_dir=str(csv), tune=True))
    valid, evaluated = _parquet(tuned["valid"]), _parquet(run_dir / "etl" / "eval")
    assert valid.request_time.max() < evaluated.request_time.max()
    assert not set(zip(valid.user_id, valid.request_time)) & set(zip(evaluated.user_id, evaluated.request_time))


# ---------------------------------------------------------------------------------------------------- real data
def _head_or_skip():
    path = tb.default_taobao_path()
    if not path.is_file():
        pytest.skip(f"Taobao UserBehavior head not found at {path} (set ${tb.ENV_TAOBAO}); research-only data, "
                    "never copied into the repository")
    return path


def test_real_head_counts_and_requests():
    events = tb.read_taobao(_head_or_skip())
    # README: 84,287 rows of 814 users; 35 rows outside the window
    assert len(events) == 84_287 - 35 and events.user_id.nunique() == 814
    assert events.day.max() - events.day.min() == 8
    requests = tb.daily_requests(events)
    assert requests.request_id.nunique() == 5_625 and len(requests) == 65_417
    assert abs(requests.positive.mean() - 0.0422) < 5e-4
    assert not requests.duplicated(["request_id", "item_id"]).any()


def test_real_head_etl_matches_the_raw_log(tmp_path):
    """The job's ETL (category tokens) on the first 60 users, decoded, against the raw events: no event of the
    request's day in its history, every earlier one in order, the labels the day's cart / fav / buy."""
    path = _head_or_skip()
    cfg = job.RequestRankingConfig.preset("taobao", data_dir=str(path), max_users=60, max_history=512)
    events, _ = job.load_events(cfg)
    paths = job.run_ranking_etl(events, str(tmp_path / "etl"), cfg)
    vocab = pd.read_parquet(next((tmp_path / "etl" / "categories").rglob("unique.*.parquet")))
    raw_of = dict(zip(vocab.index, vocab.iloc[:, 0]))
    day_start = {}
    for split in ("train", "eval"):
        frame = _parquet(paths[split])
        for row in frame.head(80).itertuples():
            mine = events[events.user_id == row.user_id]
            day = tb.beijing_day([row.request_time])[0]
            before = mine[mine.day < day].tail(cfg.max_history)
            assert [raw_of[i] for i in row.hist_item_id] == before.category_id.tolist()
            assert list(row.hist_action) == before.action.tolist()
            today = mine[mine.day == day]
            assert row.request_time == today.timestamp.min()
            viewed = today[today.behavior == "pv"].drop_duplicates("item_id")
            acted = set(today.loc[today.behavior != "pv", "item_id"])
            assert [raw_of[i] for i in row.cand_item_id] == viewed.category_id.tolist()
            assert list(row.positive) == [int(i in acted) for i in viewed.item_id]
            day_start.setdefault(split, {}).setdefault(row.user_id, []).append(day)
    for user, days in day_start["eval"].items():  # eval days come after the user's train days
        assert min(days) > max(day_start["train"].get(user, [0]))
