"""Export of a trained Transformers4Rec next-item model (HSTUBlock): the served form scores and ranks the whole
catalogue exactly as the tr.Model does, and what has no served form is refused at export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.merlin
pytest.importorskip("transformers4rec")

from t4r_schema import batch, hstu_model, sequence_schema  # noqa: E402

LENGTH, NUM_ITEMS = 8, 40


def _built(top_k=None, **options):
    torch.manual_seed(0)
    model, block = hstu_model(sequence_schema(LENGTH, NUM_ITEMS), LENGTH, top_k=top_k, **options)
    model.eval()
    with torch.no_grad():
        model(batch([[3, 4, 5]], [[10, 20, 30]], width=LENGTH))  # builds the lazy T4R layers
    return model


SESSIONS = ([[5, 9, 2, 7, 7, 11], [3], [30, 31, 4, 8]], [[100, 160, 170, 400, 900, 901], [50], [1, 2, 3, 4]])


def _t4r_scores(model):
    top_k, model.top_k = model.top_k, None  # the full catalogue's scores
    with torch.no_grad():
        scores = model(batch(*SESSIONS, width=LENGTH))
    model.top_k = top_k
    scores = scores.clone()
    scores[:, 0] = float("-inf")  # the padding id is never served
    return scores


def test_served_form_equals_the_t4r_model():
    from merlin_longseq.t4r.hstu import next_item_servable

    model = _built()
    served = next_item_servable(model)
    items, times = (torch.tensor(sum(x, [])) for x in SESSIONS)
    offsets = torch.tensor([0, 6, 7, 11])
    with torch.no_grad():
        hidden = served(items, offsets, timestamps=times)
        got = served.item_scores(hidden[offsets[1:] - 1])
    torch.testing.assert_close(got, _t4r_scores(model), atol=1e-5, rtol=1e-5)


def test_exported_step_answers_top_k_and_candidate_scores_like_the_model(tmp_path):
    pytest.importorskip("merlin.systems")
    from merlin.table import TensorTable

    from merlin_longseq.serving.artifacts import load_model
    from merlin_longseq.serving.operator import PredictLongSeq
    from merlin_longseq.serving.repository import export, read_manifest

    model = _built(top_k=5)
    manifest = export(str(tmp_path / "repo"), None, model, top_k=5, name="hstu")
    assert manifest["arch"] == "hstu-t4r" and manifest["outputs"] == ["score", "topk_item_id", "topk_score"]
    assert read_manifest(str(tmp_path / "repo"))["models"]["hstu"]["columns"]["hist_timestamp"] == "hist_timestamp"
    # the model step as Triton loads it: from the artifact files (JSON config, weights_only state dict)
    step_dir = [p for p in (tmp_path / "repo").rglob("merlin_longseq_model.json")][0].parent
    step = PredictLongSeq.__new__(PredictLongSeq)
    step.__dict__.update(_exported_recipe(model))
    step.load_artifacts(str(step_dir))
    assert isinstance(load_model(str(step_dir)), type(step.scorer.model))
    items, times = SESSIONS
    hist = np.array([0, 6, 7, 11], dtype=np.int32)
    cand = np.array([0, 2, 2, 3], dtype=np.int32)  # the second request asks for top-k only
    table = TensorTable({"hist_item_id": (np.array(sum(items, [])), hist),
                         "hist_timestamp": (np.array(sum(times, [])), hist),
                         "cand_item_id": (np.array([5, 17, 9]), cand), "user_id": np.array([1, 2, 3])})
    out = step.transform(None, table)
    expected = _t4r_scores(model)
    best, ids = expected.topk(5, dim=1)
    np.testing.assert_array_equal(np.asarray(out["topk_item_id"].values).reshape(3, 5), ids.numpy())
    np.testing.assert_allclose(np.asarray(out["topk_score"].values).reshape(3, 5), best.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["score"].values),
                               [expected[0, 5], expected[0, 17], expected[2, 9]], atol=1e-5)


def _exported_recipe(model):
    """A PredictLongSeq as the ensemble pickle holds it: the recipe without the weights."""
    from merlin_longseq.request import RequestColumns
    from merlin_longseq.serving.operator import PredictLongSeq
    from merlin_longseq.serving.scoring import serving_limits
    from merlin_longseq.t4r.hstu import next_item_servable

    served = next_item_servable(model)
    step = PredictLongSeq(served, serving_limits(served), top_k=5, device="cpu",
                          columns=RequestColumns(hist_action=None, request_time=None))
    return step.__getstate__()


def test_parts_without_a_served_form_are_refused():
    import transformers4rec.torch as tr

    from merlin_longseq.serving.repository import servable
    from merlin_longseq.t4r import HSTUBlock
    from t4r_schema import input_module

    torch.manual_seed(0)
    inputs = input_module(sequence_schema(LENGTH, NUM_ITEMS), LENGTH, 8)
    block = HSTUBlock(tr.XLNetConfig.build(d_model=8, n_head=2, n_layer=1), inputs=inputs)
    head = tr.Head(tr.SequentialBlock(inputs, block), tr.NextItemPredictionTask(weight_tying=False), inputs=inputs)
    model = tr.Model(head).eval()
    with torch.no_grad():
        model(batch([[3, 4]], [[1, 2]], width=LENGTH))
    with pytest.raises(ValueError, match="weight_tying=True"):
        servable(model)
    with pytest.raises(RuntimeError, match="cannot be traced"):
        torch.jit.trace(_built(), (batch([[3, 4]], [[1, 2]], width=LENGTH),), strict=False)
