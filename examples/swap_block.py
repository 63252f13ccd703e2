"""Swap HSTU into the Transformers4Rec tutorial model by changing one line, then train it.

    .venv/bin/python examples/swap_block.py [--arch hstu|xlnet] [--quick]

Synthetic users (merlin_longseq.data.synthetic) -> NVTabular ETL -> T4R Trainer, 2 epochs; --quick runs tiny
sizes (a smoke run: the pipeline, not the accuracy). The schema keeps the timestamp column (tagged TIME), so
HSTU adds its relative time bias; XLNet ignores it.
"""
import argparse
import sys
import tempfile
import warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["hstu", "xlnet"], default="hstu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 epoch")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import merlin.io
    import transformers4rec.torch as tr
    from transformers4rec.config.trainer import T4RecTrainingArguments
    from transformers4rec.torch.ranking_metric import NDCGAt, RecallAt

    from merlin_longseq.data.synthetic import generate_events
    from merlin_longseq.t4r import HSTUBlock
    from merlin_longseq.t4r.causal import xlnet_causal_prepare
    from merlin_longseq.workflows.sequences import run_next_item_etl

    if args.quick:
        max_len, d_model, epochs, data = 20, 16, 1, dict(num_users=40, min_history=5, max_history=20)
    else:
        max_len, d_model, epochs, data = 100, 64, 2, dict(num_users=200, min_history=20, max_history=100)

    with tempfile.TemporaryDirectory() as work:
        paths = run_next_item_etl(generate_events(**data), work, max_seq_len=max_len)
        schema = merlin.io.Dataset(paths["train"], engine="parquet").schema.select_by_name(
            ["item_id_seq", "action_seq", "timestamp_seq"])

        input_module = tr.TabularSequenceFeatures.from_schema(
            schema, max_sequence_length=max_len, aggregation="concat", d_output=d_model, masking="clm",
            embedding_dim_default=d_model)
        transformer_config = tr.XLNetConfig.build(d_model=d_model, n_head=4, n_layer=2, total_seq_length=max_len)
        if args.arch == "hstu":
            block = HSTUBlock(transformer_config, inputs=input_module)  # the changed line
        else:
            # made causal: T4R's stock XLNet under clm masking reads each position's own target
            block = tr.TransformerBlock(transformer_config, masking=input_module.masking,
                                        prepare_module=xlnet_causal_prepare())
        body = tr.SequentialBlock(input_module, tr.MLPBlock([d_model]), block)
        metrics = [NDCGAt(top_ks=[10], labels_onehot=True), RecallAt(top_ks=[10], labels_onehot=True)]
        model = tr.Model(tr.Head(body, tr.NextItemPredictionTask(weight_tying=True, metrics=metrics),
                                 inputs=input_module))

        training_args = T4RecTrainingArguments(
            output_dir=work, max_sequence_length=max_len, data_loader_engine="merlin", num_train_epochs=epochs,
            per_device_train_batch_size=32, learning_rate=3e-3, report_to=[], save_strategy="no", no_cuda=True,
            disable_tqdm=args.quick)
        trainer = tr.Trainer(model=model, args=training_args, schema=schema, compute_metrics=True)
        trainer.train_dataset_or_path, trainer.eval_dataset_or_path = paths["train"], paths["eval"]
        trainer.train()
        print(trainer.evaluate(metric_key_prefix="eval"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
