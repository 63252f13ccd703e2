"""The STCA history projection reference and dispatcher (ops/history_projection.py).

The reference must equal the nn-module composition of models/stca.py (STCALayer.keys_values) exactly in fp32,
and the documented math (written out row by row in float64); the dispatcher must reject bad inputs with a
clear message and honour the explicit backend choice. The Triton kernel has its own file.
"""
import pytest
import torch

from merlin_longseq.backend import BackendUnavailableError
from merlin_longseq.jagged import JaggedInputError
from merlin_longseq.models.stca import STCAConfig, STCALayer
from merlin_longseq.ops.history_projection import history_projection
from merlin_longseq.ops.pytorch.pt_history_projection import pytorch_history_projection


def random_weights(d, hidden, heads, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        w_gate_up=torch.randn(2 * hidden, d, generator=gen, dtype=dtype) / d ** 0.5,
        w_down=torch.randn(d, hidden, generator=gen, dtype=dtype) / hidden ** 0.5,
        ln_weight=1 + 0.2 * torch.randn(d, generator=gen, dtype=dtype),
        ln_bias=0.2 * torch.randn(d, generator=gen, dtype=dtype),
        w_kv=torch.randn(2 * heads * head_dim, d, generator=gen, dtype=dtype) / d ** 0.5,
    )


def _args(x, w):
    return (x, w["w_gate_up"], w["w_down"], w["ln_weight"], w["ln_bias"], w["w_kv"])


def naive_projection(x, w, residual, eps, heads):
    """Row by row, every step written out (float64): the definition."""
    hidden = w["w_down"].shape[1]
    keys, values = [], []
    for row in x:
        gate = w["w_gate_up"][:hidden] @ row
        up = w["w_gate_up"][hidden:] @ row
        z = w["w_down"] @ (gate / (1 + torch.exp(-gate)) * up)
        if residual:
            z = z + row
        mean = z.sum() / z.numel()
        var = ((z - mean) ** 2).sum() / z.numel()
        y = (z - mean) / torch.sqrt(var + eps) * w["ln_weight"] + w["ln_bias"]
        kv = w["w_kv"] @ y
        keys.append(kv[:kv.numel() // 2].view(heads, -1))
        values.append(kv[kv.numel() // 2:].view(heads, -1))
    return torch.stack(keys), torch.stack(values)


@pytest.mark.parametrize("residual", [True, False])
def test_reference_equals_stca_layer_modules_exactly(residual):
    cfg = STCAConfig(num_items=10, d_model=24, n_heads=3, head_dim=5, ffn_mult=1.5, residual_ffn=residual)
    layer = STCALayer(cfg, 0)
    with torch.no_grad():  # the residual down projection starts at zero: make every weight matter
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p is layer.history_norm.weight else 0.0))
    x = torch.randn(29, 24)
    want_k, want_v = layer.keys_values(x)
    ffn = layer.history_ffn
    got_k, got_v = pytorch_history_projection(
        x, ffn.gate_up.weight, ffn.down.weight, layer.history_norm.weight, layer.history_norm.bias,
        layer.kv_proj.weight, residual=residual, eps=layer.history_norm.eps, num_heads=cfg.n_heads)
    assert got_k.shape == (29, 3, 5) and got_v.shape == (29, 3, 5)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    # and the dispatcher's pytorch backend is the same function
    disp_k, disp_v = history_projection(
        x, ffn.gate_up.weight, ffn.down.weight, layer.history_norm.weight, layer.history_norm.bias,
        layer.kv_proj.weight, num_heads=cfg.n_heads, residual=residual, eps=layer.history_norm.eps,
        backend="pytorch")
    assert torch.equal(disp_k, want_k) and torch.equal(disp_v, want_v)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("n", [0, 1, 7])
def test_reference_matches_row_by_row_definition(n, residual):
    w = random_weights(12, 20, 2, 3, dtype=torch.float64, seed=n)
    x = torch.randn(n, 12, dtype=torch.float64)
    got_k, got_v = pytorch_history_projection(*_args(x, w), residual=residual, eps=1e-3, num_heads=2)
    assert got_k.shape == (n, 2, 3) and got_v.shape == (n, 2, 3)
    if n:
        want_k, want_v = naive_projection(x, w, residual, 1e-3, 2)
        torch.testing.assert_close(got_k, want_k, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_v, want_v, rtol=1e-10, atol=1e-10)


def test_reference_traces_and_generalises_over_rows():
    w = random_weights(8, 16, 2, 4)

    def fn(x, a, b, c, d, e):
        return pytorch_history_projection(x, a, b, c, d, e, residual=True, eps=1e-5, num_heads=2)

    traced = torch.jit.trace(fn, _args(torch.randn(5, 8), w))
    x = torch.randn(13, 8)
    for got, want in zip(traced(*_args(x, w)), fn(*_args(x, w))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _bad_cases():
    good = dict(x=torch.randn(4, 8), **random_weights(8, 6, 2, 3))
    cases = [
        ("x must be", dict(x=torch.randn(32))),
        ("w_gate_up must be", dict(w_gate_up=torch.randn(11, 8))),
        ("w_gate_up must be", dict(w_gate_up=torch.randn(12, 7))),
        ("w_down must be", dict(w_down=torch.randn(8, 5))),
        ("ln_weight must be", dict(ln_weight=torch.randn(7))),
        ("ln_bias must be", dict(ln_bias=torch.randn(8, 1))),
        ("w_kv must be", dict(w_kv=torch.randn(10, 8))),
        ("w_kv must be", dict(w_kv=torch.randn(12, 9))),
        ("one floating dtype", dict(w_down=torch.randn(8, 6, dtype=torch.float64))),
        ("one floating dtype", dict(x=torch.randint(0, 3, (4, 8)))),
        ("one device", dict(w_kv=torch.randn(12, 8, device="meta"))),
    ]
    for message, change in cases:
        yield message, {**good, **change}, {}
    yield "num_heads must be", good, dict(num_heads=0)
    yield "w_kv must be", good, dict(num_heads=4)  # 12 rows are not 2 * 4 * Dh
    yield "eps must be positive", good, dict(eps=0.0)


@pytest.mark.parametrize("message,tensors,kwargs", list(_bad_cases()))
def test_bad_inputs_raise_clear_errors(message, tensors, kwargs):
    call = dict(num_heads=2, residual=True, eps=1e-5, backend="pytorch")
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        history_projection(tensors["x"], tensors["w_gate_up"], tensors["w_down"], tensors["ln_weight"],
                           tensors["ln_bias"], tensors["w_kv"], **call)


def test_shape_errors_are_jagged_input_errors():
    w = random_weights(8, 6, 2, 3)
    with pytest.raises(JaggedInputError, match="total_history, d"):
        history_projection(*_args(torch.randn(2, 3, 8), w), num_heads=2)


def test_backend_choice():
    w = random_weights(8, 6, 2, 3)
    x = torch.randn(5, 8)
    want = pytorch_history_projection(*_args(x, w), residual=True, eps=1e-5, num_heads=2)
    for backend in ("auto", "pytorch", "PYTORCH"):  # auto on CPU tensors: the reference
        got = history_projection(*_args(x, w), num_heads=2, backend=backend)
        assert all(torch.equal(g, t) for g, t in zip(got, want))
    with pytest.raises(ValueError, match="unknown backend"):
        history_projection(*_args(x, w), num_heads=2, backend="cuda")


def test_backend_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    w = random_weights(8, 6, 2, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="needs CUDA"):
        history_projection(*_args(torch.randn(5, 8), w), num_heads=2, backend="triton")


def test_backend_triton_rejects_too_wide_models(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so the CPU tensors get past the device check
    w = random_weights(264, 8, 2, 4)
    with pytest.raises(BackendUnavailableError, match="d <= 256"):
        history_projection(*_args(torch.randn(3, 264), w), num_heads=2, backend="triton")
