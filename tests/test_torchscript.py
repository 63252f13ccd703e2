"""The merlin-systems `PredictPyTorch` TorchScript route (serving/torchscript.py): trace, save, load, compare.

The traced STCA model is compared with the eager model on requests the trace never saw (other request
counts, history lengths, candidate counts, an empty history), which fails if the trace froze a shape.
The exported repository is checked on disk only: its PredictPyTorch step runs on Triton's libtorch backend,
which the pytriton wheel (our test server) does not carry, so this repository cannot be served here.
"""
import os

import pytest
import torch

from merlin_longseq.models.longer import LONGERConfig, LONGERModel
from merlin_longseq.models.stca import STCAConfig, STCAModel
from merlin_longseq.serving.torchscript import export_torchscript, trace_stca

NUM_ITEMS, NUM_USERS = 40, 7


def stca(num_users=NUM_USERS, seed=0):
    torch.manual_seed(seed)
    model = STCAModel(STCAConfig(num_items=NUM_ITEMS, num_actions=3, num_users=num_users, d_model=16, n_heads=2,
                                 n_layers=2, tasks=("click", "like"), mlp_dims=(16,), backend="pytorch"))
    with torch.no_grad():  # off the zero / aligned init, so every table and projection matters
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def request(history_lengths, candidate_lengths, seed):
    """Wrapper arguments (Triton layout: int32 offsets) and the eager model's keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    n_hist, n_cand, r = sum(history_lengths), sum(candidate_lengths), len(history_lengths)
    hist_offsets = torch.cumsum(torch.tensor([0] + list(history_lengths)), 0)
    cand_offsets = torch.cumsum(torch.tensor([0] + list(candidate_lengths)), 0)
    request_time = torch.randint(10**6, 10**7, (r,), generator=gen)
    request_of = torch.repeat_interleave(torch.arange(r), torch.tensor(history_lengths, dtype=torch.int64))
    eager = dict(hist_item_ids=torch.randint(1, NUM_ITEMS + 1, (n_hist,), generator=gen),
                 hist_actions=torch.randint(0, 4, (n_hist,), generator=gen),
                 hist_timestamps=request_time[request_of] - torch.randint(0, 10**6, (n_hist,), generator=gen),
                 hist_offsets=hist_offsets, request_time=request_time,
                 cand_item_ids=torch.randint(1, NUM_ITEMS + 1, (n_cand,), generator=gen),
                 cand_offsets=cand_offsets, user_ids=torch.randint(1, NUM_USERS + 1, (r,), generator=gen))
    h32, c32 = hist_offsets.to(torch.int32), cand_offsets.to(torch.int32)
    args = (eager["hist_item_ids"], h32, eager["hist_actions"], h32, eager["hist_timestamps"], h32,
            eager["cand_item_ids"], c32, eager["request_time"], eager["user_ids"])
    return args, eager


def scores(outputs, num_tasks):
    """[C, num_tasks] from the traced module's (values, offsets) pairs."""
    assert len(outputs) == 2 * num_tasks
    return torch.stack([outputs[2 * t] for t in range(num_tasks)], dim=1)


@pytest.mark.parametrize("num_users", [NUM_USERS, 0])
def test_traced_stca_saved_and_loaded_matches_eager_on_unseen_shapes(tmp_path, num_users):
    model = stca(num_users)
    trace_example, _ = request([3, 2], [2, 3], seed=1)
    traced = trace_stca(model, trace_example)
    path = tmp_path / "stca.pt"
    torch.jit.save(traced, str(path))
    loaded = torch.jit.load(str(path))
    # other request counts, longer and shorter histories, an empty history, other candidate counts
    for hist, cand, seed in (([9, 0, 12], [3, 1, 6], 2), ([0], [4], 3), ([25], [1], 4), ([1, 7, 2, 4], [2, 2, 5, 1], 5)):
        args, eager_kwargs = request(hist, cand, seed)
        if not num_users:
            eager_kwargs["user_ids"] = None
        with torch.no_grad():
            expected = model(**eager_kwargs)
            out = loaded(*args)
        torch.testing.assert_close(scores(out, 2), expected, atol=1e-5, rtol=0)
        assert torch.equal(out[1], eager_kwargs["cand_offsets"].to(torch.int32))
        # the empty-history request still scores (finite), as in the eager model
        assert torch.isfinite(scores(out, 2)).all()


def test_trace_leaves_the_model_alone_and_has_no_triton_op():
    model = stca()
    model.cfg.backend = "auto"
    traced = trace_stca(model)
    assert model.cfg.backend == "auto" and model.training is False  # the trace works on a copy
    assert "triton" not in str(traced.inlined_graph).lower()


def test_export_writes_libtorch_model_and_torchscript_file(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    model = stca()
    saved = export_torchscript(str(tmp_path), trace_stca(model), model.cfg.tasks, name="stca_ts")
    step = tmp_path / "0_predictpytorchtriton"
    assert os.path.samefile(saved, step / "1" / "model.pt")
    config = text_format.Parse((step / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "pytorch_libtorch" and config.backend == "pytorch"
    inputs = [i.name for i in config.input]
    assert inputs == ["hist_item_id__values", "hist_item_id__offsets", "hist_action__values", "hist_action__offsets",
                      "hist_timestamp__values", "hist_timestamp__offsets", "cand_item_id__values",
                      "cand_item_id__offsets", "request_time", "user_id"]
    assert [o.name for o in config.output] == ["score_click__values", "score_click__offsets",
                                               "score_like__values", "score_like__offsets"]
    # the libtorch backend binds inputs by the forward's argument names: they must equal the config's
    loaded = torch.jit.load(saved)
    argument_names = [a.name for a in loaded.forward.schema.arguments][1:]
    assert argument_names == inputs
    args, eager_kwargs = request([6, 0], [2, 3], seed=7)
    with torch.no_grad():
        torch.testing.assert_close(scores(loaded(*args), 2), model(**eager_kwargs), atol=1e-5, rtol=0)
    ensemble = tmp_path / "stca_ts" / "config.pbtxt"
    assert ensemble.exists() and 'backend: "python"' in ensemble.read_text()


def test_bad_inputs_raise_clear_errors(tmp_path):
    longer = LONGERModel(LONGERConfig(num_items=NUM_ITEMS))
    with pytest.raises(ValueError, match="LONGERModel does not trace"):
        trace_stca(longer)
    with pytest.raises(ValueError, match="not a registered architecture"):
        trace_stca(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="10 tensors"):
        trace_stca(stca(), example=(torch.zeros(1),))
    with pytest.raises(ValueError, match="TorchScript module"):
        export_torchscript(str(tmp_path), stca(), ("click",))
    with pytest.raises(ValueError, match="at least one task"):
        export_torchscript(str(tmp_path), trace_stca(stca()), ())
