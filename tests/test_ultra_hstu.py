"""ULTRA-HSTU ranking: the delta-query form (history encoded once, candidates against its cached keys/values)
equals the HSTU encoder run over each request's whole [history | candidates] sequence with the candidates as
targets, with and without semi-local attention and attention truncation; it learns a history signal."""
from __future__ import annotations

import pytest
import torch

from merlin_longseq.models.hstu import HSTUEncoder
from merlin_longseq.models.ultra_hstu import ULTRAHSTUConfig, ULTRAHSTUModel
from merlin_longseq.request import RequestBatch
from request_factory import random_requests

NUM_ITEMS = 30


def requests(lengths, candidates, seed=0) -> RequestBatch:
    return random_requests(lengths, candidates, num_items=NUM_ITEMS, seed=seed, max_time=5_000,
                           request_times=[6_000 + 1_000 * r for r in range(len(lengths))])


def full_sequence_logits(model: ULTRAHSTUModel, batch: RequestBatch) -> torch.Tensor:
    """The plain way: one sequence per request, history then candidates, HSTUEncoder with num_targets."""
    encoder = HSTUEncoder(model.hstu_cfg)
    encoder.stacks[0].load_state_dict(model.layers.state_dict())
    encoder.output_norm.load_state_dict(model.output_norm.state_dict())
    encoder.eval()
    history = model.tokenizer(model.item_embedding(batch.hist_item_ids), batch.hist_actions, batch.hist_timestamps,
                              batch.hist_offsets, batch.request_time)
    targets = model.item_embedding(batch.cand_item_ids)
    tokens, times, lengths = [], [], []
    for r in range(batch.num_requests):
        h0, h1 = int(batch.hist_offsets[r]), int(batch.hist_offsets[r + 1])
        c0, c1 = int(batch.cand_offsets[r]), int(batch.cand_offsets[r + 1])
        tokens += [history[h0:h1], targets[c0:c1]]
        times += [batch.hist_timestamps[h0:h1], batch.request_time[r].repeat(c1 - c0)]
        lengths.append(h1 - h0 + c1 - c0)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    out = encoder(torch.cat(tokens), offsets, timestamps=torch.cat(times), num_targets=batch.candidate_counts)
    is_target = torch.cat([torch.arange(n) >= n - c for n, c in zip(lengths, batch.candidate_counts.tolist())])
    final = out[is_target]
    return model.heads(model.tower(torch.cat([final, targets, final * targets], dim=-1)))


@pytest.mark.parametrize("options", [
    {}, {"local_window": 3, "global_prefix": 1}, {"truncated_layers": 1, "truncated_len": 4},
    {"num_time_buckets": 0, "num_position_buckets": 0}, {"qk_activation": "linear"},
])
def test_delta_query_equals_the_full_sequence_with_targets(options):
    torch.manual_seed(0)
    cfg = ULTRAHSTUConfig(num_items=NUM_ITEMS, d_model=16, n_heads=2, n_layers=2, max_seq_len=32,
                          tasks=("click", "like"), backend="pytorch", **options)
    model = ULTRAHSTUModel(cfg).eval()
    with torch.no_grad():  # random, non-zero action / bias tables: every term of the score is exercised
        model.tokenizer.action_embedding.weight.normal_()
        for layer in model.layers:
            for bias in (layer.pos_bias, layer.time_bias):
                if bias is not None:
                    bias.normal_()
    batch = requests([7, 0, 12, 1], [3, 2, 4, 1])
    with torch.no_grad():
        delta = model(**batch.model_inputs)
        full = full_sequence_logits(model, batch)
    torch.testing.assert_close(delta, full, atol=1e-5, rtol=1e-5)


def test_linear_qk_lets_scores_go_negative_and_rejects_unknown_activations():
    """qk_activation="linear": Q and K keep their sign (SiLU'd ones are > -0.28 per entry), U and V stay SiLU'd."""
    torch.manual_seed(0)
    x = torch.randn(50, 16)
    silu_model = ULTRAHSTUModel(ULTRAHSTUConfig(num_items=NUM_ITEMS, d_model=16, max_seq_len=32, backend="pytorch"))
    linear_model = ULTRAHSTUModel(ULTRAHSTUConfig(num_items=NUM_ITEMS, d_model=16, max_seq_len=32, backend="pytorch",
                                                  qk_activation="linear"))
    linear_model.load_state_dict(silu_model.state_dict())
    u, q, k, v = silu_model.layers[0].project(x)
    u2, q2, k2, v2 = linear_model.layers[0].project(x)
    torch.testing.assert_close(u2, u)
    torch.testing.assert_close(v2, v)
    torch.testing.assert_close(torch.nn.functional.silu(q2), q)
    torch.testing.assert_close(torch.nn.functional.silu(k2), k)
    assert q.min() > -0.28 and q2.min() < -0.5
    with pytest.raises(ValueError, match="qk_activation"):
        ULTRAHSTUConfig(num_items=NUM_ITEMS, qk_activation="relu")


def test_mixed_precision_runs_in_bf16_and_follows_fp32():
    """mixed_precision=True: the user state is kept in bf16, logits come back float32 and close to fp32 ones."""
    torch.manual_seed(0)
    cfg = ULTRAHSTUConfig(num_items=NUM_ITEMS, d_model=16, n_heads=2, n_layers=2, max_seq_len=32,
                          tasks=("click",), backend="pytorch")
    full = ULTRAHSTUModel(cfg).eval()
    mixed = ULTRAHSTUModel(ULTRAHSTUConfig(**{**cfg.__dict__, "mixed_precision": True})).eval()
    mixed.load_state_dict(full.state_dict())
    batch = requests([7, 0, 12, 1], [3, 2, 4, 1])
    with torch.no_grad():
        state = mixed.encode_user(**batch.history)
        assert all(k.dtype == torch.bfloat16 for k in state.keys)
        low = mixed.score_candidates(state, batch.cand_item_ids, batch.cand_offsets)
        high = full(**batch.model_inputs)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, high, atol=5e-2, rtol=5e-2)
    assert not torch.equal(low, high)  # it did run in bf16


def test_candidates_never_see_each_other_and_gradients_reach_every_layer():
    torch.manual_seed(0)
    model = ULTRAHSTUModel(ULTRAHSTUConfig(num_items=NUM_ITEMS, d_model=16, max_seq_len=32, backend="pytorch"))
    batch = requests([6, 4], [3, 2])
    logits = model(**batch.model_inputs)
    swapped = batch.model_inputs
    swapped["cand_item_ids"] = batch.cand_item_ids[[2, 1, 0, 4, 3]]
    model.eval()
    with torch.no_grad():
        a, b = model(**batch.model_inputs), model(**swapped)
    torch.testing.assert_close(b, a[[2, 1, 0, 4, 3]])
    logits.sum().backward()
    for layer in model.layers:
        assert layer.uvqk.weight.grad.abs().sum() > 0


def test_learns_a_history_signal():
    """Clicks go to candidates the user has met before: only a model that reads the history can tell."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = ULTRAHSTUModel(ULTRAHSTUConfig(num_items=NUM_ITEMS, d_model=16, max_seq_len=16, backend="pytorch"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch_and_labels(seed):
        batch = requests([12] * 16, [4] * 16, seed=seed)
        seen = [set(batch.hist_item_ids[batch.hist_offsets[r]:batch.hist_offsets[r + 1]].tolist())
                for r in range(16)]
        cands = batch.cand_item_ids.clone()
        for c in range(0, cands.numel(), 2):  # half the candidates come from the history
            r = c // 4
            cands[c] = list(seen[r])[int(torch.randint(len(seen[r]), (1,), generator=g))]
        labels = torch.tensor([float(int(cands[c]) in seen[c // 4]) for c in range(cands.numel())])
        batch.cand_item_ids = cands
        return batch, labels

    for step in range(250):
        batch, labels = batch_and_labels(step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**batch.model_inputs)[:, 0], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    batch, labels = batch_and_labels(999)
    with torch.no_grad():
        scores = model(**batch.model_inputs)[:, 0]
    positives, negatives = scores[labels == 1], scores[labels == 0]
    auc = (positives[:, None] > negatives[None, :]).float().mean()
    assert auc > 0.85, float(auc)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_with_the_triton_kernel_matches_the_cpu_reference(dtype):
    """On CUDA the history runs through the Triton HSTU kernel (backend auto); scores and gradients follow the
    CPU PyTorch reference."""
    torch.manual_seed(0)
    cfg = ULTRAHSTUConfig(num_items=NUM_ITEMS, d_model=64, n_heads=2, n_layers=2, max_seq_len=512,
                          local_window=64, global_prefix=4)
    model = ULTRAHSTUModel(cfg)
    batch = requests([300, 0, 77, 1, 129], [8, 3, 1, 16, 5])
    cpu = model(**batch.model_inputs)
    cpu.sum().backward()
    cpu_grad = model.item_embedding.weight.grad.clone()
    model.zero_grad()
    gpu_model = model.cuda()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is torch.bfloat16):
        gpu = gpu_model(**batch.to("cuda").model_inputs)
    gpu.float().sum().backward()
    tol = dict(atol=2e-4, rtol=2e-4) if dtype is torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(gpu.float().cpu(), cpu.detach(), **tol)
    torch.testing.assert_close(gpu_model.item_embedding.weight.grad.cpu(), cpu_grad,
                               **(tol if dtype is torch.float32 else dict(atol=1e-1, rtol=1e-1)))
