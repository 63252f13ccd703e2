"""Group attention (LONGER's InnerTransformer inside K-token groups): the PyTorch reference and the dispatcher.

The reference is checked against the definition written as a plain loop and against what models/longer.py
computes today (SDPA with the [G, 1, K, K] mask TokenMerge builds, chunked as _sdpa chunks). A
SelfAttentionBlock run through the dispatcher (the integration proposed for longer.py) must equal the block
itself, outputs and parameter gradients. Then bad inputs and the backend choice.
"""
import pytest
import torch

from merlin_longseq.backend import BackendUnavailableError, triton_available
from merlin_longseq.models import longer
from merlin_longseq.ops.group_attention import group_attention
from merlin_longseq.ops.pytorch.pt_group_attention import pytorch_group_attention


def naive_group_attention(q, k, v, slot_valid, scale):
    """One group, head and query slot at a time: the definition, written as plainly as possible."""
    groups, slots, heads, _ = q.shape
    out = torch.zeros_like(q)
    for g in range(groups):
        for h in range(heads):
            for i in range(slots):
                keys = [j for j in range(slots) if bool(slot_valid[g, j]) or j == i]
                scores = torch.stack([(q[g, i, h] * k[g, j, h]).sum() * scale for j in keys])
                weights = torch.softmax(scores, dim=0)
                out[g, i, h] = sum(w * v[g, j, h] for w, j in zip(weights, keys))
    return out


def random_case(groups, slots, heads, dim, dtype=torch.float32, seed=0, p_valid=0.6, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(groups, slots, heads, dim, generator=gen, dtype=dtype).to(device).requires_grad_()
               for _ in range(3))
    slot_valid = (torch.rand(groups, slots, generator=gen) < p_valid).to(device)
    return q, k, v, slot_valid


def outputs_and_grads(fn, q, k, v, *args, **kwargs):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, *args, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
    (out * weights).sum().backward()  # a non-trivial upstream gradient
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("groups,slots,heads,dim", [(5, 4, 1, 8), (3, 1, 2, 4), (4, 3, 2, 6), (2, 8, 1, 5)])
def test_reference_matches_naive_loop(groups, slots, heads, dim):
    q, k, v, slot_valid = random_case(groups, slots, heads, dim, dtype=torch.float64)
    slot_valid[0] = False  # a group whose slots are all empty: every row sees only itself
    got, got_grads = outputs_and_grads(group_attention, q, k, v, slot_valid, 0.7, backend="pytorch")
    want, want_grads = outputs_and_grads(naive_group_attention, q, k, v, slot_valid, 0.7)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[0], v[0].detach(), rtol=1e-12, atol=1e-12)  # all empty: out = own value
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


def longer_sdpa_path(q, k, v, slot_valid):
    """What TokenMerge / SelfAttentionBlock compute today: the TokenMerge mask, [G, H, K, Dh] SDPA."""
    eye = torch.eye(q.shape[1], dtype=torch.bool, device=q.device)
    mask = (slot_valid[:, None, :] | eye).unsqueeze(1)  # [G, 1, K, K]
    out = longer._sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # [G, H, K, Dh]
    return out.transpose(1, 2)


@pytest.mark.parametrize("max_rows", [None, 8], ids=["one_call", "chunked"])
@pytest.mark.parametrize("heads", [1, 2])
def test_reference_equals_longer_sdpa_with_mask(monkeypatch, max_rows, heads):
    if max_rows is not None:
        monkeypatch.setattr(longer, "_SDPA_MAX_ROWS", max_rows)  # several chunks of groups
    q, k, v, slot_valid = random_case(23, 4, heads, 16)
    got, got_grads = outputs_and_grads(group_attention, q, k, v, slot_valid, backend="pytorch")
    want, want_grads = outputs_and_grads(longer_sdpa_path, q, k, v, slot_valid)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def block_with_group_attention(block, x, slot_valid, backend):
    """SelfAttentionBlock.forward with the group path proposed for models/longer.py (see the kernel report):
    q, k, v stay [G, K, H, Dh] views of the Linear outputs, no head transposes."""
    h = block.norm1(x)
    q = block.query(h).unflatten(-1, (block.heads, -1))  # [G, K, H, Dh]
    k, v = (t.unflatten(-1, (block.heads, -1)) for t in block.key_value(h).chunk(2, dim=-1))
    attn = group_attention(q, k, v, slot_valid, backend=backend, check_inputs=False).flatten(-2)  # [G, K, d]
    x = x + block.dropout(block.out(attn))
    return x + block.ffn(block.norm2(x))


BLOCK_BACKENDS = [
    pytest.param("pytorch", "cpu", id="pytorch_cpu"),
    # conftest sets TRITON_INTERPRET=1 on a machine without CUDA before any kernel module is imported
    pytest.param("triton", "cpu", id="triton_interpreter",
                 marks=pytest.mark.skipif(torch.cuda.is_available() or not triton_available(),
                                          reason="the interpreter case runs on CPU-only machines with Triton")),
    pytest.param("triton", "cuda", id="triton_cuda", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("backend,device", BLOCK_BACKENDS)
def test_self_attention_block_through_the_dispatcher_equals_the_block(backend, device):
    torch.manual_seed(0)
    block = longer.SelfAttentionBlock(width=32, heads=2, ffn_mult=2, dropout=0.0).to(device)
    groups = torch.randn(37, 4, 32, device=device)
    slot_valid = torch.rand(37, 4, device=device) < 0.7
    slot_valid[3] = False
    eye = torch.eye(4, dtype=torch.bool, device=device)
    mask = (slot_valid[:, None, :] | eye).unsqueeze(1)

    def run(fn):
        block.zero_grad()
        x = groups.clone().requires_grad_()
        out = fn(x)
        out.square().mean().backward()
        return [out.detach(), x.grad] + [p.grad.clone() for p in block.parameters()]

    got = run(lambda x: block_with_group_attention(block, x, slot_valid, backend))
    want = run(lambda x: block(x, mask))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_groups_and_empty_slots_do_not_leak():
    q, k, v, slot_valid = random_case(3, 4, 1, 8)
    slot_valid[1] = torch.tensor([True, False, True, True])
    base = group_attention(q, k, v, slot_valid, backend="pytorch").detach()
    with torch.no_grad():
        v[2] += 5.0  # another group
        k[1, 1] += 3.0  # the empty slot of group 1: only its own row may change
        v[1, 1] += 3.0
    after = group_attention(q, k, v, slot_valid, backend="pytorch").detach()
    torch.testing.assert_close(after[0], base[0])
    torch.testing.assert_close(after[1, [0, 2, 3]], base[1, [0, 2, 3]])
    assert not torch.allclose(after[1, 1], base[1, 1])
    assert not torch.allclose(after[2], base[2])


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, slot_valid = random_case(4, 3, 2, 16)
    torch.testing.assert_close(group_attention(q, k, v, slot_valid, backend="pytorch"),
                               group_attention(q, k, v, slot_valid, 0.25, backend="pytorch"))


def test_reference_traces_with_torchscript():
    q, k, v, slot_valid = (t.detach() if t.is_floating_point() else t for t in random_case(6, 4, 2, 8))
    traced = torch.jit.trace(lambda a, b, c, s: pytorch_group_attention(a, b, c, s, 0.3), (q, k, v, slot_valid))
    q2, k2, v2, valid2 = (t.detach() if t.is_floating_point() else t for t in random_case(11, 4, 2, 8, seed=1))
    torch.testing.assert_close(traced(q2, k2, v2, valid2), pytorch_group_attention(q2, k2, v2, valid2, 0.3))


def test_empty_batch():
    q, k, v, slot_valid = random_case(0, 4, 2, 8)
    out = group_attention(q, k, v, slot_valid, backend="pytorch")
    assert out.shape == (0, 4, 2, 8)


def test_bad_inputs_raise_clear_errors():
    q, k, v, slot_valid = random_case(3, 4, 2, 8)
    with pytest.raises(ValueError, match=r"q must be \[G, K, H, Dh\]"):
        group_attention(q[0], k[0], v[0], slot_valid)
    with pytest.raises(ValueError, match="k must have q's shape"):
        group_attention(q, k[:, :3], v, slot_valid)
    with pytest.raises(ValueError, match="v must have q's shape"):
        group_attention(q, k, v[..., :4], slot_valid)
    with pytest.raises(ValueError, match="one floating dtype"):
        group_attention(q, k.double(), v, slot_valid)
    with pytest.raises(ValueError, match="one floating dtype"):
        group_attention(*(t.detach().long() for t in (q, k, v)), slot_valid)
    with pytest.raises(ValueError, match="slot_valid must be a bool"):
        group_attention(q, k, v, slot_valid.float())
    with pytest.raises(ValueError, match=r"slot_valid must be \[G, K\]"):
        group_attention(q, k, v, slot_valid[:, :3])
    with pytest.raises(ValueError, match="scale must be positive"):
        group_attention(q, k, v, slot_valid, 0.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        group_attention(q, k, v, slot_valid, float("nan"))
    with pytest.raises(ValueError, match="unknown backend"):
        group_attention(q, k, v, slot_valid, backend="cuda")


def test_auto_on_cpu_is_the_reference():
    q, k, v, slot_valid = random_case(5, 4, 2, 8)
    assert torch.equal(group_attention(q, k, v, slot_valid), pytorch_group_attention(q, k, v, slot_valid, 8 ** -0.5))


@pytest.mark.skipif(not triton_available(), reason="Triton not importable")
def test_triton_on_cpu_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, slot_valid = random_case(2, 4, 1, 8)
    with pytest.raises(BackendUnavailableError):
        group_attention(q, k, v, slot_valid, backend="triton")
