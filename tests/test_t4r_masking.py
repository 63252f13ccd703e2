"""LengthExtrapolationMasking: causal T4R masking that trains on a Beta-drawn recent window of each session.

Expectations are written from the rule (keep the `w` most recent events of a session of `n`: tokens and labels
only at positions n-w .. n-2, labels = the next item) and checked against plain clm masking where they agree.
"""
import pytest
import torch

from t4r_schema import batch, hstu_model, sequence_schema

pytestmark = pytest.mark.merlin

L = 20
LENGTHS = [20, 15, 3, 2, 9, 1]


def _sessions(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 40, (n,), generator=generator).tolist() for n in LENGTHS]


def _masking(**sampler):
    from merlin_longseq.extrapolation import BetaLengthSampler
    from merlin_longseq.t4r import LengthExtrapolationMasking

    return LengthExtrapolationMasking(hidden_size=4, sampler=BetaLengthSampler(**sampler))


def test_training_keeps_the_most_recent_window_and_labels_only_inside_it():
    from transformers4rec.torch.masking import CausalLanguageModeling

    masking, clm = _masking(max_train_len=6), CausalLanguageModeling(hidden_size=4)
    items = batch(_sessions())["item_id_seq"]
    lengths = torch.tensor(LENGTHS)
    masking.compute_masked_targets(items, training=True)
    windows = masking.window_lengths
    assert bool((windows <= torch.clamp(lengths, max=6)).all())
    assert bool((windows >= torch.clamp(lengths, max=2)).all())  # a window holds at least one (input, label) pair
    assert bool((windows[:2] < lengths[:2]).all())  # the two long sessions are cut
    clm.compute_masked_targets(items, training=True)
    for row, (n, w) in enumerate(zip(LENGTHS, windows.tolist())):
        inside = list(range(n - w, n - 1))
        assert masking.mask_schema[row].nonzero().flatten().tolist() == inside
        assert masking.masked_targets[row, inside].tolist() == items[row, n - w + 1:n].tolist()
        assert masking.masked_targets[row].count_nonzero() == len(inside)
        # inside the window the labels are clm's own
        assert torch.equal(masking.masked_targets[row, inside], clm.masked_targets[row, inside])


def test_evaluation_and_inference_see_the_full_session():
    from transformers4rec.torch.masking import CausalLanguageModeling

    masking, clm = _masking(max_train_len=2), CausalLanguageModeling(hidden_size=4)
    items = batch(_sessions())["item_id_seq"]
    for flags in ({"testing": True}, {}):
        masking.compute_masked_targets(items, **flags)
        clm.compute_masked_targets(items, **flags)
        assert masking.window_lengths is None
        assert torch.equal(masking.mask_schema, clm.mask_schema)
        assert torch.equal(masking.masked_targets, clm.masked_targets)


def test_windows_follow_the_sampler():
    masking = _masking(max_train_len=1000)  # Beta(0.5, 1.5): mean 250 events
    items = torch.ones(4000, 1000, dtype=torch.int64)
    masking.compute_masked_targets(items, training=True)
    assert masking.window_lengths.float().mean().item() == pytest.approx(masking.sampler.mean_length, rel=0.05)


def test_inputs_outside_the_window_carry_no_item_content():
    """Every T4R block sees the mask embedding there (clm replaces positions outside mask_schema)."""
    masking = _masking(max_train_len=3)
    items = batch(_sessions())["item_id_seq"]
    embeddings = torch.randn(*items.shape, 4)
    out = masking(embeddings, item_ids=items, training=True)
    outside = ~masking.mask_schema
    assert torch.equal(out[outside], masking.masked_item_embedding.detach().expand(int(outside.sum()), 4))
    assert torch.equal(out[masking.mask_schema], embeddings[masking.mask_schema])


def test_hstu_block_runs_only_on_the_window_in_training():
    masking = _masking(max_train_len=4)
    model, block = hstu_model(sequence_schema(L), L, d_model=4, masking=masking)
    model.eval()  # dropout off; training=True still drives the masking
    body = model.heads[0].body
    sessions = _sessions()
    times = [[10 * (i + 1) for i in range(len(s))] for s in sessions]
    torch.manual_seed(3)
    hidden = body(batch(sessions, times), training=True)
    windows, tokens = masking.window_lengths.clone(), masking.mask_schema.clone()
    assert bool((hidden[~tokens] == 0).all())
    # change the events older than each window (items and times): nothing the block returns moves
    older = [[(x % 7) + 30 if i < n - w else x for i, x in enumerate(s)]
             for s, n, w in zip(sessions, LENGTHS, windows.tolist())]
    older_times = [[t - 5 if i < n - w else t for i, t in enumerate(row)]
                   for row, n, w in zip(times, LENGTHS, windows.tolist())]
    torch.manual_seed(3)
    assert torch.equal(body(batch(older, older_times), training=True), hidden)
    assert torch.equal(masking.window_lengths, windows)
    # control: an event inside the first window does move the outputs
    n, w = LENGTHS[0], int(windows[0])
    inside = [list(s) for s in sessions]
    inside[0][n - w] = (inside[0][n - w] % 7) + 30
    torch.manual_seed(3)
    assert not torch.allclose(body(batch(inside, times), training=True), hidden)
    # evaluation reads the whole history again: the older events matter
    evaluated = body(batch(sessions, times), testing=True)
    assert not torch.allclose(body(batch(older, older_times), testing=True), evaluated)


def test_registered_and_passed_to_from_schema():
    from transformers4rec.torch.masking import masking_registry

    from merlin_longseq.t4r import LengthExtrapolationMasking
    from t4r_schema import input_module

    assert masking_registry.parse("clm_length_extrapolation") is LengthExtrapolationMasking
    by_name = input_module(sequence_schema(L), L, masking="clm_length_extrapolation").masking
    assert isinstance(by_name, LengthExtrapolationMasking)
    instance = _masking(max_train_len=5)
    assert input_module(sequence_schema(L), L, d_model=4, masking=instance).masking is instance


def test_bad_input_is_rejected():
    from merlin_longseq.jagged import JaggedInputError
    from merlin_longseq.t4r import LengthExtrapolationMasking

    with pytest.raises(TypeError, match="BetaLengthSampler"):
        LengthExtrapolationMasking(hidden_size=4, sampler=10)
    with pytest.raises(JaggedInputError, match="padding must be on the right"):
        _masking(max_train_len=4).compute_masked_targets(torch.tensor([[0, 3, 4]]), training=True)
