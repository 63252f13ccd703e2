"""Mean-pooling baseline: the model against a per-request Python reference, request batching invariance,
input errors, and the Transformers4Rec MeanPoolBlock trained with the real request loader."""
import numpy as np
import pytest
import torch

from merlin_longseq.jagged import JaggedInputError, offsets_from_lengths
from merlin_longseq.models.pooling import MeanPoolConfig, MeanPoolModel

NUM_ITEMS = 30


def random_batch(hist_lengths, cand_lengths, seed=0, num_users=0):
    g = torch.Generator().manual_seed(seed)
    n, c = sum(hist_lengths), sum(cand_lengths)
    batch = dict(
        hist_item_ids=torch.randint(1, NUM_ITEMS + 1, (n,), generator=g),
        hist_actions=torch.randint(0, 4, (n,), generator=g),
        hist_timestamps=torch.randint(0, 1000, (n,), generator=g),
        hist_offsets=offsets_from_lengths(torch.tensor(hist_lengths)),
        request_time=torch.full((len(hist_lengths),), 2000),
        cand_item_ids=torch.randint(1, NUM_ITEMS + 1, (c,), generator=g),
        cand_offsets=offsets_from_lengths(torch.tensor(cand_lengths)),
    )
    if num_users:
        batch["user_ids"] = torch.randint(1, num_users + 1, (len(hist_lengths),), generator=g)
    return batch


def reference_logits(model, batch):
    """Per request, per candidate, written out: mean of (item + action) embeddings, then tower and heads."""
    out = []
    h, c = batch["hist_offsets"].tolist(), batch["cand_offsets"].tolist()
    for r in range(len(h) - 1):
        items, actions = batch["hist_item_ids"][h[r]:h[r + 1]], batch["hist_actions"][h[r]:h[r + 1]]
        if len(items):
            pooled = (model.item_embedding.weight[items] + model.tokenizer.action_embedding.weight[actions]).mean(0)
        else:
            pooled = torch.zeros(model.cfg.d_model)
        for item in batch["cand_item_ids"][c[r]:c[r + 1]]:
            target = model.item_embedding.weight[item]
            features = [pooled, target, pooled * target]
            if model.user_embedding is not None:
                features.append(model.user_embedding.weight[batch["user_ids"][r]])
            out.append(model.heads(model.tower(torch.cat(features))))
    return torch.stack(out)


@pytest.mark.parametrize("num_users", [0, 5])
def test_matches_per_request_reference_with_empty_history(num_users):
    torch.manual_seed(0)
    model = MeanPoolModel(MeanPoolConfig(num_items=NUM_ITEMS, num_users=num_users, d_model=8, mlp_dims=(12, 6),
                                         tasks=("click", "like")))
    # the padding rows are zero at init: give them values so a wrong mask would show
    with torch.no_grad():
        model.tokenizer.action_embedding.weight.normal_()
    batch = random_batch([5, 0, 1, 7], [3, 2, 1, 4], num_users=num_users)
    logits = model(**batch)
    assert logits.shape == (10, 2)
    torch.testing.assert_close(logits, reference_logits(model, batch))


def test_requests_are_independent_and_gradients_flow():
    torch.manual_seed(0)
    model = MeanPoolModel(MeanPoolConfig(num_items=NUM_ITEMS, d_model=8, mlp_dims=(8,)))
    batch = random_batch([4, 6, 2], [2, 3, 1], seed=1)
    together = model(**batch)
    h, c = batch["hist_offsets"].tolist(), batch["cand_offsets"].tolist()
    alone = []
    for r in range(3):
        one = dict(hist_item_ids=batch["hist_item_ids"][h[r]:h[r + 1]],
                   hist_actions=batch["hist_actions"][h[r]:h[r + 1]],
                   hist_timestamps=batch["hist_timestamps"][h[r]:h[r + 1]],
                   hist_offsets=torch.tensor([0, h[r + 1] - h[r]]), request_time=batch["request_time"][r:r + 1],
                   cand_item_ids=batch["cand_item_ids"][c[r]:c[r + 1]], cand_offsets=torch.tensor([0, c[r + 1] - c[r]]))
        alone.append(model(**one))
    torch.testing.assert_close(together, torch.cat(alone))
    together.sum().backward()
    assert model.item_embedding.weight.grad.abs().sum() > 0 and model.tokenizer.action_embedding.weight.grad.abs().sum() > 0
    assert model.item_embedding.weight.grad[0].abs().sum() == 0  # padding row stays put


def test_headless_model_gives_hidden_and_refuses_scores():
    model = MeanPoolModel(MeanPoolConfig(num_items=NUM_ITEMS, d_model=8, mlp_dims=(8, 4), tasks=()))
    batch = random_batch([3, 2], [2, 2])
    state = model.encode_user(**{k: v for k, v in batch.items() if k.startswith("hist") or k == "request_time"})
    assert model.candidate_hidden(state, batch["cand_item_ids"], batch["cand_offsets"]).shape == (4, 4)
    with pytest.raises(RuntimeError, match="headless"):
        model.score_candidates(state, batch["cand_item_ids"], batch["cand_offsets"])


def test_length_sampler_only_in_training():
    from merlin_longseq.extrapolation import BetaLengthSampler

    torch.manual_seed(0)
    model = MeanPoolModel(MeanPoolConfig(num_items=NUM_ITEMS, d_model=8, mlp_dims=(8,),
                                         length_sampler=BetaLengthSampler(max_train_len=2, min_len=1)))
    batch = random_batch([9, 9], [2, 2], seed=3)
    model.eval()
    full = model(**batch)
    torch.testing.assert_close(full, reference_logits(model, batch))  # inference: the full history
    model.train()
    assert not torch.allclose(model(**batch), full)  # training: at most the 2 most recent events


def assert_rejects_bad_requests(model):
    """The request input checks every pooling model (mean pooling, DIN) inherits; model has num_users=3."""
    batch = random_batch([3, 2], [2, 2], num_users=3)
    with pytest.raises(JaggedInputError, match="hist_offsets"):
        model(**{**batch, "hist_offsets": torch.tensor([0, 3, 4])})
    with pytest.raises(JaggedInputError, match="hist_item_ids must lie in"):
        model(**{**batch, "hist_item_ids": batch["hist_item_ids"] + NUM_ITEMS})
    with pytest.raises(JaggedInputError, match="1-D integer"):
        model(**{**batch, "cand_item_ids": batch["cand_item_ids"].float()})
    with pytest.raises(JaggedInputError, match="cand_offsets describe 1 requests"):
        model(**{**batch, "cand_offsets": torch.tensor([0, 4])})
    with pytest.raises(JaggedInputError, match="reads user ids"):
        model(**{k: v for k, v in batch.items() if k != "user_ids"})


def test_bad_inputs_raise_clear_errors():
    assert_rejects_bad_requests(MeanPoolModel(MeanPoolConfig(num_items=NUM_ITEMS, d_model=8, num_users=3)))
    with pytest.raises(ValueError, match="num_items"):
        MeanPoolConfig(num_items=0)
    with pytest.raises(ValueError, match="dropout"):
        MeanPoolConfig(num_items=3, dropout=1.0)
    with pytest.raises(ValueError, match="unique"):
        MeanPoolConfig(num_items=3, tasks=("a", "a"))


# ---- Transformers4Rec ---------------------------------------------------------------------------------------------
@pytest.mark.merlin
def test_t4r_block_trains_with_the_request_loader(tmp_path):
    import merlin.io
    import pandas as pd
    import transformers4rec.torch as tr
    from merlin.schema import Tags

    from merlin_longseq.t4r import MeanPoolBlock
    from merlin_longseq.t4r.request import RequestBinaryClassificationTask, request_dataloader

    # a label the mean can read: click iff the candidate's item is in the history
    rng = np.random.default_rng(0)
    rows = []
    for request in range(96):
        history = rng.integers(1, NUM_ITEMS + 1, size=int(rng.integers(0, 12)))
        candidates = rng.choice(np.arange(1, NUM_ITEMS + 1), size=int(rng.integers(1, 7)), replace=False)
        rows.append(dict(user_id=request % 10 + 1, request_time=10_000, hist_item_id=history,
                         hist_action=np.ones_like(history), hist_timestamp=np.arange(len(history)),
                         cand_item_id=candidates, click=np.isin(candidates, history).astype(np.int64)))
    pd.DataFrame(rows).to_parquet(tmp_path / "part.parquet")
    dataset = merlin.io.Dataset(str(tmp_path), engine="parquet")
    schema = dataset.schema
    for name in ("hist_item_id", "cand_item_id"):
        schema[name] = schema[name].with_dtype(np.int64).with_tags([Tags.ITEM_ID, Tags.CATEGORICAL, Tags.LIST]) \
            .with_properties({"domain": {"min": 0, "max": NUM_ITEMS}})
    for name in ("hist_action", "hist_timestamp", "click"):
        schema[name] = schema[name].with_dtype(np.int64)
    dataset.schema = schema

    block = MeanPoolBlock.from_schema(schema, use_user_id=False, num_actions=1, d_model=16, mlp_dims=(16,))
    assert block.config.tasks == () and block.output_size() == [None, None, 16]
    model = tr.Model(tr.Head(block, [RequestBinaryClassificationTask("click")]))
    loader = request_dataloader(dataset, batch_size=16, label_columns=["click"])
    batches = list(loader)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def epoch(train):
        losses = []
        for inputs, targets in batches:
            out = model(inputs, targets=targets, training=True)
            if train:
                optimizer.zero_grad()
                out["loss"].backward()
                optimizer.step()
            losses.append(float(out["loss"]))
        return np.mean(losses)

    model.train()
    before = epoch(False)
    for _ in range(8):
        epoch(True)
    assert epoch(False) < before - 0.05
    inputs, _ = batches[0]
    model.eval()
    with torch.no_grad():
        probabilities = model(inputs)
    real = inputs["cand_item_id"] != 0
    assert probabilities.shape == real.shape and bool((probabilities[~real] == 0).all())
