import numpy as np
import pytest

from merlin_longseq.request import RequestError
import torch

from merlin_longseq.data.synthetic import SyntheticConfig, generate_impressions

pytestmark = pytest.mark.merlin

NUM_USERS, NUM_ITEMS = 80, 60


def request_frame(events, impressions, max_history):
    """Request-grouped rows (the data contract) built with pandas from generate_impressions output."""
    import pandas as pd

    by_user = {int(u): f for u, f in events.groupby("user_id")}
    rows = []
    for request_id, shown in impressions.groupby("request_id", sort=True):
        user, request_time = int(shown["user_id"].iloc[0]), int(shown["request_time"].iloc[0])
        past = by_user[user][by_user[user]["timestamp"] < request_time].tail(max_history)
        rows.append(dict(user_id=user, request_id=int(request_id), request_time=request_time,
                         hist_item_id=past["item_id"].to_numpy(), hist_timestamp=past["timestamp"].to_numpy(),
                         hist_action=past["action"].to_numpy(), cand_item_id=shown["item_id"].to_numpy(),
                         click=shown["click"].to_numpy(), like=shown["like"].to_numpy()))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def requests_dataset(tmp_path_factory):
    import merlin.io
    from merlin.schema import Tags

    data = SyntheticConfig(num_users=NUM_USERS, num_items=NUM_ITEMS, num_topics=12, interests_per_user=4,
                           min_history=5, max_history=60, seed=0)
    events, impressions = generate_impressions(data, requests_per_user=3, candidates_per_request=8)
    frame = request_frame(events, impressions, max_history=40)
    # variable candidate counts and one empty history, as the contract allows
    frame.at[0, "hist_item_id"], frame.at[0, "hist_timestamp"], frame.at[0, "hist_action"] = [np.zeros(0, np.int64)] * 3
    for i in range(1, len(frame), 3):
        keep = 1 + i % 8
        for column in ("cand_item_id", "click", "like"):
            frame.at[i, column] = frame.at[i, column][:keep]
    path = tmp_path_factory.mktemp("requests")
    frame.to_parquet(path / "part.parquet")

    dataset = merlin.io.Dataset(str(path), engine="parquet")
    schema = dataset.schema
    for name in ("hist_item_id", "hist_timestamp", "hist_action", "cand_item_id", "click", "like"):
        # inference reads the first row, an empty history here: state the element type
        schema[name] = schema[name].with_dtype(np.int64)
    for name in ("hist_item_id", "cand_item_id"):
        schema[name] = schema[name].with_tags([Tags.ITEM_ID, Tags.CATEGORICAL, Tags.LIST]).with_properties(
            {"domain": {"min": 0, "max": NUM_ITEMS}})
    schema["hist_action"] = schema["hist_action"].with_tags([Tags.CATEGORICAL, Tags.LIST]).with_properties(
        {"domain": {"min": 0, "max": 3}})
    schema["hist_timestamp"] = schema["hist_timestamp"].with_tags([Tags.LIST])
    schema["user_id"] = schema["user_id"].with_tags([Tags.USER_ID, Tags.CATEGORICAL]).with_properties(
        {"domain": {"min": 0, "max": NUM_USERS}})
    for name in ("click", "like"):
        schema[name] = schema[name].with_tags([Tags.TARGET, Tags.BINARY_CLASSIFICATION, Tags.LIST])
    dataset.schema = schema
    return dataset, frame


def build_model(dataset, tasks, **config):
    import transformers4rec.torch as tr

    from merlin_longseq.t4r import RequestBinaryClassificationTask, STCABlock

    torch.manual_seed(0)
    values = dict(d_model=16, n_heads=2, n_layers=2, mlp_dims=(16,), backend="pytorch")
    values.update(config)
    block = STCABlock.from_schema(dataset.schema, **values)
    return tr.Model(tr.Head(block, [RequestBinaryClassificationTask(t) for t in tasks])), block


def test_loader_gives_padded_request_batches(requests_dataset):
    from merlin.schema import Tags

    from merlin_longseq.t4r import request_dataloader

    dataset, frame = requests_dataset
    loader = request_dataloader(dataset, batch_size=16, label_columns=["click", "like"])
    assert Tags.TARGET in dataset.schema["click"].tags  # the caller's schema is left alone
    seen_events, seen_candidates, rows = 0, 0, 0
    for inputs, targets in loader:
        assert set(targets) == {"click", "like"} and "click" not in inputs
        hist, cand = inputs["hist_item_id"], inputs["cand_item_id"]
        assert hist.dtype == torch.int64 and inputs["request_time"].dtype == torch.int64
        assert inputs["hist_timestamp"].shape == hist.shape == inputs["hist_action"].shape
        assert targets["click"].shape == targets["like"].shape == cand.shape
        # every list is padded to its own batch maximum: nothing truncated
        assert (hist != 0).sum(1).max() == hist.shape[1] or hist.shape[1] == 1
        assert (cand != 0).sum(1).max() == cand.shape[1]
        seen_events += int((hist != 0).sum())
        seen_candidates += int((cand != 0).sum())
        rows += hist.shape[0]
        assert not bool(((cand == 0) & (targets["click"] != 0)).any())  # labels aligned with candidates
    assert rows == len(frame)
    assert seen_events == sum(map(len, frame["hist_item_id"]))
    assert seen_candidates == sum(map(len, frame["cand_item_id"]))


def test_from_schema_reads_sizes_and_checks_columns(requests_dataset):
    from merlin.schema import ColumnSchema, Schema

    from merlin_longseq.t4r import STCABlock

    dataset, _ = requests_dataset
    block = STCABlock.from_schema(dataset.schema, d_model=8, mlp_dims=(8,))
    cfg = block.config
    assert (cfg.num_items, cfg.num_actions, cfg.num_users, cfg.tasks) == (NUM_ITEMS, 3, NUM_USERS, ())
    assert block.output_size() == [None, None, 8]
    assert STCABlock.from_schema(dataset.schema, use_user_id=False, d_model=8).config.num_users == 0
    # an event log without actions is usable: every event gets the "unknown" action 0
    no_actions = STCABlock.from_schema(dataset.schema.without(["hist_action"]), d_model=8)
    assert no_actions.columns.hist_action is None and no_actions.config.num_actions == 0
    with pytest.raises(ValueError, match="lacks the request columns \\['hist_timestamp'\\]"):
        STCABlock.from_schema(dataset.schema.without(["hist_timestamp"]), d_model=8)
    schema = Schema(list(dataset.schema))  # a copy: the fixture's schema is shared by the other tests
    schema["hist_item_id"] = ColumnSchema("hist_item_id", dtype=schema["hist_item_id"].dtype, is_list=True,
                                          is_ragged=True)
    with pytest.raises(ValueError, match="no int domain"):
        STCABlock.from_schema(schema, d_model=8)


def _epoch(model, loader, optimizer=None):
    losses = []
    for inputs, targets in loader:
        out = model(inputs, targets=targets, training=True)
        if optimizer is not None:
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
        losses.append(float(out["loss"]))
    return float(np.mean(losses))


def test_plain_loop_single_task_masks_padding_and_learns(requests_dataset):
    from merlin_longseq.t4r import request_dataloader

    dataset, _ = requests_dataset
    loader = request_dataloader(dataset, batch_size=16, label_columns=["click"])
    model, block = build_model(dataset, ["click"])
    inputs, targets = next(iter(loader))
    model.train()
    out = model(inputs, targets=targets, training=True)
    real = inputs["cand_item_id"] != 0
    # predictions and labels cover the real candidates only, in request order
    assert out["predictions"].shape == out["labels"].shape == (int(real.sum()),)
    torch.testing.assert_close(out["labels"], targets["click"][real].float())
    expected = torch.nn.functional.binary_cross_entropy(out["predictions"], out["labels"])
    torch.testing.assert_close(out["loss"], expected)
    assert torch.equal(block.candidate_mask, real)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = _epoch(model, loader)
    for _ in range(3):
        _epoch(model, loader, optimizer)
    after = _epoch(model, loader)
    assert after < before - 0.02, (before, after)

    model.eval()
    with torch.no_grad():
        probabilities = model(inputs)  # inference: [B, C] with padded candidates at 0
    assert probabilities.shape == inputs["cand_item_id"].shape
    assert bool((probabilities[~real] == 0).all()) and bool((probabilities[real] > 0).all())


def test_two_label_multitask_and_model_evaluate(requests_dataset):
    from merlin_longseq.t4r import request_dataloader

    dataset, _ = requests_dataset
    loader = request_dataloader(dataset, batch_size=16, label_columns=["click", "like"], shuffle=True)
    model, _ = build_model(dataset, ["click", "like"])
    inputs, targets = next(iter(loader))
    out = model(inputs, targets=targets, training=True)
    real = inputs["cand_item_id"] != 0
    assert set(out["predictions"]) == {"click/request_binary_classification_task",
                                       "like/request_binary_classification_task"}
    torch.testing.assert_close(out["labels"]["like/request_binary_classification_task"],
                               targets["like"][real].float())

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    before = _epoch(model, loader)
    for _ in range(3):
        _epoch(model, loader, optimizer)
    after = _epoch(model, loader)
    assert after < before - 0.02, (before, after)

    assert set(model.input_schema.column_names) == {"hist_item_id", "hist_action", "hist_timestamp", "cand_item_id",
                                                    "request_time", "user_id"}  # labels are not inputs
    metrics = model.evaluate(loader, verbose=False)  # T4R's own evaluation loop over the same loader
    auroc = metrics["eval_like/request_binary_classification_task"][
        "like/request_binary_classification_task/binary_auroc"]
    assert 0.0 <= float(auroc) <= 1.0
    model.eval()
    with torch.no_grad():
        scores = model(inputs)
    assert {k: v.shape for k, v in scores.items()} == {k: real.shape for k in out["predictions"]}


def test_t4r_trainer_trains_and_evaluates(requests_dataset, tmp_path):
    import transformers4rec.torch as tr

    from merlin_longseq.t4r import request_dataloader

    dataset, _ = requests_dataset
    train = request_dataloader(dataset, batch_size=16, label_columns=["click", "like"], shuffle=True)
    evaluation = request_dataloader(dataset, batch_size=32, label_columns=["click", "like"])
    model, _ = build_model(dataset, ["click", "like"])
    args = tr.trainer.T4RecTrainingArguments(
        output_dir=str(tmp_path), max_steps=40, learning_rate=1e-2, per_device_train_batch_size=16,
        per_device_eval_batch_size=32, report_to=[], logging_steps=10, save_strategy="no", no_cuda=True,
        disable_tqdm=True,
    )
    trainer = tr.Trainer(model=model, args=args, train_dataloader=train, eval_dataloader=evaluation,
                         compute_metrics=True)
    start = trainer.evaluate()["eval_/loss"]
    trainer.train()
    end = trainer.evaluate()
    assert end["eval_/loss"] < start - 0.02, (start, end["eval_/loss"])
    assert "eval_/click/request_binary_classification_task/binary_auroc" in end


def test_block_input_errors(requests_dataset):
    from merlin_longseq.t4r import request_dataloader

    dataset, _ = requests_dataset
    model, block = build_model(dataset, ["click"])
    inputs, targets = next(iter(request_dataloader(dataset, batch_size=8, label_columns=["click"])))
    with pytest.raises(RequestError, match="needs the input column .hist_action."):
        block({k: v for k, v in inputs.items() if k != "hist_action"})
    with pytest.raises(RequestError, match="pad_value=0"):
        block({**inputs, "cand_item_id": inputs["cand_item_id"].double()})
    with pytest.raises(ValueError, match="aligned with cand_item_id"):
        model(inputs, targets={"click": targets["click"][:, :1]}, training=True)
