import pytest
import torch
from conftest import DTYPES, GRAD_TOLERANCES, TOLERANCES, assert_close, make_ids, make_logits

from fastgrpo_kernels import selective_logprobs
from fastgrpo_kernels.logprobs import selective_logprobs_reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(401, 1271), (6, 151936)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(backend, dtype, N, V, temperature):
    x = make_logits(N, V, dtype, extreme=True)
    ids = make_ids(N, V)
    ours_in = x.clone().requires_grad_()
    ref_in = x.float().clone().requires_grad_()  # the same values, upcast: our fp32 math should reproduce fp32 torch
    logp, ent = selective_logprobs(ours_in, ids, temperature, return_entropy=True, backend=backend)
    ref_logp, ref_ent = selective_logprobs_reference(ref_in, ids, temperature, return_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32
    # rows at +-1e4 carry fp32 rounding of |z| ~ 1e4: compare them relative to that magnitude
    assert_close(logp, ref_logp, dict(atol=2e-3, rtol=1e-6), "logp")
    assert_close(logp[3:], ref_logp[3:], TOLERANCES[dtype], "logp (ordinary rows)")
    assert_close(ent, ref_ent, dict(atol=2e-3, rtol=1e-5), "entropy")
    g_logp = torch.randn(N, generator=torch.Generator().manual_seed(5))  # grad_output != 1
    g_ent = torch.randn(N, generator=torch.Generator().manual_seed(6))
    (logp * g_logp + ent * g_ent).sum().backward()
    (ref_logp * g_logp + ref_ent * g_ent).sum().backward()
    assert ours_in.grad.dtype == dtype
    assert torch.isfinite(ours_in.grad).all()
    assert_close(ours_in.grad[3:], ref_in.grad[3:], GRAD_TOLERANCES[dtype], "dlogits")
    assert_close(ours_in.grad[:3].nan_to_num(), ref_in.grad[:3].nan_to_num(), dict(atol=5e-3, rtol=1e-2), "dlogits (extreme)")


def test_low_precision_no_worse_than_torch(backend):
    """Our bf16 path (fp32 math inside) is at least as accurate as plain bf16 torch, against fp32 torch."""
    x = make_logits(64, 1271, torch.bfloat16)
    ids = make_ids(64, 1271)
    exact = selective_logprobs_reference(x.float(), ids)
    plain_bf16 = torch.log_softmax(x, -1).gather(-1, ids[:, None]).squeeze(-1).float()
    ours = selective_logprobs(x, ids, backend=backend)
    assert (ours - exact).abs().max() <= (plain_bf16 - exact).abs().max()


def test_shapes_and_inplace_backward(backend):
    x = make_logits(2 * 5, 301, torch.float32).view(2, 5, 301)
    ids = make_ids(10, 301).view(2, 5)
    expected = x.clone().requires_grad_()
    selective_logprobs_reference(expected, ids).sum().backward()
    buf = x.clone().requires_grad_()
    logits = buf * 1.0  # a non-leaf buffer that the backward may overwrite
    logp = selective_logprobs(logits, ids, inplace_backward=True, backend=backend)
    assert logp.shape == (2, 5)
    logp.sum().backward()
    assert_close(buf.grad, expected.grad, GRAD_TOLERANCES[torch.float32], "dlogits")
    assert_close(logits.detach(), expected.grad, GRAD_TOLERANCES[torch.float32], "in-place buffer holds dlogits")


def test_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        selective_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="disagree"):
        selective_logprobs(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="backend"):
        selective_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), backend="cuda")


@pytest.mark.parametrize("bad_id", [-100, -1, 301])
def test_out_of_range_ids_raise(backend, bad_id):
    """No mask here, so every id is read: one outside [0, V) is one ValueError naming the op, on both backends
    (before: an index error on the torch path, an out-of-bounds read in the Triton kernel)."""
    ids = make_ids(4, 301)
    ids[2] = bad_id
    with pytest.raises(ValueError, match=rf"selective_logprobs: token id {bad_id} at position 2 .*\[0, 301\)"):
        selective_logprobs(make_logits(4, 301, torch.float32), ids, backend=backend)
    with pytest.raises(ValueError, match="integers"):
        selective_logprobs(make_logits(4, 301, torch.float32), ids.float(), backend=backend)
