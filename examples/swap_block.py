"""Swap HSTU into the Transformers4Rec tutorial model by changing one line, then train it.

    .venv/bin/python examples/swap_block.py [--arch hstu|xlnet]
"""
import argparse
import tempfile
import warnings

import merlin.io
import transformers4rec.torch as tr
from transformers4rec.config.trainer import T4RecTrainingArguments
from transformers4rec.torch.ranking_metric import NDCGAt, RecallAt

from merlin_longseq.data.synthetic import generate_events
from merlin_longseq.t4r import HSTUBlock
from merlin_longseq.workflows.sequences import run_next_item_etl

warnings.filterwarnings("ignore")
parser = argparse.ArgumentParser()
parser.add_argument("--arch", choices=["hstu", "xlnet"], default="hstu")
args = parser.parse_args()
max_len = 100
work = tempfile.mkdtemp()
paths = run_next_item_etl(generate_events(num_users=200, max_history=max_len), work, max_seq_len=max_len)
schema = merlin.io.Dataset(paths["train"], engine="parquet").schema.select_by_name(["item_id_seq", "action_seq"])

input_module = tr.TabularSequenceFeatures.from_schema(
    schema, max_sequence_length=max_len, aggregation="concat", d_output=64, masking="clm", embedding_dim_default=64)
transformer_config = tr.XLNetConfig.build(d_model=64, n_head=4, n_layer=2, total_seq_length=max_len)
body = tr.SequentialBlock(
    input_module, tr.MLPBlock([64]),
    HSTUBlock(transformer_config, masking=input_module.masking) if args.arch == "hstu"  # the changed line
    else tr.TransformerBlock(transformer_config, masking=input_module.masking),
)
metrics = [NDCGAt(top_ks=[10], labels_onehot=True), RecallAt(top_ks=[10], labels_onehot=True)]
model = tr.Model(tr.Head(body, tr.NextItemPredictionTask(weight_tying=True, metrics=metrics), inputs=input_module))

training_args = T4RecTrainingArguments(output_dir=work, max_sequence_length=max_len, data_loader_engine="merlin",
                                       num_train_epochs=2, per_device_train_batch_size=32, learning_rate=3e-3,
                                       report_to=[], save_strategy="no", no_cuda=True)
trainer = tr.Trainer(model=model, args=training_args, schema=schema, compute_metrics=True)
trainer.train_dataset_or_path, trainer.eval_dataset_or_path = paths["train"], paths["eval"]
trainer.train()
print(trainer.evaluate(metric_key_prefix="eval"))
