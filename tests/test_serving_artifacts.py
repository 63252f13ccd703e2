"""The served model's artifact files are verified when the server loads them: a damaged, replaced or missing
file, or non-finite weights, stop the load with an error naming the file; nothing damaged is served."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

pytest.importorskip("merlin.systems")

from merlin_longseq.models.stca import STCAConfig, STCAModel  # noqa: E402
from merlin_longseq.serving.artifacts import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402
from merlin_longseq.serving.operator import PredictLongSeq  # noqa: E402
from merlin_longseq.serving.scoring import serving_limits  # noqa: E402


def _exported(tmp_path, model=None):
    torch.manual_seed(0)
    model = model or STCAModel(STCAConfig(num_items=20, d_model=8, n_layers=1, mlp_dims=(8,)))
    step = PredictLongSeq(model, serving_limits(model, max_history=16), device="cpu")
    step.save_artifacts(str(tmp_path))
    return pickle.loads(pickle.dumps(step))  # what the server holds: the recipe and the checksums, no weights


def test_intact_artifacts_load(tmp_path):
    recipe = _exported(tmp_path)
    assert recipe._files is None and set(recipe.checksums) == {CONFIG_FILE, WEIGHTS_FILE}
    recipe.load_artifacts(str(tmp_path))
    assert recipe.scorer.model.cfg.num_items == 20


def test_a_flipped_byte_is_refused_naming_the_file(tmp_path):
    recipe = _exported(tmp_path)
    path = tmp_path / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE} does not match the checksum"):
        recipe.load_artifacts(str(tmp_path))


def test_a_missing_or_replaced_config_is_refused(tmp_path):
    recipe = _exported(tmp_path)
    config = tmp_path / CONFIG_FILE
    config.write_text(config.read_text().replace('"d_model": 8', '"d_model": 16'))
    with pytest.raises(ValueError, match=f"{CONFIG_FILE} does not match"):
        recipe.load_artifacts(str(tmp_path))
    os.remove(config)
    with pytest.raises(ValueError, match=f"{CONFIG_FILE} is missing"):
        recipe.load_artifacts(str(tmp_path))


def test_non_finite_weights_are_not_served(tmp_path):
    torch.manual_seed(0)
    model = STCAModel(STCAConfig(num_items=20, d_model=8, n_layers=1, mlp_dims=(8,)))
    with torch.no_grad():
        model.heads.weight[0, 0] = float("nan")
    recipe = _exported(tmp_path, model)
    with pytest.raises(ValueError, match="non-finite values"):
        recipe.load_artifacts(str(tmp_path))


def test_a_failed_re_export_leaves_the_previous_release_whole(tmp_path, monkeypatch):
    """export writes into a staging folder and swaps it in: an export that dies half way changes nothing."""
    import merlin.systems.dag as dag

    from merlin_longseq.serving.repository import export, read_manifest

    torch.manual_seed(0)
    first = STCAModel(STCAConfig(num_items=20, d_model=8, n_layers=1, mlp_dims=(8,)))
    repo = tmp_path / "repo"
    export(str(repo), None, first, max_history=16, name="stca")
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    second = STCAModel(STCAConfig(num_items=20, d_model=8, n_layers=1, mlp_dims=(8,)))

    def dies_half_way(self, path, *args, **kwargs):
        os.makedirs(os.path.join(path, "stca"), exist_ok=True)
        with open(os.path.join(path, "stca", "half-written"), "w") as f:
            f.write("x")
        raise KeyboardInterrupt  # a kill, as far as the export is concerned

    monkeypatch.setattr(dag.Ensemble, "export", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        export(str(repo), None, second, max_history=16, name="stca")
    after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no staging folder left behind
    assert read_manifest(str(repo))["models"]["stca"]["checksums"]


def test_the_server_refuses_an_empty_repository_and_bad_ports(tmp_path):
    from merlin_longseq.serving.server import ServerError, TritonServer

    with pytest.raises(ServerError, match="holds no model"):
        TritonServer(str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"')
    with pytest.raises(ServerError, match=r"http_port must lie in \[1, 65535\], got 70000"):
        TritonServer(str(tmp_path), http_port=70000)
