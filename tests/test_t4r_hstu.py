"""HSTUBlock inside a real Transformers4Rec pipeline (tutorial-style model, one changed line)."""
import warnings

import numpy as np
import pytest
import torch

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
    schema = merlin.io.Dataset(paths["train"], engine="parquet").schema.select_by_name(["item_id_seq", "action_seq"])
    return paths, schema


def tutorial_model(schema, swap_in_hstu: bool, **hstu_options):
    import transformers4rec.torch as tr
    from transformers4rec.torch.ranking_metric import NDCGAt, RecallAt

    from merlin_longseq.t4r import HSTUBlock

    input_module = tr.TabularSequenceFeatures.from_schema(
        schema, max_sequence_length=L, aggregation="concat", d_output=16, masking="clm", embedding_dim_default=16)
    transformer_config = tr.XLNetConfig.build(d_model=16, n_head=2, n_layer=2, total_seq_length=L)
    body = tr.SequentialBlock(
        input_module, tr.MLPBlock([16]),
        # the one line a user changes:
        HSTUBlock(transformer_config, masking=input_module.masking, **hstu_options) if swap_in_hstu
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

    assert any(isinstance(m, HSTUBlock) for m in model.modules())


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
    _, block = _block(schema, dropout=0.0)
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
    block.fixed_max_seq_len = 9
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


def test_block_rejects_bad_configuration(etl):
    import transformers4rec.torch as tr

    from merlin_longseq.t4r import HSTUBlock

    _, schema = etl
    mlm_inputs = tr.TabularSequenceFeatures.from_schema(schema, max_sequence_length=L, aggregation="concat",
                                                        d_output=16, masking="mlm")
    with pytest.raises(ValueError, match="causal"):
        HSTUBlock(tr.XLNetConfig.build(d_model=16, n_head=2, n_layer=1), masking=mlm_inputs.masking)
    block = HSTUBlock(tr.XLNetConfig.build(d_model=16, n_head=2, n_layer=1))
    with pytest.raises(ValueError, match="d_model=16"):
        block(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="mixture of transducers"):
        HSTUBlock(tr.XLNetConfig.build(d_model=16, n_head=2, n_layer=1), num_transducers=2)
