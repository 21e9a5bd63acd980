"""Parity of `grpo_loss` with the GRPO losses people train with, each called as it ships:
TRL 1.16's `GRPOTrainer._compute_loss` and Liger 0.8.5's `triton_grpo_loss`.

Loss, d(loss)/d(logits) and the shared metrics, in fp32 on CPU; Liger's kernels and our Triton backend run under
TRITON_INTERPRET=1 (tests/conftest.py). Every batch has sequences of different lengths, one of them fully masked.

Deliberate differences, not compared (every one we know of):
- TRL 1.16 defaults to `use_bias_correction_kl=True`: the k3 KL term is multiplied by the (differentiable)
  ratio, after DeepSeek-V3.2. Ours does that with bias_correction_kl=True (test_trl_objectives.py); its default is
  the plain k3 estimate, as is Liger's, and TRL runs here with it off.
- At importance_level="sequence", TRL's clip fractions average one flag per sequence over all B sequences, fully
  masked ones included; ours (and Liger's) average over unmasked tokens, so longer sequences weigh more. TRL's
  clip fractions are compared at token level only; Liger's at both levels.
- TRL's sequence-level vLLM importance weights ("sequence_truncate") use the summed log-ratio, a product of token
  ratios; `truncated_is_weights(level="sequence")` uses the masked mean (`rollout_is_weights` has TRL's modes,
  test_trl_objectives.py). Here both losses get the same weights.
- Gradient accumulation, grpo and dr_grpo: TRL divides each micro-batch's loss by its own sequence count and by
  the number of accumulation steps (a mean of micro-batch means); ours divide by the step's sequence count
  (num_sequences), a mean over the step's sequences. The two agree when every micro-batch holds as many sequences
  (test_micro_batches_match_trl_accumulation), and differ when the micro-batches are cut by token budget.
- dr_grpo with max_completion_length=None divides by the padded length T; TRL always uses its configured
  max_completion_length (here both get the same one).
- TRL's grpo, bnpo, dapo and dr_grpo losses are compared here, its cispo, sapo, luspo and vespo in
  test_trl_objectives.py; its entropy mask (top_entropy_quantile), off-policy mask, entropy bonus and auxiliary
  loss do not exist in ours and are off in TRL here.
What is the same on purpose: bnpo is the mean over the local batch's tokens (TRL, Liger), with num_batches playing
TRL's accumulation steps; dapo divides by the step's token count, num_items; masked tokens contribute nothing
whatever they hold; an empty batch gives a loss of 0 (TRL clamps its normalizers to 1).
"""

import types
from collections import defaultdict

import pytest
import torch

from fastgrpo_kernels.grpo_loss import GRPOLossConfig, grpo_loss, truncated_is_weights

B, T, V = 6, 6, 301  # 36 rows: the Triton interpreter is slow
LENGTHS = (6, 4, 0, 5, 2, 6)
ADVANTAGES = (1.0, -0.8, 0.5, 0.6, -0.5, -0.3)
# Sequence-level ratios exp(mean(logp - old_logp)) set exactly, one per branch of the clipped objective (with
# eps 0.2 / 0.28 and delta 1.35): clipped high, clipped low, (masked), inside the clip-higher band 1.2..1.28,
# beyond delta with A < 0, unclipped. Token ratios spread around them (RATIO_SPREAD in log space) and reach every
# branch at token level too; test_batch_reaches_every_branch checks both.
SEQ_RATIOS = (1.5, 0.7, 1.0, 1.24, 1.6, 1.05)
RATIO_SPREAD = 0.15
GRAD_SCALE = 0.37  # upstream gradient != 1
# fp32 against fp32. atol is far below conftest's 1e-5: the median gradient entry here is ~3e-6 (a loss averaged
# over ~20 tokens, spread over V), which a 1e-5 floor would leave unchecked.
TOL = dict(rtol=1e-5, atol=1e-7)

# The interpreter runs tl.where's discarded branch in numpy, which warns on NaNs in lanes past the vocabulary's end
# (-inf minus -inf in the online logsumexp); a NaN that reached a result would fail assert_close instead.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
LEVELS = ("token", "sequence")
# Options applied to an off-policy batch. is_weights: truncated importance-sampling weights per token [B, T]
# or per sequence [B, 1] (TRL's vllm_importance_sampling_mode "token_truncate" / "sequence_truncate").
CASES = {
    "on_policy": dict(on_policy=True),
    "off_policy": dict(),
    "kl": dict(beta=0.04),
    "clip_higher": dict(eps_high=0.28),
    "delta": dict(eps_high=0.28, delta=1.35),
    "is_token": dict(is_weights="token"),
    "is_sequence": dict(is_weights="sequence"),
    "temperature": dict(temperature=0.7),
    "everything": dict(beta=0.04, eps_high=0.28, delta=1.35, is_weights="token", temperature=0.7),
}


def make_batch(case: dict, loss_type: str, level: str, seed: int = 0) -> types.SimpleNamespace:
    """One padded batch; every case draws the same random numbers, so cases differ only in their options."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(B, T, V, generator=gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    padding_noise, ref_noise, rollout_noise = 0.4 * torch.randn(3, B, T, generator=gen)
    seq_is = torch.exp(0.3 * torch.randn(B, 1, generator=gen))

    lengths = torch.tensor(LENGTHS)[:, None]
    mask = (torch.arange(T) < lengths).long()  # (B, T)
    config = GRPOLossConfig(
        loss_type=loss_type, importance_level=level, eps_low=0.2, eps_high=case.get("eps_high", 0.2),
        delta=case.get("delta"), beta=case.get("beta", 0.0), temperature=case.get("temperature", 1.0),
        max_completion_length=T + 4,  # the cap, longer than this batch's longest completion
        compute_entropy=True,
    )
    logp = torch.log_softmax(logits / config.temperature, -1).gather(-1, ids[..., None]).squeeze(-1)  # (B, T)
    # log(ratio): symmetric offsets around each sequence's target, so the masked mean is the target; random junk
    # where masked, which every implementation must ignore.
    offsets = RATIO_SPREAD * (torch.arange(T) - (lengths - 1) / 2)  # (B, T)
    log_ratio = torch.where(mask.bool(), torch.tensor(SEQ_RATIOS).log()[:, None] + offsets, padding_noise)
    old_logp = None if case.get("on_policy") else logp - log_ratio
    is_weights = None
    if case.get("is_weights") == "token":
        trainer_logp = logp if old_logp is None else old_logp
        is_weights = truncated_is_weights(trainer_logp, trainer_logp + rollout_noise, mask, cap=2.0)
    elif case.get("is_weights") == "sequence":
        is_weights = seq_is.clamp(max=2.0)
    return types.SimpleNamespace(
        logits=logits, ids=ids, mask=mask, advantages=torch.tensor(ADVANTAGES), old_logp=old_logp,
        ref_logp=logp + ref_noise, is_weights=is_weights, config=config,
        # dapo normalizes by the token count of the whole generation batch: here, as if it held 3 such micro-batches
        num_items=3 * mask.sum() if loss_type == "dapo" else None,
    )


@pytest.mark.parametrize("level", LEVELS)
def test_batch_reaches_every_branch(level):
    """The parity tests below mean little unless the ratios reach every branch of the clipped objective."""
    batch = make_batch(CASES["everything"], "grpo", level)
    c = batch.config
    logp = torch.log_softmax(batch.logits / c.temperature, -1).gather(-1, batch.ids[..., None]).squeeze(-1)
    mask = batch.mask.bool()
    log_ratio = (logp - batch.old_logp) * mask  # (B, T)
    if level == "sequence":
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand(B, T)
    ratio = log_ratio.exp()[mask]
    adv = batch.advantages[:, None].expand(B, T)[mask]
    assert ((adv > 0) & (ratio > 1 + c.eps_high)).any(), "clipped high"
    assert ((adv > 0) & (ratio > 1.2) & (ratio < 1 + c.eps_high)).any(), "clipped only without clip-higher"
    assert ((adv < 0) & (ratio < 1 - c.eps_low)).any(), "clipped low"
    assert ((adv < 0) & (ratio > c.delta)).any(), "capped by delta"
    assert ((ratio > 1 - c.eps_low) & (ratio < 1.2)).any(), "unclipped"


def run_ours(batch, backend, **normalizers):
    logits = batch.logits.clone().requires_grad_()
    is_weights = None if batch.is_weights is None else batch.is_weights.expand_as(batch.mask)
    loss, metrics = grpo_loss(logits, batch.ids, batch.advantages, batch.mask, batch.old_logp, batch.ref_logp,
                              batch.config, is_weights=is_weights, num_items=batch.num_items, backend=backend,
                              **normalizers)
    (GRAD_SCALE * loss).backward()
    return loss.detach(), logits.grad, {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------
# TRL


@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl")
    from trl.trainer import grpo_trainer, utils

    return types.SimpleNamespace(compute_loss=grpo_trainer.GRPOTrainer._compute_loss,
                                 get_gamma_weights=grpo_trainer.GRPOTrainer.get_gamma_weights,  # vespo's
                                 selective_log_softmax=utils.selective_log_softmax,
                                 entropy_from_logits=utils.entropy_from_logits)


def trl_stand_in(trl, logits, batch, accumulation=1):
    """A `self` for GRPOTrainer._compute_loss: the attributes it reads, with the policy forward replaced by TRL's own
    log-softmax and entropy of `logits` (what its fused LM head computes from hidden states)."""
    c = batch.config

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **_):
        ids = input_ids[:, -logits_to_keep:]
        # The fused head scores logits / temperature and returns zeros where the label is masked.
        masked = attention_mask[:, -logits_to_keep:] == 0
        logp = trl.selective_log_softmax(logits, ids, temperature=c.temperature).masked_fill(masked, 0.0)
        entropy = trl.entropy_from_logits(logits / c.temperature).masked_fill(masked, 0.0)
        return logp, entropy, None

    with_is = batch.is_weights is not None
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies, get_gamma_weights=trl.get_gamma_weights,
        loss_type=c.loss_type, importance_sampling_level=c.importance_level, beta=c.beta,
        epsilon_low=c.eps_low, epsilon_high=c.eps_high, max_completion_length=c.max_completion_length,
        args=types.SimpleNamespace(
            delta=c.delta, use_bias_correction_kl=c.bias_correction_kl, steps_per_generation=accumulation,
            sapo_temperature_pos=c.sapo_temperature_pos, sapo_temperature_neg=c.sapo_temperature_neg,
            vespo_k_pos=c.vespo_k_pos, vespo_lambda_pos=c.vespo_lambda_pos, vespo_k_neg=c.vespo_k_neg,
            vespo_lambda_neg=c.vespo_lambda_neg,
        ),
        use_vllm=with_is, vllm_importance_sampling_correction=with_is,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        current_gradient_accumulation_steps=accumulation, model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list)},
    )


def run_trl(trl, batch, accumulation=1):
    logits = batch.logits.clone().requires_grad_()
    trainer = trl_stand_in(trl, logits, batch, accumulation)
    rows = batch.ids.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": batch.ids, "completion_mask": batch.mask, "advantages": batch.advantages,
        "ref_per_token_logps": batch.ref_logp,
        "num_items_in_batch": batch.mask.sum() if batch.num_items is None else batch.num_items,
    }
    if batch.old_logp is not None:
        inputs["old_per_token_logps"] = batch.old_logp
    if batch.is_weights is not None:
        inputs["importance_sampling_ratio"] = batch.is_weights
    loss = trl.compute_loss(trainer, None, inputs)
    (GRAD_SCALE * loss).backward()
    return loss.detach(), logits.grad, {k: v[-1] for k, v in trainer._metrics["train"].items()}


# TRL's names for our clip fractions, compared at token level only (see the module docstring).
TRL_CLIP_METRICS = {"clip_low": "clip_ratio/low_mean", "clip_high": "clip_ratio/high_mean",
                    "clip_region": "clip_ratio/region_mean"}


# TRL only warns about sequence-level ratios with bnpo / dapo / dr_grpo (they weigh sequences by length); it runs
# them, so they are compared too.
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl(trl, loss_type, level, case, backend):
    batch = make_batch(CASES[case], loss_type, level)
    loss, grad, metrics = run_ours(batch, backend)
    trl_loss, trl_grad, trl_metrics = run_trl(trl, batch)

    torch.testing.assert_close(loss, trl_loss, **TOL)
    torch.testing.assert_close(grad, trl_grad, **TOL)
    names = {"entropy": "entropy"} | ({"kl": "kl"} if batch.config.beta != 0 else {})
    names |= TRL_CLIP_METRICS if level == "token" else {}
    for name, trl_name in names.items():
        torch.testing.assert_close(metrics[name], trl_metrics[trl_name], **TOL, msg=lambda m: f"{name}: {m}")


def micro_batch(batch, rows: slice, num_items):
    """Sequences `rows` of a batch, whose dapo normalizer is the whole step's token count."""
    cut = lambda x: x[rows] if torch.is_tensor(x) and x.dim() else x  # noqa: E731
    return types.SimpleNamespace(**{k: cut(v) for k, v in vars(batch).items()} | {"num_items": num_items})


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_match_trl_accumulation(trl, loss_type, level):
    """A step of two micro-batches of three sequences each, summed with no rescaling: given the step's counts
    (num_items, num_sequences, num_batches) our losses add up to TRL's with gradient_accumulation_steps=2."""
    batch = make_batch(CASES["everything"], loss_type, level)
    parts, total = (slice(0, 3), slice(3, 6)), batch.mask.sum()
    normalizers = dict(num_sequences=B, num_batches=len(parts))
    ours = [run_ours(micro_batch(batch, p, total), "torch", **normalizers) for p in parts]
    theirs = [run_trl(trl, micro_batch(batch, p, total), accumulation=len(parts)) for p in parts]
    torch.testing.assert_close(sum(o[0] for o in ours), sum(t[0] for t in theirs), **TOL)
    torch.testing.assert_close(torch.cat([o[1] for o in ours]), torch.cat([t[1] for t in theirs]), **TOL)


# ----------------------------------------------------------------------------------------------------------
# Liger


@pytest.fixture(scope="module")
def liger_grpo_loss():
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    return triton_grpo_loss


def run_liger(liger_grpo_loss, batch):
    c = batch.config
    # Liger takes a causal LM's logits over the completion plus one position and drops the last one.
    extra = torch.randn(B, 1, V, generator=torch.Generator().manual_seed(1))
    logits = torch.cat([batch.logits, extra], dim=1).requires_grad_()  # (B, T + 1, V)
    loss, metrics = liger_grpo_loss(
        logits, batch.old_logp, batch.ref_logp, batch.ids, batch.advantages, batch.mask,
        temperature=c.temperature, beta=c.beta, eps_low=c.eps_low, eps_high=c.eps_high,
        inplace=False,  # its default writes d(logits) into the logits leaf
        loss_type=c.loss_type, max_completion_length=c.max_completion_length,
        importance_sampling_level=c.importance_level, reduce=True, vllm_is_ratio=batch.is_weights, delta=c.delta,
        num_items_in_batch=batch.num_items,
    )
    (GRAD_SCALE * loss).backward()
    assert not logits.grad[:, -1].any()
    # metrics: [kl mean, clip fraction] with beta > 0, else [clip fraction]
    names = (["kl"] if c.beta != 0 else []) + ["clip_region"]
    return loss.detach(), logits.grad[:, :-1], {k: float(v.detach()) for k, v in zip(names, metrics)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_liger(liger_grpo_loss, loss_type, level, case):
    batch = make_batch(CASES[case], loss_type, level)
    # Our torch path: the Triton one is held to the same values against TRL above, and the interpreter is slow.
    loss, grad, metrics = run_ours(batch, "torch")
    liger_loss, liger_grad, liger_metrics = run_liger(liger_grpo_loss, batch)

    torch.testing.assert_close(loss, liger_loss, **TOL)
    torch.testing.assert_close(grad, liger_grad, **TOL)
    for name, value in liger_metrics.items():
        torch.testing.assert_close(metrics[name], value, **TOL, msg=lambda m: f"{name}: {m}")
