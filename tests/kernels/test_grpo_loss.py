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


# ----------------------------------------------------------------------------------------------------------
# Masked tokens, explicit advantage layout, normalizers


def test_masked_positions_may_hold_any_id(backend):
    """-100 (the Hugging Face label convention) or any id past the vocabulary where mask is 0 changes nothing; an
    unmasked one is one ValueError naming the op, on both backends."""
    logits, ids, mask, old, ref, adv = make_batch(3, 5, 301, seed=4)
    config = GRPOLossConfig(beta=0.04, compute_entropy=True)
    junk = ids.clone()
    masked = mask == 0
    junk[masked] = torch.where(torch.arange(int(masked.sum())) % 2 == 0, -100, 301 + 7)
    clean_in, junk_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    clean, clean_metrics = grpo_loss(clean_in, ids, adv, mask, old, ref, config, backend=backend)
    dirty, dirty_metrics = grpo_loss(junk_in, junk, adv, mask, old, ref, config, backend=backend)
    clean.backward()
    dirty.backward()
    assert_close(dirty, clean, dict(atol=0, rtol=0), "loss")
    assert_close(junk_in.grad, clean_in.grad, dict(atol=0, rtol=0), "dlogits")
    assert_close(dirty_metrics["entropy"], clean_metrics["entropy"], dict(atol=0, rtol=0), "entropy")
    junk[0, 0], mask[0, 0] = -100, 1
    with pytest.raises(ValueError, match=r"grpo_loss: token id -100 at position 0 .* vocabulary \[0, 301\)"):
        grpo_loss(logits, junk, adv, mask, old, ref, config, backend=backend)


def test_masked_minus_inf_target_is_ignored(backend):
    """A masked token whose target logit is -inf (its log-prob -inf, and old / reference log-probs -inf there too)
    adds nothing to the loss or the gradient, with beta > 0: no 0 * inf."""
    logits, ids, mask, old, ref, adv = make_batch(3, 5, 301, seed=5)
    at = (0, int((mask[0] == 0).nonzero()[0]))  # a masked position of sequence 0
    for level in ("token", "sequence"):
        config = GRPOLossConfig(importance_level=level, beta=0.04, compute_entropy=True)
        finite_in = logits.clone().requires_grad_()
        finite, _ = grpo_loss(finite_in, ids, adv, mask, old, ref, config, backend=backend)
        finite.backward()
        bad_logits, bad_old, bad_ref = logits.clone(), old.clone(), ref.clone()
        bad_logits[at + (int(ids[at]),)] = float("-inf")
        bad_old[at], bad_ref[at] = float("-inf"), float("nan")
        bad_in = bad_logits.requires_grad_()
        loss, metrics = grpo_loss(bad_in, ids, adv, mask, bad_old, bad_ref, config, backend=backend)
        loss.backward()
        assert_close(loss, finite, dict(atol=1e-7, rtol=1e-6), f"{level} loss")
        assert torch.isfinite(bad_in.grad).all() and bad_in.grad[at].abs().max() == 0
        assert_close(bad_in.grad, finite_in.grad, GRAD_TOLERANCES[torch.float32], f"{level} dlogits")
        assert all(torch.isfinite(v) for v in metrics.values())


def test_per_token_advantages_are_explicit(backend):
    """Packed, with as many tokens as sequences (N == B: lengths 2, 0, 1): per-token advantages are read per token
    because they come as token_advantages, not because of their size; per-sequence advantages of the wrong size are
    refused."""
    logits, ids, mask, old, ref, _ = make_batch(3, 2, 301, seed=6)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    keep = mask.bool()
    token_adv = torch.tensor([[0.9, -1.3], [0.0, 0.0], [0.4, 0.0]])
    cu_seqlens = torch.tensor([0, 2, 2, 3])
    config = GRPOLossConfig(beta=0.04, temperature=0.8)
    packed_in, padded_in = logits[keep].clone().requires_grad_(), logits.clone().requires_grad_()
    packed, _ = grpo_loss(packed_in, ids[keep], None, None, old[keep], ref[keep], config,
                          token_advantages=token_adv[keep], cu_seqlens=cu_seqlens, backend=backend)
    expected, _ = grpo_loss_reference(padded_in, ids, None, mask, old, ref, config, token_advantages=token_adv)
    packed.backward()
    expected.backward()
    assert_close(packed, expected, dict(atol=1e-6, rtol=1e-5), "loss")
    assert_close(packed_in.grad, padded_in.grad[keep], GRAD_TOLERANCES[torch.float32], "dlogits")
    with pytest.raises(ValueError, match="one per sequence"):
        grpo_loss(logits[keep], ids[keep], token_adv[keep], cu_seqlens=torch.tensor([0, 1, 3]), backend=backend)
    with pytest.raises(ValueError, match="not both"):
        grpo_loss(logits, ids, torch.zeros(3), mask, token_advantages=token_adv, backend=backend)


def split(tensor, parts):
    return [None if tensor is None else tensor[p] for p in parts]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_micro_batch_losses_add_up_to_the_step(backend, loss_type, level):
    """A step cut into micro-batches of unequal size, each given the step's counts (num_items, num_sequences,
    num_batches): their losses and gradients add up to the whole step's, with no rescaling outside the op. bnpo is
    a mean per batch by definition (TRL, Liger): the step averages the micro-batches' token means."""
    logits, ids, mask, old, ref, adv = make_batch(5, 4, 301, seed=7)
    config = GRPOLossConfig(loss_type=loss_type, importance_level=level, beta=0.04, max_completion_length=6)
    parts = [slice(0, 1), slice(1, 4), slice(4, 5)]
    counts = dict(num_items=mask.sum(), num_sequences=5, num_batches=len(parts))
    whole_in = logits.clone().requires_grad_()
    micro_in = [x.clone().requires_grad_() for x in split(logits, parts)]
    if loss_type == "bnpo":
        whole = sum(grpo_loss_reference(whole_in[p], ids[p], adv[p], mask[p], old[p], ref[p], config)[0]
                    for p in parts) / len(parts)
    else:
        whole, _ = grpo_loss_reference(whole_in, ids, adv, mask, old, ref, config)
    total = 0.0
    for x, *rest in zip(micro_in, *(split(t, parts) for t in (ids, adv, mask, old, ref))):
        loss, _ = grpo_loss(x, *rest, config, backend=backend, **counts)
        total = total + loss
    (1.3 * whole).backward()
    (1.3 * total).backward()
    assert_close(total, whole, dict(atol=1e-6, rtol=1e-5), "loss")
    assert_close(torch.cat([x.grad for x in micro_in]), whole_in.grad, GRAD_TOLERANCES[torch.float32], "dlogits")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_nothing_to_train(backend, loss_type):
    """Every completion masked (e.g. all truncated under mask_truncated), num_items 0: the loss is 0 with zero
    finite gradients, as TRL's clamped normalizers give, instead of 0 / 0."""
    logits, ids, mask, old, ref, adv = make_batch(3, 4, 301, seed=8)
    config = GRPOLossConfig(loss_type=loss_type, beta=0.04, compute_entropy=True)
    x = logits.clone().requires_grad_()
    loss, metrics = grpo_loss(x, ids, adv, torch.zeros_like(mask), old, ref, config, num_items=0.0, backend=backend)
    loss.backward()
    assert loss == 0 and x.grad.abs().max() == 0
    assert all(torch.isfinite(v) for v in metrics.values()) and metrics["tokens"] == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_items=-1.0), "num_items"),
    (dict(num_sequences=float("nan")), "num_sequences"),
    (dict(num_batches=0), "num_batches"),
    (dict(num_batches=1.5), "num_batches"),
])
def test_bad_normalizers(kwargs, match):
    logits, ids, mask, old, ref, adv = make_batch(2, 3, 11)
    with pytest.raises(ValueError, match=match):
        grpo_loss(logits, ids, adv, mask, old, ref, **kwargs)
