import pytest
import torch

from merlin_longseq.backend import BackendUnavailableError, triton_available
from merlin_longseq.jagged import JaggedInputError, offsets_from_lengths
from merlin_longseq.ops.target_attention import target_attention


def naive_target_attention(q, k, v, q_offsets, kv_offsets, scale):
    """One target at a time, one head at a time: the definition, written as plainly as possible."""
    out = []
    for r in range(q_offsets.numel() - 1):
        keys = k[kv_offsets[r]:kv_offsets[r + 1]]  # [L, H, D]
        values = v[kv_offsets[r]:kv_offsets[r + 1]]
        for t in range(int(q_offsets[r]), int(q_offsets[r + 1])):
            heads = []
            for h in range(q.shape[1]):
                if keys.shape[0] == 0:
                    heads.append(q.new_zeros(v.shape[2]))
                    continue
                weights = torch.softmax((keys[:, h] @ q[t, h]) * scale, dim=0)  # [L]
                heads.append(weights @ values[:, h])
            out.append(torch.stack(heads))
    return torch.stack(out) if out else q.new_zeros((0, q.shape[1], v.shape[2]))


def random_case(target_lengths, history_lengths, heads=2, dim=8, dim_v=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim_v = dim_v or dim
    n_t, n_h = sum(target_lengths), sum(history_lengths)
    q = torch.randn(n_t, heads, dim, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(n_h, heads, dim, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(n_h, heads, dim_v, generator=gen, dtype=dtype).requires_grad_()
    q_offsets = offsets_from_lengths(torch.tensor(target_lengths))
    return q, k, v, q_offsets, offsets_from_lengths(torch.tensor(history_lengths))


def _outputs_and_grads(fn, q, k, v, *args):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, *args)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)  # a non-trivial upstream grad
    if out.requires_grad:  # the naive loop builds no graph when no request has a history
        (out * weights).sum().backward()
    return out.detach(), [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in (q, k, v)]


CASES = [
    ([3, 1, 4], [5, 0, 7]),  # an empty history in the middle
    ([1], [9]),  # one target
    ([2, 2], [0, 0]),  # no history anywhere
    ([1, 5, 2, 3], [1, 16, 3, 11]),
    ([0, 2], [4, 3]),  # a request without targets
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("target_lengths,history_lengths", CASES)
def test_matches_naive_loop(target_lengths, history_lengths, dtype):
    q, k, v, q_off, kv_off = random_case(target_lengths, history_lengths, dtype=dtype, dim_v=6)
    scale = 0.3
    got, got_grads = _outputs_and_grads(
        lambda *a: target_attention(*a, scale=scale, backend="pytorch"), q, k, v, q_off, kv_off
    )
    want, want_grads = _outputs_and_grads(naive_target_attention, q, k, v, q_off, kv_off, scale)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, want, **tol)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"grad of {name}: {m}")


def test_random_ragged_shapes():
    gen = torch.Generator().manual_seed(1)
    for seed in range(6):
        requests = int(torch.randint(1, 6, (1,), generator=gen))
        targets = torch.randint(0, 5, (requests,), generator=gen).tolist()
        history = torch.randint(0, 12, (requests,), generator=gen).tolist()
        q, k, v, q_off, kv_off = random_case(targets, history, heads=3, dim=4, dtype=torch.float64, seed=seed)
        got, got_grads = _outputs_and_grads(lambda *a: target_attention(*a, backend="pytorch"), q, k, v, q_off, kv_off)
        want, want_grads = _outputs_and_grads(naive_target_attention, q, k, v, q_off, kv_off, 4 ** -0.5)
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w)


def test_empty_history_gives_zeros_and_finite_grads():
    q, k, v, q_off, kv_off = random_case([2, 3], [0, 4])
    out = target_attention(q, k, v, q_off, kv_off, backend="pytorch")
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert out[2:].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:2], torch.zeros_like(q.grad[:2]))


def test_requests_do_not_leak_into_each_other():
    q, k, v, q_off, kv_off = random_case([2, 2], [3, 3])
    base = target_attention(q, k, v, q_off, kv_off, backend="pytorch").detach()
    with torch.no_grad():
        v[3:] += 10.0  # touch request 1's history only
    after = target_attention(q, k, v, q_off, kv_off, backend="pytorch").detach()
    torch.testing.assert_close(after[:2], base[:2])
    assert not torch.allclose(after[2:], base[2:])


def test_default_scale_is_inverse_sqrt_dim():
    q, k, v, q_off, kv_off = random_case([2], [5], dim=16)
    torch.testing.assert_close(
        target_attention(q, k, v, q_off, kv_off, backend="pytorch"),
        target_attention(q, k, v, q_off, kv_off, scale=0.25, backend="pytorch"),
    )


def test_bad_inputs_raise_clear_errors():
    q, k, v, q_off, kv_off = random_case([2, 1], [3, 4])
    with pytest.raises(JaggedInputError, match="q must be"):
        target_attention(q[0], k, v, q_off, kv_off)
    with pytest.raises(JaggedInputError, match="k must be"):
        target_attention(q, k[:, :1], v, q_off, kv_off)
    with pytest.raises(JaggedInputError, match="v must be"):
        target_attention(q, k, v[:-1], q_off, kv_off)
    with pytest.raises(JaggedInputError, match="dtype"):
        target_attention(q, k.double(), v, q_off, kv_off)
    with pytest.raises(JaggedInputError, match="q_offsets.*offsets\\[-1\\]"):
        target_attention(q, k, v, torch.tensor([0, 2, 4]), kv_off)
    with pytest.raises(JaggedInputError, match="kv_offsets.*non-decreasing"):
        target_attention(q, k, v, q_off, torch.tensor([0, 8, 7]))
    with pytest.raises(JaggedInputError, match="same requests"):
        target_attention(q, k, v, torch.tensor([0, 3]), kv_off)
    with pytest.raises(JaggedInputError, match="max_seq_len"):
        target_attention(q, k, v, q_off, kv_off, max_history_len=3)
    with pytest.raises(JaggedInputError, match="scale"):
        target_attention(q, k, v, q_off, kv_off, scale=0.0)
    with pytest.raises(ValueError, match="unknown backend"):
        target_attention(q, k, v, q_off, kv_off, backend="cuda")


@pytest.mark.skipif(not triton_available(), reason="Triton not importable")
def test_triton_on_cpu_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, q_off, kv_off = random_case([1], [2])
    with pytest.raises(BackendUnavailableError):
        target_attention(q, k, v, q_off, kv_off, backend="triton")


def test_key_limit_equals_attention_over_each_targets_visible_prefix():
    # the definition, target by target: truncate the request's history to the target's limit
    q, k, v, q_off, kv_off = random_case([3, 2, 1], [6, 0, 9], dtype=torch.float64)
    limits = torch.tensor([0, 2, 50, 1, 0, 9])
    out, lse = target_attention(q, k, v, q_off, kv_off, scale=0.3, key_limit=limits, return_lse=True,
                                backend="pytorch")
    request = [0, 0, 0, 1, 1, 2]
    for t, r in enumerate(request):
        lo = int(kv_off[r])
        hi = min(lo + int(limits[t]), int(kv_off[r + 1]))
        if hi == lo:
            assert torch.equal(out[t], torch.zeros_like(out[t])) and bool(torch.isneginf(lse[t]).all())
            continue
        scores = torch.einsum("lhd,hd->hl", k[lo:hi], q[t]) * 0.3
        torch.testing.assert_close(lse[t], torch.logsumexp(scores, dim=-1))
        torch.testing.assert_close(out[t], torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), v[lo:hi]))


def test_lse_merges_disjoint_key_sets_exactly():
    # attention over keys [0, a) and [a, L) merged with their lse == attention over all L keys
    q, k, v, q_off, kv_off = random_case([4], [11], dtype=torch.float64)
    a = 5
    first, lse1 = target_attention(q, k[:a], v[:a], q_off, torch.tensor([0, a]), return_lse=True, backend="pytorch")
    second, lse2 = target_attention(q, k[a:], v[a:], q_off, torch.tensor([0, 11 - a]), return_lse=True,
                                    backend="pytorch")
    whole = target_attention(q, k, v, q_off, kv_off, backend="pytorch")
    w1, w2 = (torch.exp(x - torch.logaddexp(lse1, lse2)).unsqueeze(-1) for x in (lse1, lse2))
    torch.testing.assert_close(w1 * first + w2 * second, whole)


@pytest.mark.parametrize("limits, message", [
    (torch.tensor([1.0, 2.0, 3.0]), "integer tensor"),
    (torch.tensor([1, 2]), r"\[total_targets\] = \[3\]"),
    (torch.tensor([1, -1, 0]), ">= 0"),
])
def test_bad_key_limits_raise(limits, message):
    q, k, v, q_off, kv_off = random_case([2, 1], [3, 4])
    with pytest.raises(JaggedInputError, match=message):
        target_attention(q, k, v, q_off, kv_off, key_limit=limits, backend="pytorch")
