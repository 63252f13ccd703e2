"""Every script in examples/ runs, on tiny sizes, as a user would run it: `python examples/<script> ...`.

Each case is a separate process (an example is a top-level script, and this checks its imports and argument
parsing too). A new example must get a case here: the first test fails when one is missing.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.merlin

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# script -> cases (id, arguments, file the run must write under --out, or None); {out} is the run folder
CASES = {
    "swap_block.py": [
        ("hstu", ["--quick", "--arch", "hstu"], None),
        ("xlnet", ["--quick", "--arch", "xlnet"], None),
    ],
    "ranking_ablation.py": [
        ("t4r", ["--quick", "--out", "{out}", "--variant", "before", "--variant", "job"], "ablation.json"),
        ("torch", ["--quick", "--engine", "torch", "--device", "cpu", "--arch", "ultra-hstu", "--variant", "base",
                   "--out", "{out}"], "ablation.json"),
    ],
    "needle_in_history.py": [("quick", ["--quick", "--out", "{out}"], "needle.json")],
    "movielens.py": [
        ("next-item", ["next-item", "--quick", "--out", "{out}"], "movielens_next_item.json"),
        ("ranking", ["ranking", "--quick", "--out", "{out}"], "movielens_ranking.json"),
    ],
    # {taobao}: a synthetic UserBehavior file (tests/taobao_fixture.py); the real data never reaches CI
    "taobao.py": [
        ("quick", ["--quick", "--data", "{taobao}", "--out", "{out}"], "taobao_ranking.json"),
    ],
}
NEEDS_ML100K = {"movielens.py"}


def test_every_example_has_a_case():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts, f"no examples found in {EXAMPLES}"
    assert sorted(CASES) == scripts, "add a case for each script in examples/ to CASES"


def _ml100k_or_skip():
    ml = pytest.importorskip("merlin_longseq.workflows.movielens")
    folder = ml.default_ml100k_dir()
    if not (folder / "u.data").is_file():
        pytest.skip(f"ML-100K not found at {folder} (set ${ml.ENV_ML100K}); its license forbids a copy in the repo")


@pytest.mark.parametrize("script, arguments, writes", [
    pytest.param(script, arguments, writes, id=f"{script}-{name}")
    for script, cases in CASES.items() for name, arguments, writes in cases
])
def test_example_runs(script, arguments, writes, tmp_path):
    if script in NEEDS_ML100K:
        _ml100k_or_skip()
    out = tmp_path / "run"
    # one thread per process: the CI machine has two shared cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    taobao = None
    if any("{taobao}" in a for a in arguments):
        from taobao_fixture import write_taobao_csv

        taobao = write_taobao_csv(tmp_path / "UserBehavior.csv")
    command = [sys.executable, str(EXAMPLES / script), *(a.format(out=out, taobao=taobao) for a in arguments)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    if writes is None:
        assert "recall_at_10" in done.stdout  # the example prints its evaluation metrics
    else:
        assert (out / writes).is_file() and (out / "report.md").is_file()
