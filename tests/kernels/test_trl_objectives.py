"""Parity with TRL 1.16 for what it has beyond grpo / bnpo / dapo / dr_grpo (those: test_parity.py): the cispo,
sapo, luspo and vespo losses, the KL bias correction, and the four rollout-correction modes of
`vllm_importance_sampling_mode`. Each against TRL's own code: `GRPOTrainer._compute_loss` through
test_parity's stand-in, and the importance-sampling block of `_generate_and_score_completions`, cut from TRL's
source and run as it is. Loss and d(loss)/d(logits) in fp32 on CPU; then the packed layout and the fused-linear op
against the padded logits op, which TRL has just vouched for.

Deliberate differences, not compared (every one we know of):
- vespo sums the log IS weights over the completion's tokens; TRL over every position of the padded [B, T] batch.
  They agree wherever padding holds ratio 1, as TRL's own weights do unless C_min > 1 or C_max < 1.
- TRL warns and goes on where ours raises: vespo with importance_level="sequence" (vespo ignores it), delta with
  cispo / sapo / vespo (which have no clip for it to cap).
- TRL logs no clip fractions for sapo and vespo (ours are 0: nothing is clipped), and vespo's mean weight, which
  ours does not compute.
"""

import dataclasses
import inspect
import math
import textwrap
import types

import pytest
import torch
from test_parity import LEVELS, TOL, B, T, V, make_batch, run_ours, run_trl, trl  # noqa: F401 (trl: a fixture)

from fastgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss, grpo_loss, rollout_is_weights
from fastgrpo_kernels.grpo_loss import IS_MODES

# Each loss type's own hyperparameters, off TRL's defaults (test_defaults_are_trls checks those), so that each
# one is seen to reach the loss. cispo's cap sits inside the batch's ratios (test_cispo_cap_is_reached).
SETUPS = {
    "cispo": dict(eps_high=1.3),
    "sapo": dict(sapo_temperature_pos=1.5, sapo_temperature_neg=2.5),
    "luspo": dict(),
    "vespo": dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5),
}
# make_batch's options (test_parity.CASES), plus config fields; delta only where there is a clip to cap.
CASES = {
    "on_policy": dict(on_policy=True),
    "off_policy": dict(),
    "kl": dict(beta=0.04),
    "kl_bias_correction": dict(beta=0.04, config=dict(bias_correction_kl=True)),
    "is_token": dict(is_weights="token"),
    "is_sequence": dict(is_weights="sequence"),
    "temperature": dict(temperature=0.7),
    "everything": dict(beta=0.04, eps_high=0.28, delta=1.35, is_weights="token", temperature=0.7,
                       config=dict(bias_correction_kl=True)),
}
# Our Triton backend shares every line of the objective with the torch one; the interpreter is slow, so one case.
TRITON_CASES = ("everything",)


def trl_batch(case_name, loss_type, level, seed=0):
    case = dict(CASES[case_name])
    if loss_type != "luspo":
        case.pop("delta", None)
    batch = make_batch(case, "grpo", level, seed)
    batch.config = dataclasses.replace(batch.config, loss_type=loss_type, **SETUPS[loss_type],
                                       **case.get("config", {}))
    if loss_type in ("cispo", "vespo"):  # normalized by the generation batch's tokens, as dapo
        batch.num_items = 3 * batch.mask.sum()
    if loss_type == "vespo" and batch.is_weights is not None:  # padding holds ratio 1 (see the module docstring)
        batch.is_weights = torch.where(batch.mask.bool(), batch.is_weights, 1.0)
    return batch


def combinations():
    for loss_type in SETUPS:
        for level in LEVELS:
            for case in CASES:
                if loss_type == "vespo" and (level == "sequence" or case == "is_sequence"):
                    continue  # vespo: token-level ratios and IS weights only (TRL raises for sequence IS modes)
                for backend in ("torch", "triton"):
                    if backend == "torch" or case in TRITON_CASES:
                        yield pytest.param(loss_type, level, case, backend, id=f"{loss_type}-{level}-{case}-{backend}")


@pytest.mark.parametrize("loss_type,level,case,backend", list(combinations()))
def test_matches_trl(trl, loss_type, level, case, backend):
    batch = trl_batch(case, loss_type, level)
    loss, grad, metrics = run_ours(batch, backend)
    trl_loss, trl_grad, trl_metrics = run_trl(trl, batch)

    torch.testing.assert_close(loss, trl_loss, **TOL)
    torch.testing.assert_close(grad, trl_grad, **TOL)
    names = {"entropy": "entropy"} | ({"kl": "kl"} if batch.config.beta != 0 else {})
    if level == "token":  # TRL's sequence-level clip fractions count sequences (test_parity's docstring)
        names |= {"cispo": {"clip_high": "cispo_clip_ratio"},
                  "luspo": {"clip_low": "clip_ratio/low_mean", "clip_high": "clip_ratio/high_mean",
                            "clip_region": "clip_ratio/region_mean"}}.get(loss_type, {})
    for name, trl_name in names.items():
        torch.testing.assert_close(metrics[name], trl_metrics[trl_name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("level", LEVELS)
def test_cispo_cap_is_reached(level):
    """The stop-gradient cap means something only if ratios fall on both sides of it, for both advantage signs."""
    batch = trl_batch("everything", "cispo", level)
    c, mask = batch.config, batch.mask.bool()
    logp = torch.log_softmax(batch.logits / c.temperature, -1).gather(-1, batch.ids[..., None]).squeeze(-1)
    log_ratio = (logp - batch.old_logp) * mask
    if level == "sequence":
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand(B, T)
    ratio, adv = log_ratio.exp()[mask], batch.advantages[:, None].expand(B, T)[mask]
    for sign in (adv > 0, adv < 0):
        assert (sign & (ratio > c.eps_high)).any() and (sign & (ratio < c.eps_high)).any()


def test_defaults_are_trls():
    """Our defaults for TRL's loss hyperparameters are TRL's own (GRPOConfig's fields)."""
    pytest.importorskip("trl")
    from trl import GRPOConfig

    trl_defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    ours = GRPOLossConfig()
    for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                 "vespo_lambda_neg", "delta", "beta"):
        assert getattr(ours, name) == trl_defaults[name], name
    assert ours.eps_low == trl_defaults["epsilon"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="sapo", delta=2.0), "delta caps"),
    (dict(loss_type="vespo", importance_level="sequence"), "importance_level must be 'token'"),
    (dict(loss_type="sapo", sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (dict(loss_type="vespo", vespo_lambda_pos=-1.0), "vespo_lambda_pos"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOLossConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Rollout correction: TRL's importance-sampling weights, computed by its own lines of code


@pytest.fixture(scope="module")
def trl_is_weights():
    """fn(trainer_logp, rollout_logp, mask, mode, clip_min, clip_max) -> TRL's `vllm_importance_sampling_ratio`,
    (B, T) or (B, 1): the block of `_generate_and_score_completions` that computes it, run verbatim."""
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    first = source.index("if self.use_vllm and self.vllm_importance_sampling_correction:")
    last = source.index("# Compute the per-token log probabilities for the reference model", first)
    code = compile(textwrap.dedent(source[source.rindex("\n", 0, first) + 1: last]), "trl_is_block", "exec")

    def run(trainer_logp, rollout_logp, mask, mode, clip_min, clip_max):
        trainer = types.SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                        vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                                        vllm_importance_sampling_clip_max=clip_max)
        scope = dict(self=trainer, torch=torch, math=math, completion_mask=mask, tool_mask=None,
                     old_per_token_logps=trainer_logp, sampling_per_token_logps=rollout_logp)
        exec(code, scope)
        return scope["vllm_importance_sampling_ratio"]

    return run


BOUNDS = [(None, 3.0), (0.5, 1.5), (0.8, None)]  # TRL's default C_max alone; both; C_min alone


def rollout_inputs(seed=0):
    """Trainer and rollout log-probs [B, T] of make_batch's lengths: token ratios around 1 (some beyond the bounds),
    a NaN rollout log-prob on a live token (TRL: ratio 1) and -inf / NaN where masked."""
    batch = make_batch({}, "grpo", "token", seed)
    gen = torch.Generator().manual_seed(seed + 7)
    trainer_logp = batch.old_logp
    rollout_logp = trainer_logp + 0.6 * torch.randn(B, T, generator=gen)
    rollout_logp[0, 2] = trainer_logp[0, 2] - 1.5  # a token ratio beyond TRL's default C_max, 3
    rollout_logp[0, 1] = math.nan
    rollout_logp[1, -1], rollout_logp[2, 0] = -math.inf, math.nan  # masked: row 1 is 4 long, row 2 empty
    return trainer_logp, rollout_logp, batch.mask


@pytest.mark.parametrize("clip_min,clip_max", BOUNDS)
@pytest.mark.parametrize("mode", IS_MODES)
def test_rollout_is_weights_match_trl(trl_is_weights, mode, clip_min, clip_max):
    trainer_logp, rollout_logp, mask = rollout_inputs()
    ours = rollout_is_weights(trainer_logp, rollout_logp, mask, mode, clip_min, clip_max)
    theirs = trl_is_weights(trainer_logp, rollout_logp, mask, mode, clip_min, clip_max).expand(B, T)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    live = ours[mask.bool()]
    if mode.endswith("_mask"):
        assert (live == 0).any() and (live != 0).any(), "some weights masked, not all"
    else:
        assert ((live == clip_min) | (live == clip_max)).any() and ((live != clip_min) & (live != clip_max)).any()


@pytest.mark.parametrize("mode", IS_MODES)
def test_rollout_is_weights_packed(mode):
    """[N] with cu_seqlens gives the padded weights of the unmasked tokens."""
    trainer_logp, rollout_logp, mask = rollout_inputs(seed=1)
    keep = mask.bool()
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    packed = rollout_is_weights(trainer_logp[keep], rollout_logp[keep], mode=mode, clip_min=0.5, clip_max=1.5,
                                cu_seqlens=cu_seqlens)
    padded = rollout_is_weights(trainer_logp, rollout_logp, mask, mode, 0.5, 1.5)
    torch.testing.assert_close(packed, padded[keep], rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="token"), "mode must be one of"),
    (dict(mode="token_truncate", clip_min=None, clip_max=None), "needs clip_min or clip_max"),
    (dict(mode="sequence_mask", clip_min=2.0, clip_max=1.0), "must be less than"),
])
def test_rollout_is_weights_bad_arguments(kwargs, match):
    trainer_logp, rollout_logp, mask = rollout_inputs()
    with pytest.raises(ValueError, match=match):
        rollout_is_weights(trainer_logp, rollout_logp, mask, **kwargs)


@pytest.mark.parametrize("loss_type,mode", [(lt, mode) for lt in ("dapo", "cispo", "sapo", "luspo", "vespo")
                                              for mode in IS_MODES if not (lt == "vespo" and mode.startswith("seq"))])
def test_loss_with_each_is_mode_matches_trl(trl, trl_is_weights, loss_type, mode):
    """Each mode's weights, ours and TRL's, each into its own loss (vespo folds them into its sequence weight; TRL
    takes only token modes with it)."""
    batch = trl_batch("kl", loss_type, "token") if loss_type != "dapo" else make_batch(dict(beta=0.04), "dapo", "token")
    rollout_logp = batch.old_logp + 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(3))
    batch.is_weights = rollout_is_weights(batch.old_logp, rollout_logp, batch.mask, mode, 0.5, 1.5)
    loss, grad, _ = run_ours(batch, "torch")
    batch.is_weights = trl_is_weights(batch.old_logp, rollout_logp, batch.mask, mode, 0.5, 1.5)
    trl_loss, trl_grad, _ = run_trl(trl, batch)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    torch.testing.assert_close(grad, trl_grad, **TOL)


# ----------------------------------------------------------------------------------------------------------
# Both layouts, and the fused-linear op (whose chunks cut sequences apart)


H = 16


def packed(batch):
    keep = batch.mask.bool()
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), batch.mask.sum(1).cumsum(0)])
    return keep, cu_seqlens


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", list(SETUPS))
def test_packed_equals_padded(loss_type, backend):
    batch = trl_batch("everything", loss_type, "token")
    keep, cu_seqlens = packed(batch)
    c = batch.config
    padded_in, packed_in = batch.logits.clone().requires_grad_(), batch.logits[keep].clone().requires_grad_()
    loss, _ = grpo_loss(padded_in, batch.ids, batch.advantages, batch.mask, batch.old_logp, batch.ref_logp, c,
                        is_weights=batch.is_weights, num_items=batch.num_items, backend=backend)
    loss_packed, _ = grpo_loss(packed_in, batch.ids[keep], batch.advantages, None, batch.old_logp[keep],
                               batch.ref_logp[keep], c, is_weights=batch.is_weights[keep], cu_seqlens=cu_seqlens,
                               num_items=batch.num_items, backend=backend)
    (0.37 * loss).backward()
    (0.37 * loss_packed).backward()
    torch.testing.assert_close(loss_packed, loss, **TOL)
    torch.testing.assert_close(packed_in.grad, padded_in.grad[keep], **TOL)


def fused_inputs(batch, seed=0):
    """Hidden states [B, T, H] and a head [V, H] whose logits replace the batch's, the batch's log-ratios (and so
    its branches) kept."""
    gen = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen)
    scale = batch.config.temperature
    old_logp = torch.log_softmax(batch.logits / scale, -1).gather(-1, batch.ids[..., None]).squeeze(-1)
    new_logp = torch.log_softmax(hidden @ weight.T / scale, -1).gather(-1, batch.ids[..., None]).squeeze(-1)
    shift = new_logp - old_logp
    return hidden, weight, batch.old_logp + shift, batch.ref_logp + shift


def fused_combinations():
    """Every loss type, level and layout on torch; on Triton, which differs only in its logits kernels, each loss
    type once."""
    for loss_type in SETUPS:
        for level in ("token",) if loss_type == "vespo" else LEVELS:
            for layout in ("padded", "packed"):
                yield loss_type, level, "torch", layout
        yield loss_type, "token", "triton", "padded"


@pytest.mark.parametrize("loss_type,level,backend,layout", list(fused_combinations()))
def test_fused_linear_equals_logits_op(loss_type, level, backend, layout):
    """fused_linear_grpo_loss runs the same objective chunk by chunk (4 rows a chunk here, so chunks cut sequences):
    loss, d(hidden) and d(weight) equal those of grpo_loss on hidden @ weight.T."""
    batch = trl_batch("everything", loss_type, level)
    hidden, weight, old_logp, ref_logp = fused_inputs(batch)
    c, mask, ids, is_weights = batch.config, batch.mask, batch.ids, batch.is_weights
    cu_seqlens = None
    if layout == "packed":
        keep, cu_seqlens = packed(batch)
        hidden, ids, old_logp, ref_logp, is_weights = (x[keep] for x in (hidden, ids, old_logp, ref_logp, is_weights))
        mask = None
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    kw = dict(is_weights=is_weights, cu_seqlens=cu_seqlens, num_items=batch.num_items, backend=backend)
    loss, metrics = fused_linear_grpo_loss(h1, w1, ids, batch.advantages, mask, old_logp, ref_logp, c,
                                           chunk_bytes=V * 4 * 4, **kw)
    expected, expected_metrics = grpo_loss(h2 @ w2.T, ids, batch.advantages, mask, old_logp, ref_logp, c, **kw)
    (0.37 * loss).backward()
    (0.37 * expected).backward()
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected, **tol)
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)
    for name, value in metrics.items():
        torch.testing.assert_close(value, expected_metrics[name], **tol, msg=lambda m: f"{name}: {m}")
