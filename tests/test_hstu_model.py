"""HSTUEncoder / EventTokenizer / HSTUNextItemModel: properties that follow from the documented semantics.

Every expectation is built by hand (Python slicing over sequences, the layer modules called directly), never
read back from the encoder's own helpers.
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from merlin_longseq.jagged import JaggedInputError
from merlin_longseq.models.hstu import EventTokenizer, HSTUConfig, HSTUEncoder, HSTUNextItemModel

from naive_hstu import naive_may_attend

D_MODEL = 8
EXACT = dict(rtol=0.0, atol=1e-12)  # float64, untouched rows: only summation noise allowed
CLOSE = dict(rtol=1e-9, atol=1e-10)  # float64, the same computation laid out differently


def make_config(**overrides) -> HSTUConfig:
    values = dict(d_model=D_MODEL, n_heads=2, n_layers=2, max_seq_len=24, dropout=0.0, num_position_buckets=8,
                  num_time_buckets=6, backend="pytorch")
    values.update(overrides)
    return HSTUConfig(**values)


def make_encoder(seed: int, **overrides) -> HSTUEncoder:
    torch.manual_seed(seed)
    encoder = HSTUEncoder(make_config(**overrides)).double().eval()
    with torch.no_grad():
        # the default 0.02 init makes the relative bias nearly invisible; make it matter in every check
        for name, param in encoder.named_parameters():
            if name.endswith("pos_bias") or name.endswith("time_bias"):
                param.normal_(0.0, 0.5)
    return encoder


def offsets_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)


def random_tokens(lengths: list[int], seed: int):
    """x [total, D] float64, offsets, timestamps sorted inside each sequence."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(total, D_MODEL, generator=generator, dtype=torch.float64)
    gaps = torch.randint(0, 40, (total,), generator=generator)
    timestamps = torch.cat([torch.cumsum(g, 0) for g in torch.split(gaps, lengths)]) if total else gaps
    return x, offsets_of(lengths), timestamps


def random_types(lengths: list[int], seed: int, num_types: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_types, (sum(lengths),), generator=generator)


def nudge(seed: int) -> torch.Tensor:
    # random, not constant: LayerNorm ignores a shift shared by every feature
    return torch.randn(D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def seq_slice(offsets: torch.Tensor, b: int) -> slice:
    return slice(int(offsets[b]), int(offsets[b + 1]))


# Encoder variants every structural property must hold for.
VARIANTS = {
    "plain": dict(),
    "bidirectional": dict(causal=False),
    "semi_local": dict(local_window=2, global_prefix=1),
    "truncated": dict(truncated_layers=1, truncated_len=3),
    "mixture": dict(num_transducers=2),
    "mixture_truncated": dict(num_transducers=2, truncated_layers=1, truncated_len=2),
}
CAUSAL_VARIANTS = [name for name in VARIANTS if name != "bidirectional"]


def run(encoder: HSTUEncoder, x, offsets, timestamps, num_targets, token_types):
    # single-stack encoders ignore token_types, so every variant can share one call
    return encoder(x, offsets, timestamps=timestamps, num_targets=num_targets, token_types=token_types)


# ---------------------------------------------------------------- batch independence


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_equals_each_sequence_alone(variant):
    lengths = [5, 0, 3, 8, 1, 6]
    num_targets = torch.tensor([2, 0, 0, 3, 1, 6])
    encoder = make_encoder(10, **VARIANTS[variant])
    x, offsets, timestamps = random_tokens(lengths, seed=11)
    types = random_types(lengths, seed=12)
    batched = run(encoder, x, offsets, timestamps, num_targets, types)
    assert batched.shape == x.shape
    for b, length in enumerate(lengths):
        rows = seq_slice(offsets, b)
        alone = run(encoder, x[rows], offsets_of([length]), timestamps[rows], num_targets[b:b + 1], types[rows])
        torch.testing.assert_close(batched[rows], alone, **CLOSE)


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize("variant", CAUSAL_VARIANTS)
def test_perturbing_a_token_changes_nothing_before_it(variant):
    lengths = [7, 6]
    encoder = make_encoder(20, **VARIANTS[variant])
    x, offsets, timestamps = random_tokens(lengths, seed=21)
    types = random_types(lengths, seed=22)
    base = run(encoder, x, offsets, timestamps, None, types)
    for t in range(lengths[0]):
        perturbed = x.clone()
        perturbed[t] += nudge(t)
        out = run(encoder, perturbed, offsets, timestamps, None, types)
        torch.testing.assert_close(out[:t], base[:t], **EXACT)
        torch.testing.assert_close(out[lengths[0]:], base[lengths[0]:], **EXACT)  # the other sequence
        assert (out[t] - base[t]).abs().max() > 1e-6  # the perturbation is real


def test_bidirectional_encoder_lets_later_history_change_earlier_outputs():
    encoder = make_encoder(23, causal=False)
    x, offsets, timestamps = random_tokens([5], seed=24)
    base = encoder(x, offsets, timestamps)
    perturbed = x.clone()
    perturbed[4] += nudge(25)
    assert (encoder(perturbed, offsets, timestamps)[0] - base[0]).abs().max() > 1e-6


# ---------------------------------------------------------------- targets

TARGET_LENGTHS = [7, 4, 5]
TARGET_COUNTS = torch.tensor([3, 1, 0])


def target_setup(variant: str, seed: int):
    encoder = make_encoder(seed, **VARIANTS[variant])
    x, offsets, timestamps = random_tokens(TARGET_LENGTHS, seed=seed + 1)
    types = random_types(TARGET_LENGTHS, seed=seed + 2)
    return encoder, x, offsets, timestamps, types


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_permuting_targets_permutes_their_outputs(variant):
    encoder, x, offsets, timestamps, types = target_setup(variant, 30)
    base = run(encoder, x, offsets, timestamps, TARGET_COUNTS, types)
    targets = torch.arange(4, 7)  # the 3 targets of sequence 0
    order = torch.tensor([2, 0, 1])
    permuted_rows = torch.arange(x.shape[0])
    permuted_rows[targets] = targets[order]
    # a target keeps its timestamp and type: they are part of the candidate
    out = run(encoder, x[permuted_rows], offsets, timestamps[permuted_rows], TARGET_COUNTS, types[permuted_rows])
    torch.testing.assert_close(out, base[permuted_rows], **CLOSE)
    assert not torch.allclose(base[targets], base[targets[order]])  # the permutation is not trivial


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_changing_one_target_leaves_everything_else_unchanged(variant):
    encoder, x, offsets, timestamps, types = target_setup(variant, 40)
    base = run(encoder, x, offsets, timestamps, TARGET_COUNTS, types)
    changed = 5  # the middle target of sequence 0
    perturbed = x.clone()
    perturbed[changed] = nudge(41)
    out = run(encoder, perturbed, offsets, timestamps, TARGET_COUNTS, types)
    others = torch.tensor([i for i in range(x.shape[0]) if i != changed])
    torch.testing.assert_close(out[others], base[others], **EXACT)
    assert (out[changed] - base[changed]).abs().max() > 1e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_history_outputs_do_not_depend_on_targets(variant):
    encoder, x, offsets, timestamps, types = target_setup(variant, 50)
    base = run(encoder, x, offsets, timestamps, TARGET_COUNTS, types)
    is_target = torch.zeros(x.shape[0], dtype=torch.bool)
    for b, count in enumerate(TARGET_COUNTS.tolist()):
        is_target[int(offsets[b + 1]) - count:int(offsets[b + 1])] = True
    replaced = x.clone()
    replaced[is_target] = torch.randn(int(is_target.sum()), D_MODEL, dtype=torch.float64)
    new_times = timestamps.clone()
    new_times[is_target] += 1000
    new_types = torch.where(is_target, 1 - types, types)
    out = run(encoder, replaced, offsets, new_times, TARGET_COUNTS, new_types)
    torch.testing.assert_close(out[~is_target], base[~is_target], **EXACT)


def test_history_only_sequence_equals_same_sequence_with_targets_dropped():
    encoder = make_encoder(55)
    x, offsets, timestamps = random_tokens([6], seed=56)
    with_targets = encoder(x, offsets, timestamps, num_targets=torch.tensor([2]))
    history_only = encoder(x[:4], offsets_of([4]), timestamps[:4])
    torch.testing.assert_close(with_targets[:4], history_only, **CLOSE)


def test_target_type_is_irrelevant_in_a_mixture():
    encoder, x, offsets, timestamps, types = target_setup("mixture", 57)
    base = encoder(x, offsets, timestamps, TARGET_COUNTS, types)
    flipped = types.clone()
    flipped[4:7] = 1 - flipped[4:7]  # the targets of sequence 0
    torch.testing.assert_close(encoder(x, offsets, timestamps, TARGET_COUNTS, flipped), base, **EXACT)


# ---------------------------------------------------------------- event tokenizer


def test_event_tokenizer_sums_item_and_action_and_hides_target_actions():
    torch.manual_seed(60)
    tokenizer = EventTokenizer(num_items=20, num_actions=4, d_model=D_MODEL)
    offsets = offsets_of([4, 3])
    items = torch.tensor([3, 7, 1, 9, 2, 5, 8])
    actions = torch.tensor([1, 2, 0, 4, 3, 1, 2])
    num_targets = torch.tensor([1, 2])
    tokens = tokenizer(items, actions, offsets, num_targets)
    item_table, action_table = tokenizer.item_embedding.weight, tokenizer.action_embedding.weight
    is_target = [False, False, False, True, False, True, True]
    for i in range(7):
        expected = item_table[items[i]] + (0 if is_target[i] else action_table[actions[i]])
        torch.testing.assert_close(tokens[i], expected)
    assert torch.equal(action_table[0], torch.zeros(D_MODEL))  # action 0 = no action, a zero vector
    with pytest.raises(JaggedInputError, match="action_ids must have the shape of item_ids"):
        tokenizer(items, actions[:-1], offsets)


def test_target_action_cannot_leak_but_history_actions_matter():
    torch.manual_seed(61)
    tokenizer = EventTokenizer(num_items=20, num_actions=4, d_model=D_MODEL).double()
    encoder = make_encoder(62)
    offsets = offsets_of([5, 4])
    items = torch.tensor([3, 7, 1, 9, 2, 5, 8, 4, 6])
    actions = torch.tensor([1, 2, 3, 4, 1, 2, 3, 4, 1])
    num_targets = torch.tensor([2, 1])

    def outputs(action_ids):
        return encoder(tokenizer(items, action_ids, offsets, num_targets), offsets, num_targets=num_targets)

    base = outputs(actions)
    for target in (3, 4, 8):
        leaked = actions.clone()
        leaked[target] = 1 + leaked[target] % 4  # another real action label
        assert torch.equal(outputs(leaked), base)
    for history in (0, 2, 5):
        changed = actions.clone()
        changed[history] = 1 + changed[history] % 4
        out = outputs(changed)
        assert (out[history] - base[history]).abs().max() > 1e-6


# ---------------------------------------------------------------- semi-local attention


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("num_targets", [0, 2])
@pytest.mark.parametrize("window", [(2, 2), (1, 0), (3, 1)], ids=str)
def test_semi_local_influence_pattern_in_one_layer(window, num_targets, causal):
    """In one layer, x_j can reach out_i only through attention (or the residual when i == j)."""
    local_window, global_prefix = window
    length = 10
    encoder = make_encoder(70, n_layers=1, causal=causal, local_window=local_window, global_prefix=global_prefix)
    x, offsets, timestamps = random_tokens([length], seed=71)
    count = torch.tensor([num_targets])
    base = encoder(x, offsets, timestamps, num_targets=count)
    history = length - num_targets
    for j in range(length):
        perturbed = x.clone()
        perturbed[j] += nudge(j)
        # timestamps stay, so only the token content changes
        influence = (encoder(perturbed, offsets, timestamps, num_targets=count) - base).abs().amax(dim=1)
        for i in range(length):
            allowed = i == j or naive_may_attend(i, j, history, causal, local_window, global_prefix)
            if allowed:
                assert influence[i] > 1e-8, f"x[{j}] should reach row {i}"
            else:
                assert influence[i] <= 1e-12, f"x[{j}] leaked into row {i}"


def test_semi_local_window_actually_limits_the_encoder():
    """The same weights with full attention do see the far token: the window, not luck, hides it."""
    full = make_encoder(72, n_layers=1)
    local = make_encoder(72, n_layers=1, local_window=2, global_prefix=1)
    local.load_state_dict(full.state_dict())
    x, offsets, timestamps = random_tokens([8], seed=73)
    perturbed = x.clone()
    perturbed[3] += nudge(74)
    assert (full(perturbed, offsets, timestamps)[7] - full(x, offsets, timestamps)[7]).abs().max() > 1e-6
    assert torch.equal(local(perturbed, offsets, timestamps)[7], local(x, offsets, timestamps)[7])


# ---------------------------------------------------------------- attention truncation

TRUNC_LENGTHS = [8, 2, 0, 6, 4, 5]
TRUNC_TARGETS = torch.tensor([2, 0, 0, 1, 4, 0])
TRUNC_LEN = 3


def kept_rows(offsets, lengths, num_targets, recent):
    """Per sequence: the last `recent` history positions plus every target, as global row indices."""
    rows, kept_lengths = [], []
    for b, length in enumerate(lengths):
        start = int(offsets[b])
        history = length - int(num_targets[b])
        first = max(history - recent, 0)
        rows += list(range(start + first, start + length))
        kept_lengths.append(length - first)
    return torch.tensor(rows, dtype=torch.int64), kept_lengths


def test_truncation_equals_layers_run_by_hand():
    encoder = make_encoder(80, n_layers=2, truncated_layers=1, truncated_len=TRUNC_LEN)
    x, offsets, timestamps = random_tokens(TRUNC_LENGTHS, seed=81)
    got = encoder(x, offsets, timestamps, num_targets=TRUNC_TARGETS)

    first_layer, second_layer = encoder.stacks[0]
    hidden = first_layer(x, offsets, timestamps, TRUNC_TARGETS)
    rows, kept_lengths = kept_rows(offsets, TRUNC_LENGTHS, TRUNC_TARGETS, TRUNC_LEN)
    recent = second_layer(hidden[rows], offsets_of(kept_lengths), timestamps[rows], TRUNC_TARGETS)
    expected = hidden.clone()
    expected[rows] = recent
    torch.testing.assert_close(got, encoder.output_norm(expected), **CLOSE)


def test_old_tokens_get_the_one_layer_output():
    encoder = make_encoder(82, n_layers=2, truncated_layers=1, truncated_len=TRUNC_LEN)
    one_layer = make_encoder(83, n_layers=1)
    one_layer.stacks[0][0].load_state_dict(encoder.stacks[0][0].state_dict())
    one_layer.output_norm.load_state_dict(encoder.output_norm.state_dict())
    x, offsets, timestamps = random_tokens(TRUNC_LENGTHS, seed=84)
    got = encoder(x, offsets, timestamps, num_targets=TRUNC_TARGETS)
    reference = one_layer(x, offsets, timestamps, num_targets=TRUNC_TARGETS)
    rows, _ = kept_rows(offsets, TRUNC_LENGTHS, TRUNC_TARGETS, TRUNC_LEN)
    old = torch.ones(x.shape[0], dtype=torch.bool)
    old[rows] = False
    assert int(old.sum()) == 5 + 2  # sequence 0 has 6 history (3 old), sequence 3 has 5 history (2 old)
    torch.testing.assert_close(got[old], reference[old], **EXACT)


def test_truncation_changes_recent_outputs_of_long_sequences():
    """Against the untruncated encoder with the same weights: only tokens whose context was cut differ."""
    truncated = make_encoder(85, n_layers=2, truncated_layers=1, truncated_len=TRUNC_LEN)
    full = make_encoder(85, n_layers=2)
    full.load_state_dict(truncated.state_dict())
    x, offsets, timestamps = random_tokens(TRUNC_LENGTHS, seed=86)
    a = truncated(x, offsets, timestamps, num_targets=TRUNC_TARGETS)
    b = full(x, offsets, timestamps, num_targets=TRUNC_TARGETS)
    # sequences 1, 4 and 5 have at most L' history tokens: nothing is cut
    for seq in (1, 4):
        rows = seq_slice(offsets, seq)
        torch.testing.assert_close(a[rows], b[rows], **CLOSE)
    last_target_of_first_sequence = int(offsets[1]) - 1
    assert (a[last_target_of_first_sequence] - b[last_target_of_first_sequence]).abs().max() > 1e-6


# ---------------------------------------------------------------- mixture of transducers

MIX_LENGTHS = [7, 5, 0, 4, 3]
MIX_TARGETS = torch.tensor([2, 0, 0, 1, 3])


def mixture_by_hand(encoder, x, offsets, timestamps, lengths, num_targets, types):
    """Each stream = its own tokens + every target; a token's state in a stream = the stream's output at
    the latest member at or before it (zeros if none); concat the streams, mix, normalise."""
    states = []
    for stream, layers in enumerate(encoder.stacks):
        member_rows, member_lengths = [], []
        for b, length in enumerate(lengths):
            start, history = int(offsets[b]), length - int(num_targets[b])
            rows = [start + p for p in range(length) if p >= history or int(types[start + p]) == stream]
            member_rows += rows
            member_lengths.append(len(rows))
        rows_tensor = torch.tensor(member_rows, dtype=torch.int64)
        sub, sub_offsets = x[rows_tensor], offsets_of(member_lengths)
        for layer in layers:
            sub = layer(sub, sub_offsets, timestamps[rows_tensor], num_targets)
        stream_state = []
        for b, length in enumerate(lengths):
            start = int(offsets[b])
            for p in range(start, start + length):
                earlier = [m for m, row in enumerate(member_rows) if start <= row <= p]
                stream_state.append(sub[earlier[-1]] if earlier else x.new_zeros(D_MODEL))
        states.append(torch.stack(stream_state) if stream_state else x.new_zeros(0, D_MODEL))
    return encoder.output_norm(encoder.mix(torch.cat(states, dim=-1)))


@pytest.mark.parametrize("seed", [90, 91, 92])
def test_mixture_equals_streams_run_by_hand(seed):
    encoder = make_encoder(seed, num_transducers=2)
    x, offsets, timestamps = random_tokens(MIX_LENGTHS, seed=seed + 10)
    types = random_types(MIX_LENGTHS, seed=seed + 20)
    got = encoder(x, offsets, timestamps, MIX_TARGETS, types)
    assert got.shape == (sum(MIX_LENGTHS), D_MODEL)
    expected = mixture_by_hand(encoder, x, offsets, timestamps, MIX_LENGTHS, MIX_TARGETS, types)
    torch.testing.assert_close(got, expected, **CLOSE)


def test_mixture_of_three_streams_equals_streams_run_by_hand():
    encoder = make_encoder(93, num_transducers=3, n_layers=1)
    x, offsets, timestamps = random_tokens(MIX_LENGTHS, seed=94)
    types = random_types(MIX_LENGTHS, seed=95, num_types=3)
    got = encoder(x, offsets, timestamps, MIX_TARGETS, types)
    expected = mixture_by_hand(encoder, x, offsets, timestamps, MIX_LENGTHS, MIX_TARGETS, types)
    torch.testing.assert_close(got, expected, **CLOSE)


def perturb_stack(encoder: HSTUEncoder, stream: int) -> HSTUEncoder:
    with torch.no_grad():
        for param in encoder.stacks[stream].parameters():
            param.add_(torch.randn_like(param))
    return encoder


def test_empty_stream_contributes_nothing():
    """All tokens of type 0 and no targets: stream 1 is empty, its stack cannot matter."""
    encoder = make_encoder(100, num_transducers=2)
    x, offsets, timestamps = random_tokens(MIX_LENGTHS, seed=101)
    types = torch.zeros(x.shape[0], dtype=torch.int64)
    base = encoder(x, offsets, timestamps, None, types)
    assert torch.equal(perturb_stack(encoder, 1)(x, offsets, timestamps, None, types), base)
    # and stream 0 alone, padded with a zero state for stream 1, gives the output
    hidden = x
    for layer in encoder.stacks[0]:
        hidden = layer(hidden, offsets, timestamps, None)
    expected = encoder.output_norm(encoder.mix(torch.cat([hidden, torch.zeros_like(hidden)], dim=-1)))
    torch.testing.assert_close(base, expected, **CLOSE)


def test_stream_of_targets_only_touches_only_targets():
    encoder = make_encoder(102, num_transducers=2)
    x, offsets, timestamps = random_tokens(MIX_LENGTHS, seed=103)
    types = torch.zeros(x.shape[0], dtype=torch.int64)
    base = encoder(x, offsets, timestamps, MIX_TARGETS, types)
    out = perturb_stack(encoder, 1)(x, offsets, timestamps, MIX_TARGETS, types)
    is_target = torch.zeros(x.shape[0], dtype=torch.bool)
    for b, count in enumerate(MIX_TARGETS.tolist()):
        is_target[int(offsets[b + 1]) - count:int(offsets[b + 1])] = True
    torch.testing.assert_close(out[~is_target], base[~is_target], **EXACT)
    assert ((out[is_target] - base[is_target]).abs().amax(dim=1) > 1e-6).all()


def test_tokens_before_the_first_token_of_a_stream_ignore_that_stack():
    encoder = make_encoder(104, num_transducers=2)
    x, offsets, timestamps = random_tokens([6, 5], seed=105)
    types = torch.tensor([0, 0, 0, 1, 0, 1, 0, 1, 0, 0, 0])  # first type-1 token: rows 3 and 7
    base = encoder(x, offsets, timestamps, None, types)
    out = perturb_stack(encoder, 1)(x, offsets, timestamps, None, types)
    before = torch.tensor([0, 1, 2, 6])
    after = torch.tensor([3, 4, 5, 7, 8, 9, 10])
    torch.testing.assert_close(out[before], base[before], **EXACT)
    assert ((out[after] - base[after]).abs().amax(dim=1) > 1e-6).all()


def test_a_token_between_two_members_carries_the_earlier_state():
    """With stream 0 switched off in the mix, a type-0 token must repeat the output of the latest type-1
    token before it: its stream-1 state is that token's state."""
    encoder = make_encoder(106, num_transducers=2)
    x, offsets, timestamps = random_tokens([5], seed=107)
    types = torch.tensor([1, 0, 1, 0, 0])
    base = encoder(x, offsets, timestamps, None, types)
    # zero out stack 0's contribution to the mix: only stream 1 is left, and it changes only at type-1 rows
    with torch.no_grad():
        encoder.mix.weight[:, :D_MODEL] = 0
    only_stream_1 = encoder(x, offsets, timestamps, None, types)
    torch.testing.assert_close(only_stream_1[1], only_stream_1[0], **EXACT)
    torch.testing.assert_close(only_stream_1[3], only_stream_1[2], **EXACT)
    torch.testing.assert_close(only_stream_1[4], only_stream_1[2], **EXACT)
    assert not torch.allclose(base[3], base[2])


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("variant", ["plain", "semi_local", "mixture_truncated"])
def test_gradients_reach_every_parameter(variant):
    torch.manual_seed(110)
    encoder = HSTUEncoder(make_config(dropout=0.1, **VARIANTS[variant])).train()
    lengths = [6, 0, 5, 8]
    x, offsets, timestamps = random_tokens(lengths, seed=111)
    x = x.float().requires_grad_()
    types = random_types(lengths, seed=112)
    out = run(encoder, x, offsets, timestamps, torch.tensor([1, 0, 0, 2]), types)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all()
    names = [name for name, _ in encoder.named_parameters()]
    assert any(name.endswith("pos_bias") for name in names) and any(name.endswith("time_bias") for name in names)
    for name, param in encoder.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


LEARNING_RATE = 0.3


def test_next_item_model_learns_a_toy_copy_task():
    """Each sequence repeats a random 3-item pattern, so after the first period the next item is a copy."""
    torch.manual_seed(120)
    num_items = 12
    model = HSTUNextItemModel(num_items, make_config(d_model=16, n_heads=2, n_layers=2, max_seq_len=12))
    generator = torch.Generator().manual_seed(121)
    lengths = [9, 7, 8, 9, 6, 8]
    items = torch.cat([torch.randint(1, num_items + 1, (3,), generator=generator).repeat(3)[:n] for n in lengths])
    offsets = offsets_of(lengths)
    inputs, labels = [], []
    for b in range(len(lengths)):
        rows = list(range(int(offsets[b]), int(offsets[b + 1])))
        inputs += rows[:-1]
        labels += rows[1:]
    inputs, labels = torch.tensor(inputs), torch.tensor(labels)
    losses = []
    for _ in range(30):
        model.zero_grad()
        scores = model.item_scores(model(items, offsets))
        assert torch.isinf(scores[:, 0]).all()  # padding id is never recommended
        loss = F.cross_entropy(scores[inputs], items[labels])
        loss.backward()
        # plain SGD by hand: torch.optim imports torch._dynamo, seconds of test time for nothing here
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:  # time_bias stays unused without timestamps
                    param -= LEARNING_RATE * param.grad
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))  # no NaN
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- TorchScript tracing


@pytest.mark.parametrize("variant", ["plain", "semi_local", "truncated"])
def test_encoder_traces_and_matches_eager(variant):
    encoder = make_encoder(130, **VARIANTS[variant])
    x, offsets, timestamps = random_tokens([5, 0, 7, 3], seed=131)
    num_targets = torch.tensor([1, 0, 2, 0])
    eager = encoder(x, offsets, timestamps, num_targets)
    with warnings.catch_warnings():
        # data-dependent Python ints (lengths, validation) become trace constants; that is expected
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit itself is deprecated upstream
        traced = torch.jit.trace(encoder, (x, offsets, timestamps, num_targets))
    torch.testing.assert_close(traced(x, offsets, timestamps, num_targets), eager, **CLOSE)


@pytest.mark.parametrize("variant", ["plain", "semi_local"])
def test_trace_with_a_full_length_sequence_serves_other_batches(variant):
    """Padding is to the longest sequence, a trace-time constant: trace with one of max_seq_len tokens and
    every later batch pads to that length, which the mask makes harmless."""
    encoder = make_encoder(132, max_seq_len=10, **VARIANTS[variant])
    x, offsets, timestamps = random_tokens([10, 3], seed=133)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(encoder, (x, offsets, timestamps, torch.tensor([2, 0])))
    for seed, (lengths, counts) in enumerate([([4, 0, 9], [1, 0, 3]), ([10], [0]), ([1, 2, 3, 4], [1, 1, 0, 2])]):
        x, offsets, timestamps = random_tokens(lengths, seed=134 + seed)
        num_targets = torch.tensor(counts)
        torch.testing.assert_close(traced(x, offsets, timestamps, num_targets),
                                   encoder(x, offsets, timestamps, num_targets), **CLOSE)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def encoder_and_batch():
    encoder = make_encoder(140)
    x, offsets, timestamps = random_tokens([3, 4], seed=141)
    return encoder, x, offsets, timestamps


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, o, t: dict(x=x[:, :5]), r"x must be \[total, d_model=8\]"),
        (lambda x, o, t: dict(x=x[0]), r"x must be \[total, d_model=8\]"),
        (lambda x, o, t: dict(offsets=torch.tensor([0, 3, 6])), r"offsets\[-1\] = 6 but the values hold 7"),
        (lambda x, o, t: dict(offsets=torch.tensor([0, 4, 3, 7])), "non-decreasing"),
        (lambda x, o, t: dict(x=torch.zeros(30, 8, dtype=torch.float64), offsets=torch.tensor([0, 30]),
                              timestamps=None), "length 30 exceeds max_seq_len = 24"),
        (lambda x, o, t: dict(num_targets=torch.tensor([1, 5])), "num_targets must be"),
        (lambda x, o, t: dict(num_targets=torch.tensor([1])), "num_targets must be"),
        (lambda x, o, t: dict(timestamps=t[:-2]), r"timestamps must be \[total\] = \[7\]"),
    ],
)
def test_encoder_rejects_bad_input(encoder_and_batch, change, message):
    encoder, x, offsets, timestamps = encoder_and_batch
    args = dict(x=x, offsets=offsets, timestamps=timestamps)
    args.update(change(x, offsets, timestamps))
    with pytest.raises(JaggedInputError, match=message):
        encoder(**args)


def test_mixture_needs_valid_token_types():
    encoder = make_encoder(142, num_transducers=2)
    x, offsets, timestamps = random_tokens([3, 4], seed=143)
    with pytest.raises(JaggedInputError, match="num_transducers=2 needs token_types"):
        encoder(x, offsets, timestamps)
    with pytest.raises(JaggedInputError, match="num_transducers=2 needs token_types"):
        encoder(x, offsets, timestamps, token_types=torch.zeros(5, dtype=torch.int64))
    for bad in (2, -1):
        types = torch.zeros(7, dtype=torch.int64)
        types[3] = bad
        with pytest.raises(JaggedInputError, match=r"token_types must lie in \[0, 2\)"):
            encoder(x, offsets, timestamps, token_types=types)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=0), "must be positive"),
        (dict(n_heads=0), "must be positive"),
        (dict(n_layers=0), "must be positive"),
        (dict(max_seq_len=0), "max_seq_len must be >= 1"),
        (dict(attn_dim=-2), "attn_dim must be >= 1"),
        (dict(hidden_dim=0), "hidden_dim must be >= 1"),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\]"),
        (dict(num_position_buckets=-1), "num_position_buckets and num_time_buckets must be >= 0"),
        (dict(local_window=0), "local_window must be >= 1"),
        (dict(global_prefix=-1), "global_prefix must be >= 0"),
        (dict(global_prefix=4), "global_prefix=4 needs local_window"),
        (dict(truncated_layers=3), r"truncated_layers must be in \[0, n_layers=2\]"),
        (dict(truncated_layers=-1), r"truncated_layers must be in \[0, n_layers=2\]"),
        (dict(truncated_layers=1), "truncated_layers > 0 needs truncated_len"),
        (dict(truncated_layers=1, truncated_len=0), "truncated_len must be >= 1"),
        (dict(num_transducers=0), "num_transducers must be >= 1"),
        (dict(backend="cuda"), "unknown backend 'cuda'"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_config_defaults_follow_d_model_and_heads():
    cfg = make_config(d_model=12, n_heads=3)
    assert (cfg.attn_dim, cfg.hidden_dim) == (4, 4)
    assert cfg.alpha == pytest.approx(0.5)


def test_build_takes_the_transformers4rec_signature():
    cfg = HSTUConfig.build(d_model=12, n_head=3, n_layer=4, total_seq_length=50)
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.max_seq_len) == (12, 3, 4, 50)
    # positionally too, as tr.XLNetConfig.build(d_model, n_head, n_layer, total_seq_length)
    assert HSTUConfig.build(12, 3, 4, 50) == cfg
    # HSTU's own dropout default, not T4R's 0.3; an explicit one is kept
    assert cfg.dropout == HSTUConfig().dropout == 0.1
    assert HSTUConfig.build(12, 3, 4, 50, dropout=0.0).dropout == 0.0
    # HSTUConfig fields pass through; T4R keywords without an HSTU meaning are accepted and change nothing
    assert HSTUConfig.build(12, 3, 4, 50, local_window=8).local_window == 8
    ignored = dict(hidden_act="gelu", initializer_range=0.02, layer_norm_eps=1e-3, pad_token=0,
                   log_attention_weights=False, mem_len=1)
    assert HSTUConfig.build(12, 3, 4, 50, **ignored) == cfg
    assert HSTUConfig.build(12, 3, 4, 50, attn_type="uni").causal
    assert not HSTUConfig.build(12, 3, 4, 50, attn_type="bi").causal


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(), ValueError, "needs total_seq_length"),
    (dict(total_seq_length=50, max_seq_len=60), ValueError, "not both"),
    (dict(total_seq_length=50, attn_type="sideways"), ValueError, "attn_type must be"),
    (dict(total_seq_length=50, attn_type="bi", causal=True), ValueError, "contradicts"),
    (dict(total_seq_length=50, n_heads=4), TypeError, "takes T4R's names"),
    (dict(total_seq_length=50, heads=4), TypeError, r"unknown keyword\(s\) \['heads'\]"),
    (dict(total_seq_length=50, global_prefix=2), ValueError, "needs local_window"),
])
def test_build_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        HSTUConfig.build(d_model=8, n_head=2, n_layer=1, **kwargs)
