"""MovieLens ranking job (merlin_longseq.jobs.request_ranking, dataset ml-100k): the split and batching helpers on
hand-made frames, config errors, and a tiny end-to-end run on the real ML-100K (300 users, one epoch, the four
archs of its table) whose ETL output is checked against the raw ratings. The real data is read from
../shared/data/ml-100k (or $MERLIN_LONGSEQ_ML100K) and never copied; those tests skip when it is absent."""
import json
import math

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.merlin

job = pytest.importorskip("merlin_longseq.jobs.request_ranking")
ml = pytest.importorskip("merlin_longseq.workflows.movielens")


def _requests(days_per_user):
    """Impression rows of day requests: user u has days_per_user[u] days, two candidates each."""
    rows, request = [], 0
    for user, days in enumerate(days_per_user, start=1):
        for day in range(days):
            rows += [(user, request, day * 86_400 + k) for k in range(2)]
            request += 1
    return pd.DataFrame(rows, columns=["user_id", "request_id", "request_time"])


def test_later_days_hold_out_each_users_last_days():
    requests = _requests([1, 2, 5, 10])  # request ids: user 1: 0; user 2: 1-2; user 3: 3-7; user 4: 8-17
    held = job.later_days(requests, 0.2)
    held_ids = sorted(set(requests.loc[held, "request_id"]))
    # one day: none; 2 days: ceil(0.4) = 1; 5 days: 1; 10 days: 2 (the LAST ones)
    assert held_ids == [2, 7, 16, 17]
    assert held.sum() == 2 * len(held_ids)  # every row of a held request


def test_spread_first_days_keeps_a_history_in_every_batch():
    requests = _requests([1] * 30 + [3] * 10)  # 40 first days (empty histories), 20 later days
    spread = job.spread_first_days(requests, batch_size=4, seed=0)
    assert sorted(spread["request_id"].unique()) == list(range(requests["request_id"].nunique()))
    # a renumbering of whole requests: the rows of one old id share one new id, and the rows keep their order
    assert (spread.groupby(requests["request_id"])["request_id"].nunique() == 1).all()
    pd.testing.assert_frame_equal(spread.drop(columns="request_id"), requests.drop(columns="request_id"))
    first_ids = requests.drop_duplicates("user_id")["request_id"]
    new_first = set(spread.loc[requests["request_id"].isin(first_ids), "request_id"])
    for start in range(0, 60, 4):  # batches of 4 in request_id order: at least one non-empty history each
        assert not set(range(start, start + 4)) <= new_first
    with pytest.raises(ValueError, match="empty history"):
        job.spread_first_days(_requests([1] * 30 + [2]), batch_size=4)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown arch"):
        job.RequestRankingConfig(archs=("bert",))
    with pytest.raises(ValueError, match="eval_lengths"):
        job.RequestRankingConfig(max_history=64, eval_lengths=(8, 128))
    with pytest.raises(ValueError, match="eval_fraction"):
        job.RequestRankingConfig(eval_fraction=1.0)
    with pytest.raises(ValueError, match="seed"):
        job.RequestRankingConfig(seeds=())
    options = job.RequestRankingConfig().block_options("din")
    assert options["num_actions"] == 5 and options["d_model"] == 32  # the rating bucket 1..5 is the action


def test_first_name_of_the_job_still_works():
    old = pytest.importorskip("merlin_longseq.jobs.movielens_ranking")
    assert old.MovieLensRankingConfig() == job.RequestRankingConfig() == job.RequestRankingConfig.preset("ml-100k")
    assert old.run is job.run and old.later_days is job.later_days


# ------------------------------------------------------------------------------------ on the real ML-100K
def _ml100k_or_skip():
    folder = ml.default_ml100k_dir()
    if not (folder / "u.data").is_file():
        pytest.skip(f"ML-100K not found at {folder} (set ${ml.ENV_ML100K}); its license forbids a copy in the repo")
    return folder


def _decoded(path, categories):
    import merlin.io

    frame = merlin.io.Dataset(path, engine="parquet").to_ddf().compute()
    vocab = pd.read_parquet(next(iter(__import__("pathlib").Path(categories).rglob("unique.*.parquet"))))
    raw_of = dict(zip(vocab.index, vocab.iloc[:, 0]))
    for col in ("hist_item_id", "cand_item_id"):
        frame[col] = [[int(raw_of[i]) for i in ids] for ids in frame[col]]
    return frame


def test_ml100k_ranking_end_to_end(tmp_path):
    _ml100k_or_skip()
    cfg = job.RequestRankingConfig.quick()
    out = job.run(str(tmp_path / "run"), cfg, log=lambda *_: None)

    # report files
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "movielens_ranking.json").read_text())
    report = (run_dir / "report.md").read_text()
    assert cfg.archs == ("stca", "longer", "mean-pool", "din")  # ML-100K's table: ULTRA-HSTU only on request
    assert "## MovieLens-100K ranking" in report and all(f"| {arch} |" in report for arch in cfg.archs)
    assert "popularity (reference)" in report
    pytest.importorskip("matplotlib")
    assert (run_dir / cfg.data.plot_name).stat().st_size > 0 and cfg.data.plot_name == "movielens_ranking_auc.png"

    # metrics: every arch at every length, finite and in range; the references too
    assert [s["arch"] for s in saved["summary"]] == list(cfg.archs)
    for row in out["runs"]:
        assert math.isfinite(row["train_loss_first"]) and math.isfinite(row["train_loss_last"])
        for length in cfg.eval_lengths:
            assert 0.0 <= row[f"auc_positive@{length}"] <= 1.0
            assert 0.0 <= row[f"gauc_positive@{length}"] <= 1.0
            assert 0.0 < row[f"logloss_positive@{length}"] < 5.0
    for metrics in out["references"].values():
        assert 0.0 <= metrics["auc_positive"] <= 1.0 and math.isfinite(metrics["logloss_positive"])
    assert abs(out["references"]["random"]["auc_positive"] - 0.5) < 0.1

    # the ETL against the raw ratings: candidates are one user's ratings of one day, labels rating >= 4, the
    # history is every earlier rating (most recent last, capped) with its rating bucket, and eval comes after train
    events, _ = job.load_events(cfg)
    rating = {(u, i): r for u, i, r in zip(events.user_id, events.item_id, events.rating)}
    splits = {s: _decoded(str(run_dir / "etl" / s), str(run_dir / "etl" / "categories")) for s in ("train", "eval")}
    assert len(splits["train"]) == saved["counts"]["train"]["requests"]
    assert len(splits["eval"]) == saved["counts"]["eval"]["requests"]
    last_train = splits["train"].groupby("user_id")["request_time"].max()
    assert (splits["eval"]["request_time"].to_numpy() > last_train[splits["eval"]["user_id"]].to_numpy()).all()
    for split, frame in splits.items():
        for row in frame.head(60).itertuples():
            mine = events[events.user_id == row.user_id]
            day = mine[(mine.timestamp // 86_400) == row.request_time // 86_400]
            assert sorted(row.cand_item_id) == sorted(day.item_id.unique())
            assert list(row.positive) == [int(rating[(row.user_id, i)] >= 4) for i in row.cand_item_id]
            before = mine[mine.timestamp < row.request_time].tail(cfg.max_history)
            assert list(row.hist_item_id) == before.item_id.tolist()
            assert list(row.hist_action) == before.action.tolist()
            if split == "eval":
                assert len(row.hist_item_id) > 0
