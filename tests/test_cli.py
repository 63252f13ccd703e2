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
