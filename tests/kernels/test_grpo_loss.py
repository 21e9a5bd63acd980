import itertools

import pytest
import torch
from conftest import GRAD_TOLERANCES, assert_close, make_ids, make_logits

from fastgrpo_kernels import GRPOLossConfig, grpo_loss, truncated_is_weights
from fastgrpo_kernels.grpo_loss import grpo_loss_reference

VARIANTS = [
    dict(loss_type=lt, importance_level=lvl, beta=beta, delta=delta)
    for lt, lvl, beta, delta in itertools.product(["grpo", "bnpo", "dapo", "dr_grpo"], ["token", "sequence"],
                                                  [0.0, 0.04], [None, 2.0])
]


def make_batch(B, T, V, dtype=torch.float32, seed=0, temperature=0.8, extreme=False):
    """Logits [B, T, V] and per-token inputs whose old/ref log-probs sit near the policy's, so ratios straddle
    the clip range; sequence 1 is fully masked; advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    logits = make_logits(B * T, V, dtype, seed, extreme=extreme).view(B, T, V)
    ids = make_ids(B * T, V, seed).view(B, T)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    if B > 1:
        mask[1] = 0
    with torch.no_grad():
        logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    return logits, ids, mask, old, ref, adv


def run_both(logits, ids, adv, mask, old, ref, config, backend, grad_scale=1.7, **kw):
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.float().clone().requires_grad_()
    loss, metrics = grpo_loss(ours_in, ids, adv, mask, old, ref, config, backend=backend, **kw)
    ref_loss, ref_metrics = grpo_loss_reference(ref_in, ids, adv, mask, old, ref, config,
                                                is_weights=kw.get("is_weights"), num_items=kw.get("num_items"))
    (loss * grad_scale).backward()
    (ref_loss * grad_scale).backward()
    return (loss, metrics, ours_in.grad), (ref_loss, ref_metrics, ref_in.grad)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_variants_match_reference(backend, variant):
    logits, ids, mask, old, ref, adv = make_batch(4, 7, 301)
    config = GRPOLossConfig(eps_low=0.2, eps_high=0.28, temperature=0.8, compute_entropy=True, **variant)
    (loss, metrics, grad), (ref_loss, ref_metrics, ref_grad) = run_both(logits, ids, adv, mask, old, ref, config, backend)
    assert_close(loss, ref_loss, dict(atol=1e-6, rtol=1e-5), "loss")
    assert_close(grad, ref_grad, GRAD_TOLERANCES[torch.float32], "dlogits")
    assert grad[1].abs().max() == 0  # the fully masked sequence gets no gradient
    for name, value in metrics.items():
        if name != "tokens":
            assert_close(value, ref_metrics[name], dict(atol=1e-6, rtol=1e-5), name)
    assert metrics["tokens"] == mask.sum()
    assert ("kl" in metrics) == (variant["beta"] > 0)
    if variant["importance_level"] == "token":
        assert 0 < metrics["clip_region"] < 1  # the inputs really exercise clipping


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,V", [(401, 1271), (8, 151936)])
def test_low_precision_odd_and_real_vocab(backend, dtype, N, V):
    B = 2 if N % 2 == 0 else 1
    logits, ids, mask, old, ref, adv = make_batch(B, N // B, V, dtype, extreme=True)
    config = GRPOLossConfig(loss_type="dapo", beta=0.04, eps_high=0.28, temperature=0.8, delta=1.5)
    (loss, _, grad), (ref_loss, _, ref_grad) = run_both(logits, ids, adv, mask, old, ref, config, backend, grad_scale=0.5)
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, dict(atol=1e-4, rtol=1e-4), "loss")
    assert_close(grad.float(), ref_grad, GRAD_TOLERANCES[dtype], "dlogits")


def test_packed_equals_padded(backend):
    """[N, V] with cu_seqlens gives the padded batch's loss and gradients (padding removed)."""
    logits, ids, mask, old, ref, adv = make_batch(3, 6, 301)
    mask = torch.ones_like(mask)
    lengths = torch.tensor([6, 2, 4])
    for b, n in enumerate(lengths):
        mask[b, n:] = 0
    config = GRPOLossConfig(importance_level="sequence", beta=0.04)
    keep = mask.bool()
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    padded_in = logits.clone().requires_grad_()
    packed_in = logits[keep].clone().requires_grad_()
    padded, _ = grpo_loss(padded_in, ids, adv, mask, old, ref, config, backend=backend)
    packed, _ = grpo_loss(packed_in, ids[keep], adv, None, old[keep], ref[keep], config, cu_seqlens=cu_seqlens,
                          backend=backend)
    padded.backward()
    packed.backward()
    assert_close(packed, padded, dict(atol=1e-6, rtol=1e-6), "loss")
    assert_close(packed_in.grad, padded_in.grad[keep], GRAD_TOLERANCES[torch.float32], "dlogits")


def test_is_weights_num_items_inplace(backend):
    logits, ids, mask, old, ref, adv = make_batch(4, 5, 301, seed=3)
    rollout = old + 0.1 * torch.randn_like(old)
    is_weights = truncated_is_weights(old, rollout, mask, cap=1.05)
    assert is_weights.max() <= 1.05 and (is_weights < 1.05).any()
    config = GRPOLossConfig(loss_type="dapo", beta=0.04)
    (loss, _, grad), (ref_loss, _, ref_grad) = run_both(logits, ids, adv, mask, old, ref, config, backend,
                                                        is_weights=is_weights, num_items=123.0)
    assert_close(loss, ref_loss, dict(atol=1e-6, rtol=1e-5), "loss")
    assert_close(grad, ref_grad, GRAD_TOLERANCES[torch.float32], "dlogits")
    leaf = logits.clone().requires_grad_()
    logits_view = leaf * 1.0  # a non-leaf buffer the backward may overwrite
    loss, _ = grpo_loss(logits_view, ids, adv, mask, old, ref, config, is_weights=is_weights, num_items=123.0,
                        inplace_backward=True, backend=backend)
    (loss * 1.7).backward()  # run_both's grad_scale
    assert_close(leaf.grad, ref_grad, GRAD_TOLERANCES[torch.float32], "in-place dlogits")


def test_on_policy_default(backend):
    """old_logp=None is the on-policy case: ratio 1, no clipping, gradient = -A * dlogp / normalizer."""
    logits, ids, mask, _, _, adv = make_batch(3, 4, 301)
    loss, metrics = grpo_loss(logits, ids, adv, mask, backend=backend)
    assert metrics["clip_region"] == 0 and torch.isclose(metrics["ratio"], torch.tensor(1.0))
    ref_loss, _ = grpo_loss_reference(logits, ids, adv, mask)
    assert_close(loss, ref_loss, dict(atol=1e-6, rtol=1e-6), "loss")


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(importance_level="seq"), "importance_level"),
    (dict(delta=1.1), "delta"),
    (dict(beta=-1.0), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(eps_low=1.5), "eps_low"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOLossConfig(**kwargs)


def test_bad_inputs():
    logits, ids, mask, old, ref, adv = make_batch(2, 3, 11)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logits, ids, adv, mask, old, None, GRPOLossConfig(beta=0.1))
    with pytest.raises(ValueError, match="old_logp has 5 elements"):
        grpo_loss(logits, ids, adv, mask, old.reshape(-1)[:5], ref)
    with pytest.raises(ValueError, match="cu_seqlens"):
        grpo_loss(logits.view(6, 11), ids.view(6), adv, cu_seqlens=torch.tensor([0, 2, 5]))
