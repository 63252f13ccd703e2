"""DIN-style target attention: the model against a per-candidate Python reference, RLB == each candidate scored
alone, padding invariance of the T4R block, empty and length-1 histories, a float64 gradient check, input
errors, and a planted target-history interaction that DIN learns and mean pooling cannot."""
import numpy as np
import pytest
import torch

from merlin_longseq.jagged import JaggedInputError, offsets_from_lengths
from merlin_longseq.metrics import auc
from merlin_longseq.models.din import DINConfig, DINModel, candidate_history_pairs, target_weighted_pool
from merlin_longseq.models.pooling import MeanPoolConfig, MeanPoolModel
from merlin_longseq.models.stca import per_target_layout

from test_pooling import NUM_ITEMS, assert_rejects_bad_requests, random_batch  # shared with mean pooling


def make_model(**fields):
    torch.manual_seed(0)
    model = DINModel(DINConfig(num_items=NUM_ITEMS, d_model=8, attention_dims=(8,), mlp_dims=(12, 6), **fields))
    with torch.no_grad():  # the action table's padding row is zero at init: give it values so a mask bug shows
        model.tokenizer.action_embedding.weight.normal_()
    return model


def reference_logits(model, batch):
    """Written out per request, per candidate, per event: w_j = a([h, c, h - c, h * c]), sum_j w_j h_j, tower."""
    out = []
    h, c = batch["hist_offsets"].tolist(), batch["cand_offsets"].tolist()
    emb_item, emb_action = model.item_embedding.weight, model.tokenizer.action_embedding.weight
    for r in range(len(h) - 1):
        tokens = [emb_item[i] + emb_action[a] for i, a in zip(batch["hist_item_ids"][h[r]:h[r + 1]],
                                                               batch["hist_actions"][h[r]:h[r + 1]])]
        for item in batch["cand_item_ids"][c[r]:c[r + 1]]:
            target = emb_item[item]
            interest = torch.zeros(model.cfg.d_model)
            for token in tokens:
                weight = model.attention.mlp(torch.cat([token, target, token - target, token * target])[None])[0]
                interest = interest + weight * token
            features = [interest, target, interest * target]
            if model.user_embedding is not None:
                features.append(model.user_embedding.weight[batch["user_ids"][r]])
            out.append(model.heads(model.tower(torch.cat(features))))
    return torch.stack(out)


@pytest.mark.parametrize("num_users", [0, 4])
def test_matches_per_candidate_reference_with_empty_and_length_one_histories(num_users):
    model = make_model(num_users=num_users, tasks=("click", "like"))
    batch = random_batch([5, 0, 1, 7], [3, 2, 1, 4], num_users=num_users)
    logits = model(**batch)
    assert logits.shape == (10, 2)
    torch.testing.assert_close(logits, reference_logits(model, batch))


def test_rlb_equals_each_candidate_scored_alone():
    model = make_model()
    batch = random_batch([6, 3, 0, 9], [4, 1, 2, 3], seed=1)
    together = model(**batch)
    # the naive layout (every candidate its own request with a copy of the history) in one call ...
    torch.testing.assert_close(together, model(**per_target_layout(**batch)))
    # ... and every candidate in a call of its own
    h, c = batch["hist_offsets"].tolist(), batch["cand_offsets"].tolist()
    alone = []
    for r in range(4):
        for t in range(c[r], c[r + 1]):
            alone.append(model(hist_item_ids=batch["hist_item_ids"][h[r]:h[r + 1]],
                               hist_actions=batch["hist_actions"][h[r]:h[r + 1]],
                               hist_timestamps=batch["hist_timestamps"][h[r]:h[r + 1]],
                               hist_offsets=torch.tensor([0, h[r + 1] - h[r]]),
                               request_time=batch["request_time"][r:r + 1],
                               cand_item_ids=batch["cand_item_ids"][t:t + 1], cand_offsets=torch.tensor([0, 1])))
    torch.testing.assert_close(together, torch.cat(alone))


def test_pairs_are_exactly_candidates_times_their_own_history():
    hist_lengths, cand_lengths = [3, 0, 2, 4], [2, 3, 1, 2]
    candidate, event = candidate_history_pairs(offsets_from_lengths(torch.tensor(hist_lengths)),
                                               offsets_from_lengths(torch.tensor(cand_lengths)))
    expected, t, start = [], 0, 0
    for length, count in zip(hist_lengths, cand_lengths):
        for _ in range(count):
            expected += [(t, start + j) for j in range(length)]
            t += 1
        start += length
    assert list(zip(candidate.tolist(), event.tolist())) == expected
    assert len(expected) == sum(h * c for h, c in zip(hist_lengths, cand_lengths))  # not C x total events


def test_all_empty_histories_give_the_target_only_tower():
    model = make_model()
    batch = random_batch([0, 0], [2, 1], seed=2)
    logits = model(**batch)
    target = model.item_embedding(batch["cand_item_ids"])
    zeros = torch.zeros_like(target)
    torch.testing.assert_close(logits, model.heads(model.tower(torch.cat([zeros, target, zeros], dim=-1))))
    assert torch.isfinite(logits).all()


def test_weights_are_not_normalised():
    """DIN keeps the interest intensity: the same event twice counts twice (a softmax would average it away)."""
    model = make_model()
    once = dict(hist_item_ids=torch.tensor([3]), hist_actions=torch.tensor([1]))
    twice = dict(hist_item_ids=torch.tensor([3, 3]), hist_actions=torch.tensor([1, 1]))
    targets = model.item_embedding(torch.tensor([5]))
    pooled = []
    for hist in (once, twice):
        n = hist["hist_item_ids"].numel()
        state = model.encode_user(**hist, hist_timestamps=torch.zeros(n, dtype=torch.long),
                                  hist_offsets=torch.tensor([0, n]), request_time=torch.tensor([1]))
        pooled.append(target_weighted_pool(state.tokens, state.history_offsets, targets, torch.tensor([0, 1]),
                                           model.attention))
    assert pooled[0].abs().sum() > 0
    torch.testing.assert_close(pooled[1], 2 * pooled[0])


def test_pool_gradients_float64():
    torch.manual_seed(0)
    from merlin_longseq.models.din import ActivationUnit

    unit = ActivationUnit(3, (4,)).double()
    tokens = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    history_offsets = offsets_from_lengths(torch.tensor([2, 0, 1, 3]))  # an empty and a length-1 history
    cand_offsets = offsets_from_lengths(torch.tensor([1, 2, 1, 1]))
    assert torch.autograd.gradcheck(
        lambda t, q: target_weighted_pool(t, history_offsets, q, cand_offsets, unit), (tokens, queries))
    # and through the whole model: every table and the activation unit get a gradient, the padding rows none
    model = make_model()
    model(**random_batch([4, 1, 0], [2, 2, 1], seed=3)).sum().backward()
    assert model.item_embedding.weight.grad[1:].abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.attention.parameters())
    assert model.item_embedding.weight.grad[0].abs().sum() == 0


def test_bad_inputs_raise_clear_errors():
    model = DINModel(DINConfig(num_items=NUM_ITEMS, d_model=8, num_users=3))
    assert_rejects_bad_requests(model)
    with pytest.raises(JaggedInputError, match="one width"):
        target_weighted_pool(torch.zeros(3, 4), torch.tensor([0, 3]), torch.zeros(1, 5), torch.tensor([0, 1]),
                             model.attention)
    with pytest.raises(JaggedInputError, match="cand_offsets"):
        target_weighted_pool(torch.zeros(3, 8), torch.tensor([0, 3]), torch.zeros(2, 8), torch.tensor([0, 1]),
                             model.attention)
    with pytest.raises(JaggedInputError, match="requests"):
        candidate_history_pairs(torch.tensor([0, 3]), torch.tensor([0, 1, 2]))
    headless = DINModel(DINConfig(num_items=NUM_ITEMS, d_model=8, tasks=()))
    state = headless.encode_user(**{k: v for k, v in random_batch([2], [1]).items()
                                    if k.startswith("hist") or k == "request_time"})
    with pytest.raises(RuntimeError, match="headless"):
        headless.score_candidates(state, torch.tensor([1]), torch.tensor([0, 1]))
    for bad, match in ((dict(num_items=0), "num_items"), (dict(num_items=3, attention_dims=(0,)), "attention_dims"),
                       (dict(num_items=3, dropout=1.0), "dropout"), (dict(num_items=3, tasks=("a", "a")), "unique"),
                       (dict(num_items=3, d_model=0), "d_model")):
        with pytest.raises(ValueError, match=match):
            DINConfig(**bad)


# ---- learning: a target-history interaction the mean cannot see ----------------------------------------------------
def planted_requests(count, seed):
    """Each history holds distinct items, each with action 1 or 2; the candidates are 2 items of the history seen
    with action 2 (label 1) and 2 seen with action 1 (label 0). The label is the action PAIRED with the candidate
    in the history: a mean of (item + action) tokens is a sum of item and action parts and loses the pairing, and
    every request has two of each label, so nothing else about the request predicts it."""
    rng = np.random.default_rng(seed)
    items, actions, hist_lengths, cands, labels = [], [], [], [], []
    for _ in range(count):
        length = int(rng.integers(6, 13))
        history = rng.choice(np.arange(1, 41), size=length, replace=False)
        action = np.r_[[2, 2, 1, 1], rng.integers(1, 3, size=length - 4)]
        rng.shuffle(action)
        liked, disliked = history[action == 2], history[action == 1]
        cands += [*rng.choice(liked, 2, replace=False), *rng.choice(disliked, 2, replace=False)]
        labels += [1, 1, 0, 0]
        items.append(history), actions.append(action), hist_lengths.append(length)
    n_hist = sum(hist_lengths)
    return dict(hist_item_ids=torch.tensor(np.concatenate(items)), hist_actions=torch.tensor(np.concatenate(actions)),
                hist_timestamps=torch.zeros(n_hist, dtype=torch.long),
                hist_offsets=offsets_from_lengths(torch.tensor(hist_lengths)),
                request_time=torch.ones(count, dtype=torch.long), cand_item_ids=torch.tensor(np.array(cands)),
                cand_offsets=torch.arange(0, 4 * count + 1, 4)), torch.tensor(labels, dtype=torch.float32)


def _slice(batch, start, stop):
    """Requests start..stop-1 of a jagged batch."""
    h, c = batch["hist_offsets"], batch["cand_offsets"]
    hs, he, cs, ce = int(h[start]), int(h[stop]), int(c[start]), int(c[stop])
    return dict(hist_item_ids=batch["hist_item_ids"][hs:he], hist_actions=batch["hist_actions"][hs:he],
                hist_timestamps=batch["hist_timestamps"][hs:he], hist_offsets=h[start:stop + 1] - hs,
                request_time=batch["request_time"][start:stop], cand_item_ids=batch["cand_item_ids"][cs:ce],
                cand_offsets=c[start:stop + 1] - cs), (cs, ce)


def _train_and_score(model, train, train_labels, test, test_labels, epochs=12, requests_per_batch=32):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    count = train["request_time"].numel()
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(epochs):
        for start in rng.permutation(np.arange(0, count, requests_per_batch)):
            batch, (cs, ce) = _slice(train, int(start), min(int(start) + requests_per_batch, count))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**batch)[:, 0], train_labels[cs:ce])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return auc(model(**test)[:, 0].numpy(), test_labels.numpy())


def test_din_learns_a_planted_interaction_that_mean_pooling_cannot():
    train, train_labels = planted_requests(1200, seed=0)
    test, test_labels = planted_requests(300, seed=1)
    torch.manual_seed(0)
    din = DINModel(DINConfig(num_items=40, num_actions=2, d_model=16, attention_dims=(16,), mlp_dims=(16,)))
    torch.manual_seed(0)
    mean = MeanPoolModel(MeanPoolConfig(num_items=40, num_actions=2, d_model=16, mlp_dims=(16,)))
    din_auc = _train_and_score(din, train, train_labels, test, test_labels)
    mean_auc = _train_and_score(mean, train, train_labels, test, test_labels)
    print(f"planted interaction, held-out AUC: din {din_auc:.3f}, mean pooling {mean_auc:.3f}")
    assert din_auc > 0.9, din_auc
    assert mean_auc < 0.6, mean_auc


# ---- Transformers4Rec ---------------------------------------------------------------------------------------------
@pytest.mark.merlin
def test_t4r_block_is_padding_invariant_and_matches_the_core_model():
    from merlin_longseq.t4r import DINBlock

    torch.manual_seed(0)
    block = DINBlock(DINConfig(num_items=NUM_ITEMS, d_model=8, attention_dims=(8,), mlp_dims=(6,)))
    assert block.config.tasks == () and block.output_size() == [None, None, 6]
    assert block.columns.user_id is None  # no user table: the block does not read the column
    hist = torch.tensor([[4, 7, 9, 0], [0, 0, 0, 0], [5, 0, 0, 0]])  # lengths 3, 0, 1
    cands = torch.tensor([[2, 4, 0], [8, 0, 0], [5, 6, 1]])

    def request(hist_pad, cand_pad):
        h = torch.nn.functional.pad(hist, (0, hist_pad))
        return {"hist_item_id": h, "hist_action": (h != 0).long() * 2, "hist_timestamp": h * 10,
                "request_time": torch.full((3, 1), 1000), "cand_item_id": torch.nn.functional.pad(cands, (0, cand_pad))}

    out = block(request(0, 0))
    real = cands != 0
    assert out.shape == (3, 3, 6) and bool((out[~real] == 0).all())
    assert block.candidate_mask.tolist() == real.tolist()
    wider = block(request(5, 2))  # extra padding columns on both lists
    torch.testing.assert_close(wider[:, :3], out)
    assert bool((wider[:, 3:] == 0).all())
    # the block is the core model on the jagged form of the same requests
    state = block.model.encode_user(hist_item_ids=torch.tensor([4, 7, 9, 5]), hist_actions=torch.full((4,), 2),
                                    hist_timestamps=torch.tensor([40, 70, 90, 50]),
                                    hist_offsets=torch.tensor([0, 3, 3, 4]), request_time=torch.full((3,), 1000))
    core = block.model.candidate_hidden(state, cands[real], torch.tensor([0, 2, 3, 6]))
    torch.testing.assert_close(out[real], core)
