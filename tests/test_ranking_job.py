"""The ranking job end to end (quick preset), its ETL splits against the raw logs, the T4R-side extrapolation
window (RecentHistoryWindow) against plain slicing, and the arch registry."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from merlin_longseq.extrapolation import BetaLengthSampler, RecentHistoryWindow, keep_recent_padded

pytestmark = pytest.mark.merlin


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from merlin_longseq.jobs.ranking import RankingJobConfig, make_data, run

    cfg = RankingJobConfig.quick()
    run_dir = tmp_path_factory.mktemp("ranking")
    lines = []
    results = run(str(run_dir), cfg, log=lines.append)
    events, train, evaluation = make_data(cfg)  # deterministic: the job's own raw logs
    return dict(cfg=cfg, run_dir=run_dir, results=results, lines=lines, events=events, train=train,
                evaluation=evaluation)


def test_quick_job_writes_report_plot_json_with_sane_metrics(quick_run):
    cfg, run_dir, results = quick_run["cfg"], quick_run["run_dir"], quick_run["results"]
    assert [(r["arch"], r["history_len"]) for r in results] == [(a, n) for a in cfg.archs for n in cfg.eval_lengths]
    for row in results:
        for label in cfg.labels:
            assert 0.0 <= row[f"auc_{label}"] <= 1.0 and 0.0 <= row[f"gauc_{label}"] <= 1.0
            assert 0.0 < row[f"logloss_{label}"] < 2.0
    report = (run_dir / "report.md").read_text()
    assert "| stca" in report and "| mean-pool" in report and "ranking_auc_vs_length.png" in report
    assert (run_dir / "ranking_auc_vs_length.png").stat().st_size > 1000
    saved = json.loads((run_dir / "ranking_metrics.json").read_text())
    assert saved["results"] == results
    assert set(saved["train"]) == set(cfg.archs)
    for stats in saved["train"].values():
        assert stats["train_loss_last"] < stats["train_loss_first"]  # every arch learned something


def test_trained_stca_beats_a_random_scorer(quick_run):
    cfg, results = quick_run["cfg"], quick_run["results"]
    saved = json.loads((quick_run["run_dir"] / "ranking_metrics.json").read_text())
    evaluation = quick_run["evaluation"]
    positives = int(evaluation["click"].sum())
    negatives = len(evaluation) - positives
    # standard deviation of the AUC of a scorer that ignores the labels (Mann-Whitney null)
    null_sd = math.sqrt((positives + negatives + 1) / (12 * positives * negatives))
    stca = [r for r in results if r["arch"] == "stca" and r["history_len"] == max(cfg.eval_lengths)][0]
    assert stca["auc_click"] > 0.5 + 3 * null_sd, (stca, null_sd)
    assert stca["auc_click"] > saved["random_scorer"]["auc_click"] + 0.03
    assert stca["gauc_click"] > saved["random_scorer"]["gauc_click"]


def test_etl_splits_follow_the_raw_logs(quick_run):
    """Eval rows hold the full capped history, train rows a Beta-drawn recent suffix; never a later event."""
    import glob

    import pandas as pd

    cfg, run_dir, events = quick_run["cfg"], quick_run["run_dir"], quick_run["events"]
    by_user = {int(u): f["timestamp"].to_numpy() for u, f in events.groupby("user_id")}
    lengths = {}
    for split, cap in (("train", cfg.train_max_history), ("eval", cfg.eval_max_history)):
        frame = pd.concat(pd.read_parquet(p) for p in glob.glob(str(run_dir / "etl" / split / "*.parquet")))
        lengths[split] = []
        for row in frame.itertuples():
            before = by_user[row.user_id][by_user[row.user_id] < row.request_time]
            n = len(row.hist_timestamp)
            assert n <= min(len(before), cap)
            # the most recent n events before the request, in time order
            assert np.array_equal(row.hist_timestamp, before[len(before) - n:])
            if split == "eval":
                assert n == min(len(before), cap)
            lengths[split].append(n)
    assert len(lengths["eval"]) == cfg.data.num_users
    # Beta(0.5, 1.5) windows: mean 0.25 * 64 = 16 events, far below the cap the histories allow
    assert 8 < np.mean(lengths["train"]) < 26, np.mean(lengths["train"])
    assert min(lengths["train"]) < 8 and max(lengths["train"]) > 40


def test_train_and_eval_share_one_item_vocabulary(quick_run):
    import glob

    import pandas as pd

    run_dir = quick_run["run_dir"]
    codes = {}
    for split, raw in (("train", quick_run["train"]), ("eval", quick_run["evaluation"])):
        frame = pd.concat(pd.read_parquet(p) for p in glob.glob(str(run_dir / "etl" / split / "*.parquet")))
        shown = raw.groupby("request_id")["item_id"].apply(list)
        for row in frame.itertuples():
            for item, code in zip(shown[row.request_id], row.cand_item_id):
                assert codes.setdefault(int(item), int(code)) == int(code), (split, item)
    assert len(set(codes.values())) == len(codes)


# ---- the T4R-side window --------------------------------------------------------------------------------------
def padded_batch(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.zeros(len(lengths), width, dtype=torch.int64)
    times = torch.zeros_like(items)
    for b, n in enumerate(lengths):
        items[b, :n] = torch.randint(1, 50, (n,), generator=g)
        times[b, :n] = torch.arange(n) * 10 + 5
    return {"hist_item_id": items, "hist_timestamp": times, "hist_action": (items % 3) * (items != 0),
            "cand_item_id": torch.ones(len(lengths), 2, dtype=torch.int64)}


def tail(row, n):
    real = [int(x) for x in row if int(x) != 0] if n else []
    return real[len(real) - n:] if n else []


def test_window_with_a_cap_matches_slicing():
    lengths = [0, 1, 5, 9, 9, 3]
    batch = padded_batch(lengths, width=9)
    out, targets = RecentHistoryWindow(max_len=4)(batch, {"click": 1})
    assert targets == {"click": 1} and out["cand_item_id"] is batch["cand_item_id"]
    assert out["hist_item_id"].shape == (6, 4)
    for b, n in enumerate(lengths):
        keep = min(n, 4)
        assert out["hist_item_id"][b, :keep].tolist() == tail(batch["hist_item_id"][b], keep)
        assert out["hist_timestamp"][b, :keep].tolist() == batch["hist_timestamp"][b, n - keep:n].tolist()
        assert out["hist_item_id"][b, keep:].eq(0).all() and out["hist_action"][b, keep:].eq(0).all()


def test_window_with_a_sampler_keeps_recent_suffixes_and_is_seeded():
    lengths = [0, 3, 40, 100, 100, 100, 7, 64] * 4
    batch = padded_batch(lengths, width=100, seed=1)
    sampler = BetaLengthSampler(max_train_len=64)
    out = RecentHistoryWindow(sampler, seed=3)(batch)[0]
    again = RecentHistoryWindow(sampler, seed=3)(batch)[0]
    assert torch.equal(out["hist_item_id"], again["hist_item_id"])
    new_lengths = (out["hist_item_id"] != 0).sum(1).tolist()
    assert len(set(new_lengths)) > 3  # drawn, not one fixed cap
    for b, (n, k) in enumerate(zip(lengths, new_lengths)):
        assert k <= min(n, 64) and (n == 0 or k >= 1)
        assert out["hist_item_id"][b, :k].tolist() == tail(batch["hist_item_id"][b], k)
        assert out["hist_timestamp"][b, :k].tolist() == batch["hist_timestamp"][b, n - k:n].tolist()


def test_window_as_a_loader_transform(quick_run):
    from merlin_longseq.t4r.request import request_dataloader

    cfg, run_dir = quick_run["cfg"], quick_run["run_dir"]
    loader = request_dataloader(str(run_dir / "etl" / "eval"), 16, list(cfg.labels),
                                transform=RecentHistoryWindow(max_len=10))
    for inputs, targets in loader:
        assert inputs["hist_item_id"].shape[1] == 10 == inputs["hist_action"].shape[1]
        assert inputs["hist_timestamp"].shape[1] == 10
        assert set(targets) == set(cfg.labels)


def test_window_cuts_every_history_column_the_batch_has():
    batch = padded_batch([2, 5, 0], width=5)
    no_actions = {k: v for k, v in batch.items() if k != "hist_action"}  # an event log without actions
    out = RecentHistoryWindow(max_len=3)(no_actions)[0]
    assert set(out) == set(no_actions) and out["hist_item_id"].shape == out["hist_timestamp"].shape == (3, 3)
    extra = {**batch, "hist_price": batch["hist_timestamp"] * 2}  # any hist_<event feature> goes along
    out = RecentHistoryWindow(max_len=3)(extra)[0]
    assert torch.equal(out["hist_price"], out["hist_timestamp"] * 2)
    assert out["cand_item_id"] is batch["cand_item_id"]


def test_window_errors():
    with pytest.raises(ValueError, match="exactly one of sampler"):
        RecentHistoryWindow(BetaLengthSampler(), max_len=3)
    with pytest.raises(ValueError, match="exactly one of sampler"):
        RecentHistoryWindow()
    named = RecentHistoryWindow(max_len=2, columns=["hist_item_id", "hist_action", "hist_timestamp"])
    with pytest.raises(KeyError, match="hist_action"):  # named columns are required
        named({"hist_item_id": torch.ones(2, 3, dtype=torch.int64),
               "hist_timestamp": torch.ones(2, 3, dtype=torch.int64)})
    with pytest.raises(KeyError, match="hist_item_id"):
        RecentHistoryWindow(max_len=2)({"hist_timestamp": torch.ones(2, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="padded"):
        RecentHistoryWindow(max_len=2, columns=["hist_item_id"])({"hist_item_id": torch.ones(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="new_lengths <= lengths"):
        keep_recent_padded({"a": torch.ones(1, 3)}, torch.tensor([2]), torch.tensor([3]))


# ---- configuration and registry -----------------------------------------------------------------------------
def test_config_errors():
    from merlin_longseq.jobs.ranking import RankingJobConfig

    with pytest.raises(ValueError, match="unknown arch"):
        RankingJobConfig.quick(archs=("stca", "gru"))
    with pytest.raises(ValueError, match="window_at"):
        RankingJobConfig.quick(window_at="model")
    with pytest.raises(ValueError, match="eval_lengths"):
        RankingJobConfig.quick(eval_lengths=(16, 4096))
    with pytest.raises(ValueError, match="requests_per_user"):
        RankingJobConfig.quick(requests_per_user=1)
    default = RankingJobConfig()
    assert default.archs == ("stca", "mean-pool", "longer", "ultra-hstu")
    assert default.arch_options["ultra-hstu"]["local_window"] == 128  # semi-local: minutes on a CPU, not hours
    assert default.sampler.mean_length == 256 and default.train_max_history == 1024
    assert default.eval_lengths[-1] == 4096 <= default.data.min_history


def test_registry_builds_every_arch(quick_run):
    import merlin.io

    from merlin_longseq.jobs.ranking import build_block

    cfg = quick_run["cfg"]
    schema = merlin.io.Dataset(str(quick_run["run_dir"] / "etl" / "train"), engine="parquet").schema
    names = {arch: type(build_block(arch, schema, cfg)).__name__ for arch in cfg.archs}
    assert names == {"stca": "STCABlock", "mean-pool": "MeanPoolBlock", "longer": "LONGERBlock",
                     "ultra-hstu": "ULTRAHSTUBlock"}
    with pytest.raises(ValueError, match="no request block"):
        build_block("hstu", schema, cfg)  # a next-item architecture has no request block


def test_training_with_windows_drawn_in_the_loader(quick_run, monkeypatch):
    """window_at='loader': tr.Trainer's training loader runs the RecentHistoryWindow step on every batch."""
    import dataclasses

    import merlin.io

    from merlin_longseq.jobs.ranking import build_model, train_arch

    cfg = dataclasses.replace(quick_run["cfg"], window_at="loader", epochs=1)
    path = str(quick_run["run_dir"] / "etl" / "eval")  # full histories: the window does the cutting
    seen = []
    original_call = RecentHistoryWindow.__call__

    def spy(self, inputs, targets=None):
        out = original_call(self, inputs, targets)
        seen.append(((out[0]["hist_item_id"] != 0).sum(1), (inputs["hist_item_id"] != 0).sum(1)))
        return out

    dataset = merlin.io.Dataset(path, engine="parquet")
    model = build_model("stca", dataset.schema, cfg)
    monkeypatch.setattr(RecentHistoryWindow, "__call__", spy)
    stats = train_arch(model, path, cfg)
    assert len(seen) == math.ceil(dataset.num_rows / cfg.batch_size) and stats["train_seconds"] > 0
    for cut, full in seen:
        assert bool((cut <= torch.clamp(full, max=cfg.train_max_history)).all())
    assert any(bool((cut < full).any()) for cut, full in seen)


# ---- the synthetic ranking data ----------------------------------------------------------------------------------
def test_impressions_labels_follow_the_true_profile():
    from merlin_longseq.data.synthetic import SyntheticConfig, _World, generate_impressions, user_profiles

    cfg = SyntheticConfig(num_users=120, num_items=400, num_topics=40, interests_per_user=10,
                          favorites_per_topic=2, min_history=30, max_history=60, session_order="weighted", seed=5)
    events, imps = generate_impressions(cfg, requests_per_user=5, candidates_per_request=24)
    again = generate_impressions(cfg, requests_per_user=5, candidates_per_request=24)[1]
    assert imps.equals(again)  # seeded
    profiles = user_profiles(cfg)
    topic = _World(cfg).item_topic
    pairs = list(zip(imps.user_id, imps.item_id))
    favorite = np.array([item in set(profiles[u - 1].favorite_items) for u, item in pairs])
    interest = np.array([topic[item - 1] in set(profiles[u - 1].interests) for u, item in pairs])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # the defaults: click_bias -2, favorite_weight 2.5, interest_weight 1.5 (a favourite is in an interest topic)
    for mask, expected in ((favorite, sigmoid(2.0)), (interest & ~favorite, sigmoid(-0.5)), (~interest, sigmoid(-2))):
        assert mask.sum() > 500
        assert abs(imps.click[mask].mean() - expected) < 0.05, (expected, imps.click[mask].mean())
    assert not (imps.like.astype(bool) & ~(imps.click.astype(bool) & favorite)).any()  # like => click & favourite
    # every request: distinct candidates, the configured count
    per_request = imps.groupby("request_id")["item_id"]
    assert (per_request.nunique() == 24).all() and (per_request.size() == 24).all()
    assert imps.item_id.between(1, cfg.num_items).all()


def test_last_request_sees_the_whole_history_and_windows_reveal_more_interests():
    from merlin_longseq.data.synthetic import SyntheticConfig, _World, generate_impressions, user_profiles

    cfg = SyntheticConfig(num_users=30, num_items=1200, num_topics=300, interests_per_user=48,
                          favorites_per_topic=1, p_favorite=0.5, p_noise=0.0, mean_session_len=4.0,
                          min_history=4100, max_history=4200, session_order="weighted", interest_skew=1.3, seed=0)
    events, imps = generate_impressions(cfg, requests_per_user=3, candidates_per_request=8, last_request_at_end=True)
    topic, profiles = _World(cfg).item_topic, user_profiles(cfg)
    seen = {256: [], 1024: [], 4096: []}
    for user, frame in events.groupby("user_id"):
        times = frame.timestamp.to_numpy()
        requests = imps[imps.user_id == user].drop_duplicates("request_id")
        assert requests.request_time.is_monotonic_increasing
        assert requests.request_time.iloc[-1] > times[-1]  # the last request comes after every event
        # the other requests fall in the second half of the history (request_start=0.5)
        assert ((times[None, :] < requests.request_time.to_numpy()[:, None]).sum(1) >= len(times) // 2).all()
        for window in seen:
            topics = set(topic[frame.item_id.to_numpy()[-window:] - 1])
            seen[window].append(len(topics & set(profiles[user - 1].interests)) / cfg.interests_per_user)
    coverage = {w: float(np.mean(v)) for w, v in seen.items()}
    # a long window shows clearly more of the profile than a short one
    assert coverage[256] + 0.15 < coverage[1024] and coverage[1024] + 0.05 < coverage[4096], coverage


def test_synthetic_config_errors():
    from merlin_longseq.data.synthetic import SyntheticConfig, generate_impressions

    with pytest.raises(ValueError, match="session_order"):
        SyntheticConfig(session_order="random")
    with pytest.raises(ValueError, match="p_favorite"):
        SyntheticConfig(p_favorite=1.5)
    with pytest.raises(ValueError, match="exceeds num_items"):
        generate_impressions(SyntheticConfig(num_users=2, num_items=100, num_topics=10, interests_per_user=2,
                                             min_history=5, max_history=10), candidates_per_request=101)
