import pytest
import torch
from conftest import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from fastgrpo_kernels import (GRPOLossConfig, fused_linear, fused_linear_cross_entropy, fused_linear_grpo_loss,
                              fused_linear_logprobs)
from fastgrpo_kernels.grpo_loss import grpo_loss_reference
from fastgrpo_kernels.logprobs import selective_logprobs_reference

B, T, H, V = 3, 9, 16, 1271
TOL = dict(atol=1e-5, rtol=1e-5)
SMALL_CHUNK = V * 4 * 4  # 4 rows per chunk: 27 rows exercise several chunks and a ragged last one


def make_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 0], ids[-1, -1] = 0, V - 1
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[1] = 0
    with torch.no_grad():
        logp = selective_logprobs_reference(hidden.float() @ weight.float().T / 0.7, ids)
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    return hidden, weight, ids, mask, old, ref, torch.randn(B, generator=g)


def leaves(*tensors, grad=True):
    return [t.clone().requires_grad_(grad) for t in tensors]


class CountMatmuls(TorchDispatchMode):
    """Multiply-adds of every matrix product run inside it."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out):
            a, b = args[0], args[1]
        elif func in (torch.ops.aten.addmm_.default, torch.ops.aten.addmm.default):
            a, b = args[1], args[2]
        else:
            return func(*args, **(kwargs or {}))
        self.macs += a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True, params=["one_tile", "many_tiles", "mid_tiles"])
def vocab_tiles(request, monkeypatch):
    """The torch path sweeps each chunk's vocabulary in cache-sized tiles: at these sizes one tile, unless the
    tile budget shrinks: to the minimum width (128: ten tiles over V = 1271, the last one ragged), or to 384-wide
    tiles for the 4-row chunks (four, the last one ragged; 128 for the 16-row chunks of the no-gradient sweeps)."""
    if request.param != "one_tile":
        monkeypatch.setattr(fused_linear, "TILE_BYTES", 1 if request.param == "many_tiles" else 4 * 4 * 384)
    return request.param


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_reference(backend, level, beta):
    hidden, weight, ids, mask, old, ref, adv = make_inputs()
    config = GRPOLossConfig(importance_level=level, beta=beta, eps_high=0.28, temperature=0.7, compute_entropy=True)
    h1, w1, h2, w2 = leaves(hidden, weight, hidden, weight)
    loss, metrics = fused_linear_grpo_loss(h1, w1, ids, adv, mask, old, ref, config, backend=backend,
                                           chunk_bytes=SMALL_CHUNK)
    ref_loss, ref_metrics = grpo_loss_reference(h2 @ w2.T, ids, adv, mask, old, ref, config)
    (loss * 0.3).backward()
    (ref_loss * 0.3).backward()
    assert_close(loss, ref_loss, TOL, "loss")
    assert_close(h1.grad, h2.grad, TOL, "dhidden")
    assert_close(w1.grad, w2.grad, TOL, "dweight")
    for name in metrics:
        if name != "tokens":
            assert_close(metrics[name], ref_metrics[name], TOL, name)


def test_packed_and_frozen_head(backend):
    hidden, weight, ids, mask, old, ref, adv = make_inputs(seed=1)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, 5:] = False
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)])
    config = GRPOLossConfig(loss_type="bnpo", beta=0.04)
    h1, h2 = leaves(hidden, hidden)
    frozen = weight.clone()
    loss, _ = fused_linear_grpo_loss(h1[keep], frozen, ids[keep], adv, None, old[keep], ref[keep], config,
                                     cu_seqlens=cu_seqlens, backend=backend, chunk_bytes=SMALL_CHUNK)
    ref_loss, _ = grpo_loss_reference(h2 @ weight.T, ids, adv, keep.float(), old, ref, config)
    loss.backward()
    ref_loss.backward()
    assert frozen.grad is None
    assert_close(loss, ref_loss, TOL, "loss")
    assert_close(h1.grad, h2.grad, TOL, "dhidden")


@pytest.mark.parametrize("frozen", [False, True])
def test_three_matmuls(frozen):
    """Token-level loss: exactly the work of z = hW^T, dh = dz W and dW = dz^T h, nothing recomputed; frozen
    head: the first two."""
    hidden, weight, ids, mask, old, ref, adv = make_inputs()
    h, w = leaves(hidden, weight)
    w.requires_grad_(not frozen)
    with CountMatmuls() as counter:
        loss, _ = fused_linear_grpo_loss(h, w, ids, adv, mask, old, ref, GRPOLossConfig(beta=0.04), backend="torch",
                                         chunk_bytes=SMALL_CHUNK)
        loss.backward()
    assert counter.macs == B * T * V * H * (2 if frozen else 3)


def test_logprobs_and_cross_entropy(backend):
    hidden, weight, ids, mask, *_ = make_inputs(seed=2)
    h1, w1, h2, w2 = leaves(hidden, weight, hidden, weight)
    with torch.no_grad():
        assert_close(fused_linear_logprobs(hidden, weight, ids, 0.7, backend=backend, chunk_bytes=SMALL_CHUNK),
                     selective_logprobs_reference(hidden @ weight.T, ids, 0.7), TOL, "no-grad logp")
    g = torch.randn(B, T)
    (fused_linear_logprobs(h1, w1, ids, 0.7, backend=backend, chunk_bytes=SMALL_CHUNK) * g).sum().backward()
    (selective_logprobs_reference(h2 @ w2.T, ids, 0.7) * g).sum().backward()
    assert_close(h1.grad, h2.grad, TOL, "logp dhidden")
    assert_close(w1.grad, w2.grad, TOL, "logp dweight")

    labels = ids.clone()
    labels[0, :4] = -100
    for reduction in ("mean", "sum"):
        h1, w1, h2, w2 = leaves(hidden, weight, hidden, weight)
        loss = fused_linear_cross_entropy(h1, w1, labels, mask=mask, reduction=reduction, backend=backend,
                                          chunk_bytes=SMALL_CHUNK)
        per_token = torch.nn.functional.cross_entropy((h2 @ w2.T).view(-1, V), labels.view(-1), reduction="none")
        keep = (labels.view(-1) >= 0).float() * mask.view(-1)
        ref_loss = (per_token * keep).sum() / (keep.sum() if reduction == "mean" else 1)
        (2 * loss).backward()
        (2 * ref_loss).backward()
        assert_close(loss, ref_loss, TOL, f"ce {reduction}")
        assert_close(h1.grad, h2.grad, TOL, f"ce {reduction} dhidden")
        assert_close(w1.grad, w2.grad, TOL, f"ce {reduction} dweight")


def test_bf16_inputs_torch_path():
    """bf16 hidden/weight: fp32 logits chunks inside, gradients in bf16, close to the fp32 answer."""
    hidden, weight, ids, mask, old, ref, adv = make_inputs(torch.bfloat16)
    h1, w1 = leaves(hidden, weight)
    h2, w2 = leaves(hidden.float(), weight.float())
    config = GRPOLossConfig(beta=0.04)
    loss, _ = fused_linear_grpo_loss(h1, w1, ids, adv, mask, old, ref, config, backend="torch", chunk_bytes=SMALL_CHUNK)
    ref_loss, _ = grpo_loss_reference(h2 @ w2.T, ids, adv, mask, old, ref, config)
    loss.backward()
    ref_loss.backward()
    assert h1.grad.dtype == w1.grad.dtype == torch.bfloat16
    assert_close(loss, ref_loss, dict(atol=1e-3, rtol=1e-3), "loss")
    assert_close(h1.grad, h2.grad, dict(atol=2e-3, rtol=2e-2), "dhidden")
    assert_close(w1.grad, w2.grad, dict(atol=2e-3, rtol=2e-2), "dweight")


def test_autocast_computes_like_bf16_inputs_with_fp32_gradients():
    """Under torch.autocast the fp32 leaves are cast on entry: the same numbers as bf16 leaves, but the gradients
    come back in the leaves' fp32 (what a mixed-precision trainer's fp32 weights need)."""
    hidden, weight, ids, mask, old, ref, adv = make_inputs()
    config = GRPOLossConfig(beta=0.04)

    def run(h, w):
        loss, _ = fused_linear_grpo_loss(h, w, ids, adv, mask, old, ref, config, backend="torch",
                                         chunk_bytes=SMALL_CHUNK)
        logp = fused_linear_logprobs(h, w, ids, temperature=0.7, backend="torch", chunk_bytes=SMALL_CHUNK)
        ce = fused_linear_cross_entropy(h, w, ids, backend="torch", chunk_bytes=SMALL_CHUNK)
        (loss + (logp * mask).sum() + ce).backward()
        return loss, logp, ce

    h32, w32 = leaves(hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run(h32, w32)
    h16, w16 = leaves(hidden.bfloat16(), weight.bfloat16())
    plain = run(h16, w16)
    assert h32.grad.dtype == w32.grad.dtype == torch.float32
    for name, a, b in zip(("loss", "logp", "ce"), mixed, plain):
        assert a.dtype == torch.float32
        assert_close(a, b, dict(atol=1e-6, rtol=1e-6), name)
    # the same gradients to bf16 rounding: the bf16 run sums the three ops' gradients in bf16, the mixed one in fp32
    assert_close(h32.grad, h16.grad.float(), dict(atol=1e-2, rtol=1e-2), "dhidden")
    assert_close(w32.grad, w16.grad.float(), dict(atol=1e-2, rtol=1e-2), "dweight")


def test_bad_input():
    hidden, weight, ids, *_ = make_inputs()
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_logprobs(hidden, weight[:, :-1], ids)
    with pytest.raises(ValueError, match="disagree"):
        fused_linear_logprobs(hidden, weight, ids[:, :-1])
    with pytest.raises(ValueError, match="chunk_bytes"):
        fused_linear_logprobs(hidden, weight, ids, chunk_bytes=0)


def test_masked_positions_may_hold_any_id(backend):
    """-100 or an id past the vocabulary where mask is 0 changes nothing; unmasked (and in the ops without a mask)
    it is one ValueError naming the op, on both backends (before: the torch path wrapped the negative index, the
    Triton kernel read out of bounds)."""
    hidden, weight, ids, mask, old, ref, adv = make_inputs(seed=3)
    masked = mask == 0
    junk = ids.masked_fill(masked, -100)
    junk[masked & (torch.arange(T) % 2 == 0)] = V + 3
    config = GRPOLossConfig(beta=0.04, compute_entropy=True)
    results = []
    for targets in (ids, junk):
        h, w = leaves(hidden, weight)
        loss, metrics = fused_linear_grpo_loss(h, w, targets, adv, mask, old, ref, config, backend=backend,
                                               chunk_bytes=SMALL_CHUNK)
        loss.backward()
        results.append((loss, metrics["entropy"], h.grad, w.grad))
    for name, a, b in zip(("loss", "entropy", "dhidden", "dweight"), *results):
        assert_close(b, a, dict(atol=0, rtol=0), name)
    unmasked = junk.clone()
    unmasked[0, 0], mask[0, 0] = -100, 1
    with pytest.raises(ValueError, match=r"fused_linear_grpo_loss: token id -100 at position 0 "):
        fused_linear_grpo_loss(hidden, weight, unmasked, adv, mask, old, ref, config, backend=backend)
    with pytest.raises(ValueError, match=rf"fused_linear_logprobs: token id {V + 3} .*\[0, {V}\)"):
        fused_linear_logprobs(hidden, weight, junk.clamp(min=0), backend=backend)

    labels = ids.masked_fill(masked, V + 3)  # past the vocabulary, but masked: ignored like -100
    losses = [fused_linear_cross_entropy(hidden, weight, y, mask=mask, backend=backend, chunk_bytes=SMALL_CHUNK)
              for y in (ids, labels)]
    assert_close(losses[1], losses[0], dict(atol=0, rtol=0), "ce")
    with pytest.raises(ValueError, match=rf"fused_linear_cross_entropy: token id {V + 3} "):
        fused_linear_cross_entropy(hidden, weight, labels, backend=backend)


def test_autocast_fp32_weight_gradient_sums_in_fp32_over_many_chunks(backend, vocab_tiles):
    """An fp32 weight under bf16 autocast gets dW summed in fp32 across chunks on both backends: its error against
    fp64 does not grow with the number of chunks. A frequent token over similar hidden states makes one row of dW
    a long coherent sum, the worst case for a low-precision sum: 128 one-row chunks measured 4.0e-2 relative on
    the Triton path when it summed in bf16 (4.1e-3 in one chunk); 5.4e-3 in fp32 (torch path: 5e-4, 9e-4)."""
    if vocab_tiles != "one_tile":
        pytest.skip("sums over chunks, whatever the tiles; 128 chunks are slow under the interpreter")
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(H, generator=g) + 0.1 * torch.randn(128, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    ids = torch.full((128,), 5)
    # the exact gradient of what autocast computes: bf16-rounded inputs, then exact arithmetic
    w64 = weight.bfloat16().double().requires_grad_()
    torch.nn.functional.cross_entropy(hidden.bfloat16().double() @ w64.T, ids, reduction="sum").backward()
    errors = []
    for chunk_bytes in (None, 1):  # one chunk, one row per chunk
        w = weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused_linear_cross_entropy(hidden, w, ids, reduction="sum", backend=backend,
                                       chunk_bytes=chunk_bytes).backward()
        assert w.grad.dtype == torch.float32
        errors.append(float((w.grad.double() - w64.grad).norm() / w64.grad.norm()))
    assert errors[1] < 1e-2 and errors[1] < 2 * errors[0], f"dW relative error, 1 chunk / 128 chunks: {errors}"


def test_bf16_backends_compute_the_same_logprobs():
    """bf16 at temperature 0.7: the torch path takes the target logit from the same bf16 product its log-sum-exp
    saw, as the Triton path does, so the two agree to fp32 rounding: 1.9e-6 here, where they were up to 4.0e-2 apart
    when the torch path took an fp32 dot product for the target logit."""
    hidden, weight, ids, mask, _, _, adv = make_inputs(torch.bfloat16, seed=4)
    hidden, weight = hidden * 2, weight * 2  # logits ~ 8, which bf16 rounds by up to 1.6e-2
    with torch.no_grad():
        logp = [fused_linear_logprobs(hidden, weight, ids, 0.7, backend=b, chunk_bytes=SMALL_CHUNK)
                for b in ("torch", "triton")]
    assert_close(logp[0], logp[1], dict(atol=2e-5, rtol=0), "logp, torch vs triton")
    old, ref = logp[1] + 0.1, logp[1] - 0.1
    config = GRPOLossConfig(beta=0.04, temperature=0.7)
    losses = [fused_linear_grpo_loss(hidden, weight, ids, adv, mask, old, ref, config, backend=b,
                                     chunk_bytes=SMALL_CHUNK)[0] for b in ("torch", "triton")]
    assert_close(losses[0], losses[1], dict(atol=1e-6, rtol=1e-6), "loss, torch vs triton")
