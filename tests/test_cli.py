"""The demo command end to end at tiny sizes: ETL, T4R training, evaluation, report files."""
import json
import os

import pytest

from merlin_longseq import cli

pytestmark = pytest.mark.merlin


def test_quick_next_item_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["demo", "--quick", "--arch", "hstu", "--arch", "hstu-50", "--out", str(out)]) == 0
    report = (out / "next_item" / "report.md").read_text()
    assert "hstu-50" in report and "hr@10" in report
    metrics = json.loads((out / "next_item" / "next_item_metrics.json").read_text())
    assert [r["arch"] for r in metrics["results"]] == ["hstu", "hstu-50"]
    for row in metrics["results"]:
        assert 0.0 <= row["hr@10"] <= 1.0 and 0.0 <= row["ndcg@10"] <= row["hr@10"] + 1e-6
        assert row["train_loss"] > 0
    assert os.path.exists(out / "next_item" / "next_item.png")
    assert "part 1" in capsys.readouterr().out


def test_unknown_arch_is_rejected():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--arch", "gpt9"])


def test_demo_models_are_causal(tmp_path):
    """No demo model may read an event at or after the position it predicts (XLNet must be made causal)."""
    import merlin.io
    from transformers4rec.torch.utils.data_utils import MerlinDataLoader

    from merlin_longseq.data.synthetic import generate_events
    from merlin_longseq.jobs import next_item
    from merlin_longseq.t4r.causal import check_causal
    from merlin_longseq.workflows.sequences import run_next_item_etl

    cfg = next_item.NextItemJobConfig.quick()
    cfg.data.num_users = 8
    paths = run_next_item_etl(generate_events(cfg.data), str(tmp_path / "etl"), max_seq_len=cfg.max_seq_len)
    schema = merlin.io.Dataset(paths["train"], engine="parquet").schema.select_by_name(["item_id_seq", "action_seq"])
    loader = MerlinDataLoader.from_schema(schema, paths["train"], batch_size=8, max_sequence_length=cfg.max_seq_len,
                                          shuffle=False)
    batch = next(iter(loader))[0]
    for arch in cfg.archs:
        model = next_item.build_t4r_model(schema, arch, cfg)
        model(batch, training=True)  # builds the lazy layers
        assert check_causal(model, batch, position=30) == 0.0, arch


def test_job_flags_come_from_the_job_config(monkeypatch, tmp_path):
    """`merlin-longseq ranking` exposes the config's fields as flags and hands the edited config to run()."""
    from merlin_longseq.jobs import ranking

    seen = []
    monkeypatch.setattr(ranking, "run", lambda run_dir, cfg, **kwargs: seen.append((run_dir, cfg)))
    out = tmp_path / "r"
    assert cli.main(["ranking", "--quick", "--epochs", "2", "--archs", "stca", "din", "--eval-lengths", "8", "16",
                     "--no-progress", "--out", str(out)]) == 0
    run_dir, cfg = seen[0]
    assert run_dir == str(out) and cfg.epochs == 2 and cfg.archs == ("stca", "din")
    assert cfg.eval_lengths == (8, 16) and cfg.progress is False
    assert cfg.batch_size == ranking.RankingJobConfig.quick().batch_size  # untouched fields keep the preset
    assert (out / "COMPLETE.json").exists()  # written last: its absence marks an interrupted run
    with pytest.raises(SystemExit, match="not empty"):  # never appends to another run's folder
        cli.main(["ranking", "--quick", "--out", str(out)])


def test_pass_through_commands_hand_their_flags_over(monkeypatch):
    import merlin_longseq.train_ddp as train_ddp

    seen = []
    monkeypatch.setattr(train_ddp, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["train", "--arch", "longer", "--steps", "3"]) == 0
    assert seen == [["--arch", "longer", "--steps", "3"]]
    assert cli.main(["bench", "no-such-benchmark"]) == 2
