"""LONGER with its Triton kernels (backend="triton") against the same model on the PyTorch path.

CPU: the Triton interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU), fp32, tiny ragged requests
(empty history, one event, several merged groups); logits and every parameter gradient. GPU: bf16 autocast.
"""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (the 'triton' extra)", allow_module_level=True)

import merlin_longseq.kernels.triton_target_attention as tk  # noqa: E402
from merlin_longseq.models.longer import LONGERModel  # noqa: E402
from test_longer import history_args, make_batch, param_grads, small_config, weighted_loss  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

ON_CPU = not torch.cuda.is_available()
if ON_CPU and not isinstance(tk._ta_combine_kernel, InterpretedFunction):
    pytest.skip("the kernel module was imported before TRITON_INTERPRET=1 was set; run this file on its own",
                allow_module_level=True)


def _pair(device="cpu", **overrides):
    torch.manual_seed(0)
    ref = LONGERModel(small_config(backend="pytorch", **overrides)).to(device)
    fast = LONGERModel(small_config(backend="triton", **overrides)).to(device)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _logits_and_grads(model, batch):
    model.zero_grad()
    logits = model(**batch)
    weighted_loss(logits).backward()
    return logits.detach(), param_grads(model)


@pytest.mark.skipif(not ON_CPU, reason="interpreter case; the GPU has its own test")
@pytest.mark.parametrize("recent", [2, None], ids=["k2", "all_queries"])
def test_triton_backend_matches_pytorch_logits_and_gradients(recent):
    tk._set_interpret_blocks(16, 16)
    ref, fast = _pair(num_recent_queries=recent)
    # empty history, one event, one full group, several groups with a partial oldest one
    batch = make_batch([0, 1, 3, 11, 40], [2, 1, 3, 1, 4], seed=3)
    want, want_grads = _logits_and_grads(ref, batch)
    got, got_grads = _logits_and_grads(fast, batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.skipif(not ON_CPU, reason="interpreter case")
def test_triton_backend_cached_scores_equal_uncached():
    tk._set_interpret_blocks(16, 16)
    _, fast = _pair()
    fast.eval()
    batch = make_batch([7, 20], [3, 2], seed=4)
    with torch.no_grad():
        cache = fast.encode_user(**history_args(batch))
        cached = fast.score_candidates(cache, batch["cand_item_ids"], batch["cand_offsets"])
        torch.testing.assert_close(cached, fast(**batch), rtol=0, atol=0)
        torch.testing.assert_close(cached, fast.forward_reference(**batch), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_triton_backend_bf16_within_twice_the_pytorch_bf16_error():
    # STYLE.md's rule against an fp32 model with the same weights: |triton - fp32| <= 2 |pytorch - fp32| + floor
    # (the PyTorch path rounds its bf16 scores before the softmax; the kernel keeps them in fp32)
    common = dict(token_dim=32, merge_size=4, num_recent_queries=100, n_heads=4)
    ref16, fast = _pair("cuda", mixed_precision=True, **common)
    torch.manual_seed(0)
    ref32 = LONGERModel(small_config(backend="pytorch", mixed_precision=False, **common)).cuda()
    ref32.load_state_dict(ref16.state_dict())
    batch = {k: v.cuda() for k, v in make_batch([0, 1, 777, 3000, 130], [2, 1, 64, 16, 8], seed=5).items()}
    with torch.no_grad():
        want32, want16, got = (m.eval()(**batch) for m in (ref32, ref16, fast))
    floor = 5e-3 * float(want32.abs().max()) + 1e-6
    excess = (got - want32).abs() - (2 * (want16 - want32).abs() + floor)
    assert torch.isfinite(got).all()
    assert float(excess.max()) <= 0, f"{int((excess > 0).sum())} logits over, worst by {float(excess.max()):.3e}"
    fast.train().zero_grad()
    fast(**batch).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
