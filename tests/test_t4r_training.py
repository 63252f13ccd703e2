"""Request models trained the Transformers4Rec way (merlin_longseq.t4r.training, tr.Trainer, tr.Model.fit) on the
NVTabular operator's own output, the metrics of trainer.evaluate against merlin_longseq.metrics, the training-only
window transform, and the request-data edge cases: an event log without actions, a partition of empty
histories only, a label list out of step with its candidates, an event at the request time."""
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from merlin_longseq.extrapolation import BetaLengthSampler, RecentHistoryWindow
from merlin_longseq.request import RequestError

pytestmark = pytest.mark.merlin

LABELS = ["click", "like"]
STCA = dict(d_model=8, n_heads=2, n_layers=1, mlp_dims=(8,))


def _logs(with_actions=True):
    from merlin_longseq.data.synthetic import SyntheticConfig, generate_impressions

    cfg = SyntheticConfig(num_users=24, num_items=60, num_topics=8, interests_per_user=3, min_history=10,
                          max_history=40, seed=1)
    events, impressions = generate_impressions(cfg, requests_per_user=3, candidates_per_request=6)
    return (events if with_actions else events.drop(columns=["action"])), impressions


def _etl(events, impressions, out):
    """The operator's own output, written and read back: build_request_workflow -> parquet -> merlin Dataset."""
    import merlin.io

    from merlin_longseq.workflows.request_grouping import build_request_workflow

    flow = build_request_workflow(events, label_columns=LABELS, max_history=32, out_path=str(out / "categories"))
    flow.fit(merlin.io.Dataset(impressions))
    flow.transform(merlin.io.Dataset(impressions)).to_parquet(str(out / "requests"), output_files=1)
    return str(out / "requests"), merlin.io.Dataset(str(out / "requests"), engine="parquet").schema


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    events, impressions = _logs()
    path, schema = _etl(events, impressions, tmp_path_factory.mktemp("training"))
    return path, schema, events


def _model(schema, labels=LABELS, **options):
    from merlin_longseq.t4r.request import STCABlock
    from merlin_longseq.t4r.training import request_model

    torch.manual_seed(0)
    return request_model(STCABlock.from_schema(schema, use_user_id=False, **{**STCA, **options}), labels)


# ---- the operator's schema ------------------------------------------------------------------------------------
def test_operator_output_sizes_a_block_without_arguments(requests):
    from merlin_longseq.t4r.request import STCABlock

    _, schema, events = requests
    assert schema["hist_action"].properties["domain"] == {"min": int(events["action"].min()),
                                                          "max": int(events["action"].max())}
    assert "domain" not in schema["user_id"].properties  # raw user ids: no embedding table sized from them
    with pytest.warns(UserWarning, match="'user_id' column has no int domain"):
        block = STCABlock.from_schema(schema)  # no num_actions=, num_items=, num_users=
    cfg = block.config
    assert cfg.num_actions == int(events["action"].max()) and cfg.num_users == 0
    assert cfg.num_items == schema["cand_item_id"].properties["domain"]["max"]
    assert block.user_column == "user_id"  # still recorded for GAUC
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice is silent
        STCABlock.from_schema(schema, use_user_id=False)
        assert STCABlock.from_schema(schema, num_users=30).config.num_users == 30


# ---- tr.Trainer, the conventional way ----------------------------------------------------------------------------
def test_stock_trainer_builds_the_request_loader_from_the_schema(requests, tmp_path):
    import transformers4rec.torch as tr
    from transformers4rec.torch.utils.data_utils import T4RecDataLoader

    from merlin_longseq.t4r.request import RequestDataLoader
    from merlin_longseq.t4r.training import training_arguments

    path, schema, _ = requests
    assert T4RecDataLoader.parse("merlin_request") is RequestDataLoader
    model = _model(schema)
    args = training_arguments(str(tmp_path), epochs=3, batch_size=8, learning_rate=1e-2, progress=False)
    assert args.data_loader_engine == "merlin_request"
    trainer = tr.Trainer(model=model, args=args, schema=schema, train_dataset_or_path=path,
                         eval_dataset_or_path=path, compute_metrics=True)
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()
    assert end["eval_/loss"] < start["eval_/loss"] - 0.01, (start["eval_/loss"], end["eval_/loss"])
    for label in LABELS:
        for metric in ("auc", "gauc", "log_loss"):
            assert 0.0 <= end[f"eval_/{label}/request_binary_classification_task/{metric}"] < 2.0


def test_request_loader_engine_refuses_what_would_cut_or_drop(requests):
    from merlin_longseq.t4r.request import RequestDataLoader

    path, schema, _ = requests
    with pytest.raises(ValueError, match="most recent events"):
        RequestDataLoader.from_schema(schema, path, 8, max_sequence_length=20)
    with pytest.raises(ValueError, match="tags no TARGET column"):
        RequestDataLoader.from_schema(schema.without(LABELS), path, 8)


# ---- one metric path ---------------------------------------------------------------------------------------------
def test_evaluate_metrics_equal_the_numpy_formulas_on_the_same_predictions(requests):
    from merlin_longseq import metrics
    from merlin_longseq.t4r.request import request_dataloader
    from merlin_longseq.t4r.training import evaluate, predict

    path, schema, _ = requests
    model = _model(schema, labels=["click"])  # untrained: the check is about the bookkeeping
    got = evaluate(model, path, batch_size=5, progress=False)  # many batches; users span several of them
    p = predict(model, path, batch_size=7, progress=False)
    assert len(p["p_click"]) == len(p["click"]) == len(p["user_id"]) > 100
    assert len(np.unique(p["user_id"])) > 10
    assert got["auc_click"] == pytest.approx(metrics.auc(p["p_click"], p["click"]), abs=1e-9)
    assert got["gauc_click"] == pytest.approx(metrics.gauc(p["p_click"], p["click"], p["user_id"]), abs=1e-9)
    assert got["logloss_click"] == pytest.approx(metrics.logloss(p["p_click"], p["click"]), abs=1e-6)
    # tr.Model.evaluate goes through the same metric objects
    task_metrics = model.evaluate(request_dataloader(path, 16, ["click"]), verbose=False)
    assert float(task_metrics["click/request_binary_classification_task/gauc"]) == pytest.approx(got["gauc_click"])


def test_gauc_needs_user_ids_of_the_same_predictions(requests):
    from merlin_longseq.t4r.request import request_dataloader

    path, schema, _ = requests
    model = _model(schema, labels=["click"])
    inputs, targets = next(iter(request_dataloader(path, 8, ["click"])))
    out = model(inputs, targets=targets, testing=True)
    model.calculate_metrics(out["predictions"], out["labels"])  # the pair of the last forward: accepted
    with pytest.raises(RuntimeError, match="predictions of the task's last forward"):
        model.calculate_metrics(out["predictions"].clone(), out["labels"])
    no_users = {k: v for k, v in inputs.items() if k != "user_id"}
    out = model(no_users, targets=targets, testing=True)
    with pytest.raises(ValueError, match="no 'user_id' column"):
        model.calculate_metrics(out["predictions"], out["labels"])


# ---- the library helpers -----------------------------------------------------------------------------------------
def test_fit_trains_with_fresh_windows_and_evaluates_full_histories(requests, monkeypatch):
    import merlin.io

    from merlin_longseq.t4r.training import evaluate, fit

    path, schema, _ = requests
    seen = []
    original = RecentHistoryWindow.__call__

    def spy(self, inputs, targets=None):
        out = original(self, inputs, targets)
        seen.append((self.max_len, (inputs["hist_item_id"] != 0).sum(1), (out[0]["hist_item_id"] != 0).sum(1)))
        return out

    monkeypatch.setattr(RecentHistoryWindow, "__call__", spy)
    model = _model(schema)
    threads, filters = torch.get_num_threads(), list(warnings.filters)
    window = RecentHistoryWindow(BetaLengthSampler(max_train_len=16), seed=0)
    stats = fit(model, path, epochs=2, batch_size=8, learning_rate=1e-2, train_transform=window, progress=False)
    assert len(stats["epoch_losses"]) == 2 and stats["train_candidates_per_second"] > 0
    training = [(full, cut) for max_len, full, cut in seen if max_len is None]
    assert len(training) == len(seen) == 2 * math.ceil(merlin.io.Dataset(path, engine="parquet").num_rows / 8)
    assert all(bool((cut <= torch.clamp(full, max=16)).all()) for full, cut in training)
    assert any(bool((cut < full).any()) for full, cut in training)
    half = len(training) // 2  # same rows each epoch, new draws: the two epochs' windows differ
    assert sum(int(c.sum()) for _, c in training[:half]) != sum(int(c.sum()) for _, c in training[half:])

    seen.clear()
    rng = torch.random.get_rng_state()
    full = evaluate(model, path, batch_size=16, progress=False)
    assert not seen  # evaluation reads the full histories
    capped = evaluate(model, path, batch_size=16, max_history=2, progress=False)
    assert seen and all(max_len == 2 for max_len, _, _ in seen)
    assert capped["auc_click"] != full["auc_click"]
    # the library leaves process state alone: threads, warning filters, and (evaluate) the random state
    assert torch.get_num_threads() == threads and warnings.filters == filters
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_model_fit_and_evaluate_with_the_request_loader(requests):
    from merlin_longseq.t4r.request import request_dataloader

    path, schema, _ = requests
    model = _model(schema, labels=["click"])
    train = request_dataloader(path, 8, ["click"], shuffle=True,
                               transform=RecentHistoryWindow(BetaLengthSampler(max_train_len=16)))
    losses = model.fit(train, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), num_epochs=3, verbose=False)
    assert losses.shape == (3,) and losses[-1] < losses[0]
    result = model.evaluate(request_dataloader(path, 16, ["click"]), verbose=False)
    assert 0.5 < float(result["click/request_binary_classification_task/auc"]) <= 1.0


# ---- request-data edge cases ------------------------------------------------------------------------------------
def test_event_log_without_actions_groups_trains_and_evaluates(tmp_path):
    from merlin_longseq.t4r.training import evaluate, fit

    events, impressions = _logs(with_actions=False)
    path, schema = _etl(events, impressions, tmp_path)
    assert "hist_action" not in schema.column_names
    model = _model(schema)
    block = model.heads[0].body
    assert block.columns.hist_action is None and block.config.num_actions == 0
    stats = fit(model, path, epochs=1, batch_size=16, progress=False,
                train_transform=RecentHistoryWindow(BetaLengthSampler(max_train_len=8)))  # default columns
    assert np.isfinite(stats["train_loss_last"])
    assert 0.0 <= evaluate(model, path, batch_size=32, progress=False)["auc_like"] <= 1.0


def _request_rows(n, first_user=1, history=True):
    rows = []
    for i in range(n):
        length = (i % 4 + 1) if history else 0
        rows.append(dict(user_id=first_user + i, request_id=first_user + i, request_time=1000,
                         hist_item_id=np.arange(1, length + 1, dtype=np.int64) + 2,
                         hist_timestamp=np.arange(length, dtype=np.int64) * 10 + 100,
                         hist_action=np.ones(length, dtype=np.int64),
                         cand_item_id=np.array([3, 4, 5], dtype=np.int64),
                         click=np.array([0, 1, i % 2], dtype=np.int64)))
    return pd.DataFrame(rows)


def _block_options():
    return dict(STCA, num_items=10, num_actions=2, use_user_id=False)


def test_partition_of_new_users_only_loads_and_trains(tmp_path):
    import merlin.io

    from merlin_longseq.t4r.request import STCABlock, request_dataloader
    from merlin_longseq.t4r.training import fit, request_model

    _request_rows(6, history=False).to_parquet(tmp_path / "part_0.parquet")  # a day of new users, read first
    _request_rows(6, first_user=20).to_parquet(tmp_path / "part_1.parquet")
    dataset = merlin.io.Dataset(str(tmp_path), engine="parquet")
    assert dataset.npartitions == 2
    batches = list(request_dataloader(dataset, 4, ["click"]))
    users = torch.cat([inputs["user_id"] for inputs, _ in batches]).tolist()
    assert sorted(users) == list(range(1, 7)) + list(range(20, 26))
    events = sum(int((inputs["hist_item_id"] != 0).sum()) for inputs, _ in batches)
    assert events == sum(i % 4 + 1 for i in range(6))
    first = batches[0][0]
    assert first["hist_item_id"].shape == (4, 1) and first["hist_item_id"].dtype == torch.int64
    assert not bool(first["hist_item_id"].any())
    model = request_model(STCABlock.from_schema(dataset.schema, **_block_options()), ["click"])
    assert np.isfinite(fit(model, dataset, epochs=1, batch_size=4, progress=False)["train_loss_last"])


def test_label_list_out_of_step_with_its_candidates_is_refused(tmp_path):
    import merlin.io
    import transformers4rec.torch as tr
    from merlin.schema import Tags

    from merlin_longseq.t4r.request import STCABlock, request_dataloader
    from merlin_longseq.t4r.training import request_model, training_arguments

    for extra, name in ((-1, "short"), (1, "long")):
        frame = _request_rows(8)
        frame.at[5, "click"] = np.zeros(3 + extra, dtype=np.int64)  # one row, one label too few / too many
        frame.to_parquet(tmp_path / f"{name}.parquet")
        with pytest.raises(RequestError, match=f"row 5: label list 'click' holds {3 + extra} values but the row "
                                               "has 3 candidates"):
            list(request_dataloader(str(tmp_path / f"{name}.parquet"), 8, ["click"]))
    schema = merlin.io.Dataset(str(tmp_path / "long.parquet"), engine="parquet").schema
    schema["click"] = schema["click"].with_tags([Tags.TARGET])
    model = request_model(STCABlock.from_schema(schema, **_block_options()), ["click"])
    args = training_arguments(str(tmp_path / "out"), batch_size=8, progress=False)
    trainer = tr.Trainer(model=model, args=args, schema=schema, train_dataset_or_path=str(tmp_path / "long.parquet"))
    with pytest.raises(RequestError, match="label list 'click'"):
        trainer.train()


def test_training_refuses_events_at_or_after_the_request_time(tmp_path):
    import merlin.io

    from merlin_longseq.t4r.request import STCABlock, request_dataloader
    from merlin_longseq.t4r.training import request_model

    frame = _request_rows(4)
    frame.to_parquet(tmp_path / "ok.parquet")
    frame.at[2, "hist_timestamp"] = np.array([100, 110, 1000], dtype=np.int64)  # the last one AT the request time
    frame.to_parquet(tmp_path / "late.parquet")
    schema = merlin.io.Dataset(str(tmp_path / "ok.parquet"), engine="parquet").schema
    model = request_model(STCABlock.from_schema(schema, **_block_options()), ["click"])
    inputs, targets = next(iter(request_dataloader(str(tmp_path / "ok.parquet"), 4, ["click"])))
    assert torch.isfinite(model(inputs, targets=targets, training=True)["loss"])
    inputs, targets = next(iter(request_dataloader(str(tmp_path / "late.parquet"), 4, ["click"])))
    with pytest.raises(RequestError, match="request 2 has a history event at or after its request_time"):
        model(inputs, targets=targets, training=True)
