import numpy as np
import pytest
import torch

from merlin_longseq.backend import BackendUnavailableError
from merlin_longseq.data.synthetic import SyntheticConfig, generate_impressions
from merlin_longseq.extrapolation import BetaLengthSampler
from merlin_longseq.jagged import JaggedInputError, lengths_from_offsets, offsets_from_lengths
from merlin_longseq.buckets import log2_buckets
from merlin_longseq.models.stca import STCAConfig, STCAModel, per_target_layout

NUM_ITEMS, NUM_USERS = 50, 10


def tiny_config(**overrides):
    values = dict(num_items=NUM_ITEMS, num_actions=3, num_users=NUM_USERS, d_model=16, n_heads=2, n_layers=2,
                  tasks=("click", "like"), mlp_dims=(16,), backend="pytorch")
    values.update(overrides)
    return STCAConfig(**values)


def random_requests(history_lengths, candidate_lengths, seed=0, request_time=10_000):
    gen = torch.Generator().manual_seed(seed)
    n_hist, n_cand = sum(history_lengths), sum(candidate_lengths)
    hist_offsets = offsets_from_lengths(torch.tensor(history_lengths))
    # timestamps increase inside a request and stay strictly before its request time
    gaps = torch.randint(1, 500, (n_hist,), generator=gen)
    timestamps = torch.cat([request_time - torch.flip(torch.cumsum(gaps[a:b], 0), [0])
                            for a, b in zip(hist_offsets[:-1].tolist(), hist_offsets[1:].tolist())] or [gaps[:0]])
    return dict(
        hist_item_ids=torch.randint(1, NUM_ITEMS + 1, (n_hist,), generator=gen),
        hist_actions=torch.randint(0, 4, (n_hist,), generator=gen),
        hist_timestamps=timestamps,
        hist_offsets=hist_offsets,
        request_time=torch.full((len(history_lengths),), request_time),
        cand_item_ids=torch.randint(1, NUM_ITEMS + 1, (n_cand,), generator=gen),
        cand_offsets=offsets_from_lengths(torch.tensor(candidate_lengths)),
        user_ids=torch.randint(1, NUM_USERS + 1, (len(history_lengths),), generator=gen),
    )


def _logits_and_grads(model, fn, batch):
    model.zero_grad()
    logits = fn(**batch)
    weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view(logits.shape)
    (logits * weights).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return logits.detach(), grads


def test_rlb_matches_per_target_outputs_and_gradients():
    model = STCAModel(tiny_config()).double()
    with torch.no_grad():  # move off the init, where zero-initialised weights block some gradients
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = random_requests([6, 0, 11, 3], [3, 2, 1, 5])
    rlb, rlb_grads = _logits_and_grads(model, model.forward, batch)
    naive, naive_grads = _logits_and_grads(model, model.forward_per_target, batch)
    assert rlb.shape == (11, 2)
    torch.testing.assert_close(rlb, naive, rtol=1e-10, atol=1e-10)
    assert set(rlb_grads) == set(naive_grads)
    touched = 0
    for name in rlb_grads:
        torch.testing.assert_close(rlb_grads[name], naive_grads[name], rtol=1e-9, atol=1e-10,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
        touched += bool(rlb_grads[name].abs().sum() > 0)
    assert touched == len(rlb_grads)  # every parameter takes part


def test_per_target_layout_copies_each_history():
    batch = random_requests([2, 3], [2, 1])
    layout = per_target_layout(**batch)
    assert lengths_from_offsets(layout["hist_offsets"]).tolist() == [2, 2, 3]
    assert torch.equal(layout["hist_item_ids"][:2], batch["hist_item_ids"][:2])
    assert torch.equal(layout["hist_item_ids"][2:4], batch["hist_item_ids"][:2])
    assert torch.equal(layout["hist_item_ids"][4:], batch["hist_item_ids"][2:])
    assert layout["user_ids"].tolist() == [batch["user_ids"][0]] * 2 + [batch["user_ids"][1]]


def test_empty_histories_still_score():
    model = STCAModel(tiny_config())
    batch = random_requests([0, 0], [3, 2])
    logits = model(**batch)
    assert logits.shape == (5, 2) and torch.isfinite(logits).all()
    assert logits.std(dim=0).min() > 0  # candidates still differ through their own token
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_variable_candidates_per_request_are_independent():
    model = STCAModel(tiny_config()).eval()
    batch = random_requests([4, 7, 2], [1, 5, 2])
    together = model(**batch)
    assert together.shape == (8, 2)
    hist, cand = batch["hist_offsets"], batch["cand_offsets"]
    for r in range(3):
        alone = model(
            hist_item_ids=batch["hist_item_ids"][hist[r]:hist[r + 1]],
            hist_actions=batch["hist_actions"][hist[r]:hist[r + 1]],
            hist_timestamps=batch["hist_timestamps"][hist[r]:hist[r + 1]],
            hist_offsets=torch.tensor([0, int(hist[r + 1] - hist[r])]),
            request_time=batch["request_time"][r:r + 1],
            cand_item_ids=batch["cand_item_ids"][cand[r]:cand[r + 1]],
            cand_offsets=torch.tensor([0, int(cand[r + 1] - cand[r])]),
            user_ids=batch["user_ids"][r:r + 1],
        )
        torch.testing.assert_close(alone, together[cand[r]:cand[r + 1]], rtol=1e-5, atol=1e-6)


def test_cached_user_state_scores_like_one_shot_forward():
    model = STCAModel(tiny_config()).eval()
    batch = random_requests([5, 0, 9], [2, 3, 4])
    one_shot = model(**batch)
    user_side = {k: batch[k] for k in ("hist_item_ids", "hist_actions", "hist_timestamps", "hist_offsets",
                                       "request_time", "user_ids")}
    with torch.no_grad():
        state = model.encode_user(**user_side)
    assert len(state.keys) == len(state.values) == 2 and state.keys[0].shape == (14, 2, 8)
    cached = model.score_candidates(state, batch["cand_item_ids"], batch["cand_offsets"])
    torch.testing.assert_close(cached, one_shot)
    # the same cached state scores a different candidate set, e.g. a second page of the same requests
    other = torch.tensor([7, 8, 9])
    again = model.score_candidates(state, other, torch.tensor([0, 1, 1, 3]))
    expected = model(**{**batch, "cand_item_ids": other, "cand_offsets": torch.tensor([0, 1, 1, 3])})
    torch.testing.assert_close(again, expected)


def test_length_sampler_truncates_to_recent_suffix_in_training_only():
    sampler = BetaLengthSampler(max_train_len=4, alpha=0.5, beta=1.5, min_len=1)
    model = STCAModel(tiny_config(length_sampler=sampler))
    batch = random_requests([12, 9, 0, 3], [1, 1, 1, 1])
    user_side = {k: batch[k] for k in ("hist_item_ids", "hist_actions", "hist_timestamps", "hist_offsets",
                                       "request_time", "user_ids")}
    full = lengths_from_offsets(batch["hist_offsets"])

    model.train()
    torch.manual_seed(3)
    state = model.encode_user(**user_side)
    kept = lengths_from_offsets(state.history_offsets)
    assert bool((kept <= torch.clamp(full, max=4)).all()) and not torch.equal(kept, full)
    assert kept[2] == 0  # an empty history stays empty

    # the kept events are the most recent suffix: eval on that suffix gives the same keys
    suffix = torch.cat([torch.arange(int(b) - int(n), int(b)) for b, n in zip(batch["hist_offsets"][1:], kept)])
    model.eval()
    reference = model.encode_user(**{**user_side, "hist_offsets": offsets_from_lengths(kept),
                                     **{k: user_side[k][suffix] for k in ("hist_item_ids", "hist_actions",
                                                                           "hist_timestamps")}})
    torch.testing.assert_close(state.keys[1], reference.keys[1])

    # eval: no truncation, and no randomness
    state = model.encode_user(**user_side)
    assert torch.equal(lengths_from_offsets(state.history_offsets), full)
    torch.testing.assert_close(model(**batch), model(**batch))
    no_sampler = STCAModel(tiny_config())
    no_sampler.load_state_dict(model.state_dict())
    torch.testing.assert_close(no_sampler.eval()(**batch), model(**batch))


def test_buckets_extend_past_training_length():
    assert log2_buckets(torch.tensor([0, 1, 2, 3, 4, 7, 8, -5]), 40).tolist() == [0, 1, 2, 2, 3, 3, 4, 0]
    assert log2_buckets(torch.tensor([2 ** 20 - 1, 2 ** 20]), 40).tolist() == [20, 21]
    assert log2_buckets(torch.tensor([2 ** 40, 10 ** 15]), 24).tolist() == [23, 23]
    sampler = BetaLengthSampler(max_train_len=8, min_len=1)
    model = STCAModel(tiny_config(length_sampler=sampler, num_rank_buckets=6, num_time_buckets=12))
    model.train()
    model(**random_requests([20, 5], [2, 2])).sum().backward()  # a training step sees <= 8 events
    model.eval()
    long_batch = random_requests([3000, 1], [4, 2], request_time=4_000_000_000)  # far longer, far older
    long_batch["hist_timestamps"][:10] = 0  # gaps of ~4e9 s, beyond every time bucket
    with torch.no_grad():
        logits = model(**long_batch)
    assert logits.shape == (6, 2) and torch.isfinite(logits).all()


def test_headless_model_gives_tower_outputs():
    model = STCAModel(tiny_config(tasks=(), mlp_dims=(24, 12)))
    batch = random_requests([3, 2], [2, 2])
    state = model.encode_user(*(batch[k] for k in ("hist_item_ids", "hist_actions", "hist_timestamps",
                                                   "hist_offsets", "request_time")), user_ids=batch["user_ids"])
    assert model.candidate_hidden(state, batch["cand_item_ids"], batch["cand_offsets"]).shape == (4, 12)
    assert model.hidden_dim == 12
    with pytest.raises(RuntimeError, match="headless"):
        model(**batch)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest sets it on CPU; here CPU must be refused
    model = STCAModel(tiny_config())
    batch = random_requests([3, 2], [2, 1])

    def call(**changes):
        model(**{**batch, **changes})

    with pytest.raises(JaggedInputError, match="hist_item_ids must be a 1-D integer"):
        call(hist_item_ids=batch["hist_item_ids"].float())
    with pytest.raises(JaggedInputError, match="hist_actions holds 4 values"):
        call(hist_actions=batch["hist_actions"][:4])
    with pytest.raises(JaggedInputError, match="hist_offsets: offsets\\[-1\\]"):
        call(hist_offsets=torch.tensor([0, 3, 4]))
    with pytest.raises(JaggedInputError, match="request_time holds"):
        call(request_time=torch.tensor([1, 2, 3]))
    with pytest.raises(JaggedInputError, match="hist_item_ids must lie in \\[0, 50\\]"):
        call(hist_item_ids=batch["hist_item_ids"] + 100)
    with pytest.raises(JaggedInputError, match="hist_actions must lie"):
        call(hist_actions=batch["hist_actions"] - 5)
    with pytest.raises(JaggedInputError, match="reads user ids"):
        call(user_ids=None)
    with pytest.raises(JaggedInputError, match="cand_offsets describe 1 requests"):
        call(cand_offsets=torch.tensor([0, 3]))
    with pytest.raises(JaggedInputError, match="cand_item_ids must lie in"):
        call(cand_item_ids=batch["cand_item_ids"] + NUM_ITEMS)
    with pytest.raises(JaggedInputError, match="cand_item_ids must be"):
        call(cand_item_ids=batch["cand_item_ids"].view(3, 1))
    with pytest.raises(ValueError, match="num_items"):
        STCAConfig(num_items=0)
    with pytest.raises(ValueError, match="unique"):
        STCAConfig(num_items=5, tasks=("click", "click"))
    with pytest.raises(ValueError, match="unknown backend"):
        STCAConfig(num_items=5, backend="gpu")
    with pytest.raises(BackendUnavailableError):
        STCAModel(tiny_config(backend="triton"))(**batch)  # CPU tensors: an error, never a silent fallback


# ---- learning on synthetic impressions ----------------------------------------------------------------

def rank_auc(scores, labels) -> float:
    """Mann-Whitney AUC from ranks (ties get their average rank)."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).flatten().bool()
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    _, tie_group = torch.unique(scores, return_inverse=True)
    tie_sum = torch.zeros(int(tie_group.max()) + 1, dtype=torch.float64).index_add_(0, tie_group, ranks)
    ranks = (tie_sum / torch.bincount(tie_group).to(torch.float64))[tie_group]
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both classes")
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def test_rank_auc_matches_pair_counting():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=gen).double()  # many ties
    labels = torch.rand(60, generator=gen) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert rank_auc(scores, labels) == pytest.approx(float(pairs.mean()))
    assert rank_auc([0.1, 0.9], [0, 1]) == 1.0


def request_rows(events, impressions, max_history):
    """One dict per request, following the request-grouped data contract."""
    by_user = {int(u): (f["item_id"].to_numpy(), f["timestamp"].to_numpy(), f["action"].to_numpy())
               for u, f in events.groupby("user_id")}
    rows = []
    for request_id, shown in impressions.groupby("request_id", sort=True):
        user, request_time = int(shown["user_id"].iloc[0]), int(shown["request_time"].iloc[0])
        items, times, actions = by_user[user]
        end = int(np.searchsorted(times, request_time, side="left"))  # strictly before the request
        start = max(0, end - max_history)
        rows.append(dict(user_id=user, request_id=int(request_id), request_time=request_time,
                         hist_item_id=items[start:end], hist_timestamp=times[start:end],
                         hist_action=actions[start:end], cand_item_id=shown["item_id"].to_numpy(),
                         click=shown["click"].to_numpy(), like=shown["like"].to_numpy()))
    return rows


def rows_to_batch(rows, tasks=("click", "like")):
    def flat(column):
        return torch.from_numpy(np.concatenate([r[column] for r in rows]).astype(np.int64))

    def offsets(column):
        return offsets_from_lengths(torch.tensor([len(r[column]) for r in rows]))

    batch = dict(hist_item_ids=flat("hist_item_id"), hist_actions=flat("hist_action"),
                 hist_timestamps=flat("hist_timestamp"), hist_offsets=offsets("hist_item_id"),
                 request_time=torch.tensor([r["request_time"] for r in rows]), cand_item_ids=flat("cand_item_id"),
                 cand_offsets=offsets("cand_item_id"), user_ids=torch.tensor([r["user_id"] for r in rows]))
    return batch, torch.stack([flat(t) for t in tasks], dim=1).float()


def test_tiny_model_learns_on_synthetic_impressions():
    data = SyntheticConfig(num_users=300, num_items=100, num_topics=20, interests_per_user=5, min_history=30,
                           max_history=100, seed=0)
    events, impressions = generate_impressions(data, requests_per_user=4, candidates_per_request=16)
    rows = request_rows(events, impressions, max_history=200)
    held_out = np.random.default_rng(0).random(len(rows)) < 0.25
    train = [r for r, h in zip(rows, held_out) if not h]
    test_batch, test_labels = rows_to_batch([r for r, h in zip(rows, held_out) if h])

    torch.manual_seed(0)
    model = STCAModel(STCAConfig(num_items=data.num_items, num_actions=3, d_model=32, n_heads=2, n_layers=2,
                                 tasks=("click", "like"), mlp_dims=(32,), backend="pytorch"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = np.random.default_rng(1)
    for _ in range(4):
        model.train()
        permutation = order.permutation(len(train))
        for start in range(0, len(train), 32):
            batch, labels = rows_to_batch([train[i] for i in permutation[start:start + 32]])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**batch), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(**test_batch)
    aucs = [rank_auc(logits[:, t], test_labels[:, t]) for t in range(2)]
    assert min(aucs) > 0.58 and sum(aucs) / 2 > 0.62, f"held-out AUC (click, like) = {aucs}"
