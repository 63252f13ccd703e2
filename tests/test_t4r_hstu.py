"""HSTUBlock inside a real Transformers4Rec pipeline (tutorial-style model, one changed line), and its T4R
conventions: N fixed from the configuration, timestamps from the schema, save/load, top-k inference."""
import warnings

import numpy as np
import pytest
import torch

from t4r_schema import batch, hstu_model, input_module, sequence_schema

pytestmark = pytest.mark.merlin

L = 24


@pytest.fixture(scope="module")
def etl(tmp_path_factory):
    warnings.filterwarnings("ignore")
    import merlin.io

    from merlin_longseq.data.synthetic import generate_events
    from merlin_longseq.workflows.sequences import run_next_item_etl

    events = generate_events(num_users=48, num_items=120, num_topics=20, interests_per_user=6,
                             min_history=8, max_history=40, seed=3)
    paths = run_next_item_etl(events, str(tmp_path_factory.mktemp("etl")), max_seq_len=L)
    schema = merlin.io.Dataset(paths["train"], engine="parquet").schema.select_by_name(
        ["item_id_seq", "action_seq", "timestamp_seq"])
    return paths, schema


def tutorial_model(schema, swap_in_hstu: bool, masking="clm", **hstu_options):
    import transformers4rec.torch as tr
    from transformers4rec.torch.ranking_metric import NDCGAt, RecallAt

    from merlin_longseq.t4r import HSTUBlock

    input_module = tr.TabularSequenceFeatures.from_schema(
        schema, max_sequence_length=L, aggregation="concat", d_output=16, masking=masking, embedding_dim_default=16)
    transformer_config = tr.XLNetConfig.build(d_model=16, n_head=2, n_layer=2, total_seq_length=L)
    body = tr.SequentialBlock(
        input_module, tr.MLPBlock([16]),
        # the one line a user changes:
        HSTUBlock(transformer_config, inputs=input_module, **hstu_options) if swap_in_hstu
        else tr.TransformerBlock(transformer_config, masking=input_module.masking),
    )
    metrics = [NDCGAt(top_ks=[10], labels_onehot=True), RecallAt(top_ks=[10], labels_onehot=True)]
    head = tr.Head(body, tr.NextItemPredictionTask(weight_tying=True, metrics=metrics), inputs=input_module)
    return tr.Model(head)


def trainer_run(model, schema, paths, tmp_path, epochs=3):
    import transformers4rec.torch as tr
    from transformers4rec.config.trainer import T4RecTrainingArguments

    args = T4RecTrainingArguments(
        output_dir=str(tmp_path), max_sequence_length=L, data_loader_engine="merlin", num_train_epochs=epochs,
        per_device_train_batch_size=16, per_device_eval_batch_size=16, learning_rate=1e-2, report_to=[],
        save_strategy="no", no_cuda=True, disable_tqdm=True, lr_scheduler_type="constant", logging_steps=1)
    trainer = tr.Trainer(model=model, args=args, schema=schema, compute_metrics=True)
    trainer.train_dataset_or_path = paths["train"]
    trainer.eval_dataset_or_path = paths["eval"]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, trainer.evaluate(metric_key_prefix="eval")


def test_tutorial_model_with_xlnet_and_with_hstu_trains_with_t4r_trainer(etl, tmp_path):
    paths, schema = etl
    for swap in (False, True):
        torch.manual_seed(0)
        model = tutorial_model(schema, swap_in_hstu=swap)
        losses, metrics = trainer_run(model, schema, paths, tmp_path / str(swap))
        assert all(np.isfinite(losses))
        assert np.mean(losses[-3:]) < losses[0], f"loss did not fall (hstu={swap}): {losses}"
        assert 0.0 <= metrics["eval_/next-item/recall_at_10"] <= 1.0
    from merlin_longseq.t4r import HSTUBlock

    block = next(m for m in model.modules() if isinstance(m, HSTUBlock))
    # the loader's timestamp column reached the block (a batch without it would have raised)
    assert block.timestamp_column == "timestamp_seq"


def test_hstu_block_trains_in_a_plain_loop_with_the_t4r_loader(etl):
    from transformers4rec.torch.utils.data_utils import MerlinDataLoader

    paths, schema = etl
    torch.manual_seed(0)
    model = tutorial_model(schema, swap_in_hstu=True, local_window=8, global_prefix=2)
    loader = MerlinDataLoader.from_schema(schema, paths["train"], batch_size=16, max_sequence_length=L,
                                          shuffle=False, drop_last=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first_epoch, last_epoch = [], []
    for epoch in range(4):
        for inputs, _ in loader:
            out = model(inputs, training=True)
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            (first_epoch if epoch == 0 else last_epoch).append(out["loss"].item())
    assert np.mean(last_epoch[-3:]) < np.mean(first_epoch)


def _block(schema, **options):
    from merlin_longseq.t4r import HSTUBlock

    model = tutorial_model(schema, swap_in_hstu=True, **options)
    block = next(m for m in model.modules() if isinstance(m, HSTUBlock))
    return model, block


def test_block_takes_padding_from_masking_and_is_causal(etl):
    """Padded positions give zeros; a token's output ignores later tokens and the padding length."""
    paths, schema = etl
    _, block = _block(schema, dropout=0.0, timestamp_column=None)
    block.eval()
    from transformers4rec.torch.masking import CausalLanguageModeling

    # a causal masking module whose schema we set by hand, as T4R sets it for each batch
    masking = CausalLanguageModeling(hidden_size=16)
    block.masking = masking
    lengths = torch.tensor([5, 1, 0, 9])
    x = torch.randn(4, 9, 16)
    masking.mask_schema = torch.arange(9)[None, :] < lengths[:, None]
    out = block(x)
    assert torch.all(out[~masking.mask_schema] == 0)
    # the same sequence alone, padded to a different length, gives the same outputs
    masking.mask_schema = torch.arange(12)[None, :] < torch.tensor([[5]])
    alone = block(torch.cat([x[:1], torch.randn(1, 3, 16)], dim=1))
    torch.testing.assert_close(alone[0, :5], out[0, :5])
    # causality: changing token 3 changes no output before it
    masking.mask_schema = torch.arange(9)[None, :] < lengths[:, None]
    x2 = x.clone()
    x2[0, 3] += torch.randn(16)  # not a constant shift, which LayerNorm would erase
    out2 = block(x2)
    torch.testing.assert_close(out2[0, :3], out[0, :3])
    assert not torch.allclose(out2[0, 3:5], out[0, 3:5])


def test_length_extrapolation_masking_trains_hstu_with_the_t4r_trainer(etl, tmp_path):
    from merlin_longseq.extrapolation import BetaLengthSampler
    from merlin_longseq.t4r import LengthExtrapolationMasking

    paths, schema = etl
    torch.manual_seed(0)
    masking = LengthExtrapolationMasking(hidden_size=16, sampler=BetaLengthSampler(max_train_len=6))
    model = tutorial_model(schema, swap_in_hstu=True, masking=masking)
    seen = []  # (window lengths, session lengths) of every batch the masking handled
    masking.register_forward_hook(lambda module, args, kwargs, out: seen.append(
        (module.window_lengths, (kwargs["item_ids"] != 0).sum(dim=1))), with_kwargs=True)
    losses, metrics = trainer_run(model, schema, paths, tmp_path, epochs=1)
    assert all(np.isfinite(losses))
    assert 0.0 <= metrics["eval_/next-item/recall_at_10"] <= 1.0
    training = [(w, n) for w, n in seen if w is not None]
    assert training and len(training) < len(seen)  # evaluation batches ran on full sessions (no window)
    assert all(bool((w <= 6).all()) and bool((w <= n).all()) for w, n in training)
    assert any(bool((w < n).any()) for w, n in training)  # sessions of the ETL are up to 24 events long


# ------------------------------------------------------------------ without parquet data (hand-written schema)


def test_normaliser_comes_from_the_configuration_and_is_fixed_when_built():
    import transformers4rec.torch as tr

    from merlin_longseq.t4r import HSTUBlock, HSTUConfig

    schema = sequence_schema(12)
    # T4R's XLNetConfig keeps no length: N is the input module's padded session length, taken when built
    _, block = hstu_model(schema, 12)
    assert block.max_seq_len == 12
    inputs = input_module(schema, 12)
    xlnet = tr.XLNetConfig.build(d_model=8, n_head=2, n_layer=1, total_seq_length=12)
    assert HSTUBlock(HSTUConfig.build(8, 2, 1, total_seq_length=40), inputs=inputs).max_seq_len == 40
    gpt2 = tr.GPT2Config.build(d_model=8, n_head=2, n_layer=1, total_seq_length=30)
    assert HSTUBlock(gpt2, inputs=inputs).max_seq_len == 30
    assert HSTUBlock(xlnet, inputs=inputs, max_seq_len=50).max_seq_len == 50  # an explicit N wins
    # an N shorter than the sessions the input module pads to is refused when the block is built
    with pytest.raises(ValueError, match="total_seq_length >= 12"):
        tr.SequentialBlock(inputs, HSTUBlock(HSTUConfig.build(8, 2, 1, total_seq_length=6), inputs=inputs))
    # a block that was never built and has no N refuses to guess one from the batch
    loose = HSTUBlock(xlnet, inputs=inputs, timestamp_column=None)
    with pytest.raises(ValueError, match="pass max_seq_len="):
        loose(torch.randn(1, 3, 8))


def test_session_scores_the_same_alone_and_in_a_longer_padded_batch():
    """T4R pads a batch to its longest session: N must not follow the padded width."""
    model, block = hstu_model(sequence_schema(L), L)
    model.eval()
    body = model.heads[0].body
    session, times = [3, 7, 7, 2, 9], [10, 50, 51, 400, 9000]
    longer, longer_times = [5, 1, 8, 8, 4, 6, 2, 3, 11, 12, 4], list(range(100, 1200, 100))
    with torch.no_grad():
        alone = model(batch([session], [times]))
        together = model(batch([session, longer], [times, longer_times]))
        widest = model(batch([session], [times], width=L))
        hidden_alone = body(batch([session], [times]))
        hidden_together = body(batch([session, longer], [times, longer_times]))
    torch.testing.assert_close(alone[0], together[0])
    torch.testing.assert_close(alone[0], widest[0])
    torch.testing.assert_close(hidden_alone[0], hidden_together[0, :len(session)])
    assert torch.all(hidden_together[0, len(session):] == 0)
    assert block.max_seq_len == L  # no forward rewrote it


def test_time_bias_reads_the_schema_timestamps_in_training_evaluation_and_inference():
    model, block = hstu_model(sequence_schema(L), L)
    assert block.timestamp_column == "timestamp_seq"  # found by its TIME tag
    model.eval()  # dropout off; training=True still drives the masking
    items = [[3, 7, 7, 2, 9, 4], [5, 1, 8]]
    near = [[1, 2, 3, 4, 5, 6], [1, 2, 3]]
    far = [[1, 10, 10_000, 10_001, 3_000_000, 3_000_060], [1, 100_000, 100_005]]
    shifted = [[t + 7_000_000 for t in row] for row in near]  # same gaps, later times
    with torch.no_grad():
        for mode in ({}, {"testing": True}, {"training": True}):
            out_near, out_far, out_shifted = (model(batch(items, t), **mode) for t in (near, far, shifted))
            if mode:
                out_near, out_far, out_shifted = (o["predictions"] for o in (out_near, out_far, out_shifted))
            assert (out_near - out_far).abs().max() > 1e-5, f"time gaps changed nothing in mode {mode}"
            # the bias reads gaps between events, not absolute times
            torch.testing.assert_close(out_near, out_shifted)


def test_no_timestamps_runs_without_time_bias():
    items, near, far = [[3, 7, 7, 2]], [[1, 2, 3, 4]], [[1, 1_000, 90_000, 5_000_000]]
    # a schema without a TIME column: no time bias, a stray timestamp column in a batch is not read
    model, block = hstu_model(sequence_schema(L, time=False), L)
    model.eval()
    assert block.timestamp_column is None
    with torch.no_grad():
        assert model(batch(items)).shape == (1, 40)
        torch.testing.assert_close(model(batch(items, near)), model(batch(items, far)))
    # timestamp_column=None switches the schema's TIME column off
    model, block = hstu_model(sequence_schema(L), L, timestamp_column=None)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch(items, near)), model(batch(items, far)))


def test_timestamp_errors_are_clear():
    from merlin_longseq.t4r import HSTUBlock, HSTUConfig

    model, _ = hstu_model(sequence_schema(L), L)
    with pytest.raises(ValueError, match="'timestamp_seq' but this batch has no column"):
        model(batch([[3, 4, 5]]))
    floats = batch([[3, 4, 5]], [[1, 2, 3]])
    floats["timestamp_seq"] = floats["timestamp_seq"].double()
    with pytest.raises(TypeError, match="timestamps must be integers"):
        model(floats)
    inputs = input_module(sequence_schema(L), L)
    with pytest.raises(ValueError, match="needs inputs=input_module"):
        HSTUBlock(HSTUConfig.build(8, 2, 1, L), masking=inputs.masking, timestamp_column="timestamp_seq")
    with pytest.raises(ValueError, match="'stamp' is not in the input schema"):
        HSTUBlock(HSTUConfig.build(8, 2, 1, L), inputs=inputs, timestamp_column="stamp")
    with pytest.raises(ValueError, match="num_time_buckets=0"):
        HSTUBlock(HSTUConfig.build(8, 2, 1, L, num_time_buckets=0), inputs=inputs, timestamp_column="timestamp_seq")


def test_dropout_is_hstu_default_unless_passed():
    import transformers4rec.torch as tr
    from torch import nn

    from merlin_longseq.t4r import HSTUBlock, HSTUConfig

    inputs = input_module(sequence_schema(L), L)
    xlnet = tr.XLNetConfig.build(d_model=8, n_head=2, n_layer=1, total_seq_length=L)
    assert xlnet.dropout == 0.3

    def rates(block):
        return {m.p for m in block.modules() if isinstance(m, nn.Dropout)}

    assert rates(HSTUBlock(xlnet, inputs=inputs)) == {HSTUConfig().dropout} == {0.1}
    assert rates(HSTUBlock(xlnet, inputs=inputs, dropout=0.25)) == {0.25}
    assert rates(HSTUBlock(HSTUConfig.build(8, 2, 1, L, dropout=0.2), inputs=inputs)) == {0.2}


def test_save_and_load_give_identical_outputs(tmp_path):
    import transformers4rec.torch as tr

    model, _ = hstu_model(sequence_schema(L), L)
    model.eval()
    items, times, other_times = [[3, 7, 7, 2, 9], [5, 1]], [[1, 5, 60, 61, 4000], [3, 9]], [[1, 2, 3, 4, 5], [3, 4]]
    with torch.no_grad():
        before = model(batch(items, times))
    model.save(tmp_path)
    loaded = tr.Model.load(tmp_path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch(items, times)), before)
        # the loaded block still reads the timestamps (its hook on the loaded input module survived)
        assert not torch.allclose(loaded(batch(items, other_times)), before)


def test_top_k_inference():
    model, _ = hstu_model(sequence_schema(L), L, top_k=4)
    model.eval()
    x = dict(items=[[3, 7, 7, 2, 9], [5, 1]], times=[[1, 5, 60, 61, 4000], [3, 9]])
    with torch.no_grad():
        scores, ids = model(batch(**x))
        model.top_k = None
        full = model(batch(**x))
    assert scores.shape == ids.shape == (2, 4)
    torch.testing.assert_close(scores, full.gather(1, ids))
    # nothing outside the returned ids scores higher than the 4th
    assert bool((full.topk(4).values[:, -1] <= scores[:, -1]).all())


def test_block_rejects_bad_configuration():
    import transformers4rec.torch as tr

    from merlin_longseq.t4r import HSTUBlock, HSTUConfig

    schema = sequence_schema(L)
    xlnet = tr.XLNetConfig.build(d_model=8, n_head=2, n_layer=1)
    with pytest.raises(ValueError, match="causal"):
        HSTUBlock(xlnet, inputs=input_module(schema, L, masking="mlm"))
    # no masking at all: refused rather than run under whatever T4R does without it
    with pytest.raises(ValueError, match="needs the input module's causal masking"):
        HSTUBlock(xlnet)
    with pytest.raises(ValueError, match="needs the input module's causal masking"):
        HSTUBlock(xlnet, inputs=input_module(schema, L, masking=None))
    inputs = input_module(schema, L)
    with pytest.raises(ValueError, match="disagree"):
        HSTUBlock(xlnet, masking=input_module(schema, L).masking, inputs=inputs)
    with pytest.raises(ValueError, match="bidirectional"):
        HSTUBlock(HSTUConfig.build(8, 2, 1, L, attn_type="bi"), inputs=inputs)
    with pytest.raises(ValueError, match="needs local_window"):
        HSTUBlock(xlnet, inputs=inputs, global_prefix=4)
    with pytest.raises(ValueError, match="mixture of transducers"):
        HSTUBlock(xlnet, inputs=inputs, num_transducers=2)
    block = HSTUBlock(xlnet, inputs=inputs, max_seq_len=L, timestamp_column=None)
    with pytest.raises(ValueError, match="d_model=8"):
        block(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="no mask_schema yet"):
        block(torch.randn(2, 5, 8))
