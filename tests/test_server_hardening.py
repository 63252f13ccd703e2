"""The server as a local attacker or a careless operator meets it (real tritonserver on 127.0.0.1): the
shared-memory and repository-control APIs answer only the admin header, and a repository path with shell
characters is served without running anything."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.merlin
pytest.importorskip("merlin.systems")
pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")
pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from merlin_longseq.models.stca import STCAConfig, STCAModel
    from merlin_longseq.serving.repository import export
    from merlin_longseq.serving.server import TritonServer

    tmp = tmp_path_factory.mktemp("hardening")
    torch.manual_seed(0)
    model = STCAModel(STCAConfig(num_items=20, d_model=8, n_layers=1, mlp_dims=(8,))).eval()
    plain = tmp / "repo"
    export(str(plain), None, model, max_history=16, name="stca", device="cpu")
    # the same repository under a hostile name: a shell would run the substitution and split at the space
    hostile = tmp / "a dir $(touch PWNED) (x)"
    shutil.copytree(plain, hostile)
    server = TritonServer(str(hostile), exit_timeout_s=10, log_file=str(tmp / "triton.log"))
    cwd = os.getcwd()
    os.chdir(tmp)  # where `touch PWNED` would land
    try:
        server.start(timeout_s=180)
        yield dict(server=server, model=model, tmp=tmp)
    finally:
        server.stop()
        server.close()
        os.chdir(cwd)


def test_a_path_with_shell_characters_is_served_and_runs_nothing(served):
    from merlin_longseq.serving.client import ScoringClient

    request = dict(hist_item_id=[3, 4, 5], hist_action=[1, 2, 1], hist_timestamp=[10, 20, 30], request_time=40,
                   user_id=1, cand_item_id=[7, 8])
    with ScoringClient(served["server"].http_url, model_name="stca") as client:
        scores = client.score(**request)["score_click"]
    with torch.no_grad():
        expected = served["model"](torch.tensor([3, 4, 5]), torch.tensor([1, 2, 1]), torch.tensor([10, 20, 30]),
                                   torch.tensor([0, 3]), torch.tensor([40]), torch.tensor([7, 8]),
                                   torch.tensor([0, 2]))[:, 0].numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert not list(served["tmp"].rglob("PWNED")) and not os.path.exists("PWNED")


def test_shared_memory_and_repository_apis_need_the_admin_header(served):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    server = served["server"]
    http = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException, match="(?i)restricted|forbidden|403|unavailable"):
        http.get_system_shared_memory_status()
    with pytest.raises(InferenceServerException):
        http.get_model_repository_index()
    assert http.get_system_shared_memory_status(headers=server.admin_header) == []
    assert http.is_model_ready("stca")  # inference and health stay open
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException):
        grpc.get_system_shared_memory_status()
