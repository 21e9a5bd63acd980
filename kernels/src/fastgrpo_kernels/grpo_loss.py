"""The GRPO objective over logits: one read of the logits forward, one read + one write backward.

Per token t of sequence b (logp from logits / temperature), with sg() a stop-gradient:
    r_t   = exp(logp_t - old_logp_t)                    token-level ratio, or
    r_t   = exp(mean_{t' in b} (logp - old_logp))      sequence-level ratio (GSPO)
    l_t, by loss_type (the policy term; TRL 1.16's `_compute_loss` is the spec for each):
        grpo, bnpo, dapo, dr_grpo, luspo
                 -min(min(r_t, delta) A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
        cispo    -sg(min(r_t, eps_high)) A_t logp_t    (MiniMax-M1; eps_high is the cap on the ratio itself, not 1 + it)
        sapo     -(4 / tau_t) sigmoid(tau_t (r_t - 1)) A_t,  tau_t = sapo_temperature_pos if A_t > 0 else _neg
        vespo    -sg(phi_b) A_t logp_t,  phi_b = exp(lam + k log w_b - lam w_b)   (a Gamma weight, phi(1) = 1)
                 log w_b = clamp(sum_{t' in b} clamp(logp - old_logp, -20, 20) + clamp(log is_weight, log 1e-8, 20),
                           log 1e-8, 20); k, lam = vespo_k_pos, vespo_lambda_pos if A_t >= 0 else the _neg pair
    then l_t *= is_weight_t (every loss type but vespo, whose w_b already holds it)
         l_t += beta * kl_t,  kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (k3), times r_t if bias_correction_kl
    loss  = sum_t w_t l_t, with w_t from the completion mask and the aggregation:
        grpo, sapo         mask_t / (len_b * S)            mean over each sequence, then over the S sequences
        luspo              mask_t / S                      sum over each sequence, mean over the S sequences
        dr_grpo            mask_t / (S * max_completion_length)  sum over a constant length
        dapo, cispo, vespo mask_t / num_items              mean over the step's num_items tokens
        bnpo               mask_t / (n_local * num_batches)  mean over this batch's n_local tokens (TRL, Liger); a step
                                                           of num_batches batches averages their means (TRL's gradient
                                                           accumulation)
    S (num_sequences) and num_items default to this batch's own counts; give the step's global counts (over every
    micro-batch and rank) and the micro-batch losses add up to the whole step's loss, with no rescaling outside.
    Masked tokens contribute exactly nothing, whatever their inputs hold (-inf log-probs, NaN, ids outside [0, V)).

is_weights correct for the rollout engine (vLLM) sampling from slightly different probabilities than the trainer
computes: `rollout_is_weights` gives TRL's four modes (token / sequence x truncate / mask).

The heavy part is the two passes over [N, V] logits (`logits_forward` / `logits_backward`, shared with
selective_logprobs). Everything between them is O(N) math on per-token vectors, differentiated with autograd
w.r.t. logp, so every variant (each loss type, sequence-level ratios, delta, IS weights) gets its exact gradient
from one definition, `objective`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._dispatch import checked_ids
from .logprobs import as_rows, logits_backward, logits_forward, selective_logprobs_reference

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "luspo", "cispo", "sapo", "vespo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "luspo")  # the PPO clipped objective
IMPORTANCE_LEVELS = ("token", "sequence")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
METRICS = ("kl", "clip_low", "clip_high", "clip_region", "entropy", "ratio")


@dataclass(frozen=True)
class GRPOLossConfig:
    loss_type: str = "grpo"
    importance_level: str = "token"  # "sequence" is GSPO
    eps_low: float = 0.2
    eps_high: float = 0.2  # > eps_low is DAPO's clip-higher; cispo: the cap on the ratio itself (ScaleRL: 5.0)
    delta: float | None = None  # two-sided clip: caps the unclipped ratio (INTELLECT-2); must exceed 1 + eps_high
    beta: float = 0.0  # k3 KL coefficient; 0 needs no reference log-probs
    bias_correction_kl: bool = False  # the KL term times the ratio (DeepSeek-V3.2; TRL's use_bias_correction_kl)
    temperature: float = 1.0
    max_completion_length: int | None = None  # dr_grpo's constant; None: the padded length T
    compute_entropy: bool = False  # mean entropy as a metric (no gradient)
    sapo_temperature_pos: float = 1.0  # sapo's gate sharpness for A > 0 (TRL's defaults)
    sapo_temperature_neg: float = 1.05  # and for A <= 0
    vespo_k_pos: float = 2.0  # vespo's Gamma weight for A >= 0: power k (down-weights w < 1)
    vespo_lambda_pos: float = 3.0  # and decay lambda (down-weights w > 1)
    vespo_k_neg: float = 3.0  # the same two for A < 0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"importance_level must be one of {IMPORTANCE_LEVELS}, got {self.importance_level!r}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={self.eps_low}, eps_high={self.eps_high}")
        if self.delta is not None and self.loss_type not in CLIPPED_LOSS_TYPES:
            raise ValueError(f"delta caps the clipped objective of {CLIPPED_LOSS_TYPES}; {self.loss_type} has none")
        if self.delta is not None and not self.delta > 1 + self.eps_high:
            raise ValueError(f"delta must be > 1 + eps_high = {1 + self.eps_high}, got {self.delta}")
        if self.loss_type == "vespo" and self.importance_level != "token":
            raise ValueError("vespo weighs each sequence by its own summed log-ratio: importance_level must be 'token'")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_completion_length is not None and self.max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be positive, got {self.max_completion_length}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def token_local(self) -> bool:
        """Whether each token's loss depends on its own log-prob alone (so chunks of rows can be done one by one)."""
        return self.importance_level == "token" and self.loss_type != "vespo"


# ----------------------------------------------------------------------------------------------------------
# The spec: plain PyTorch on padded [B, T] tensors, full fp32 log-softmax.


def grpo_loss_reference(logits, ids, advantages, mask, old_logp=None, ref_logp=None, config=GRPOLossConfig(),
                        is_weights=None, num_items=None, num_sequences=None, num_batches=1, token_advantages=None):
    """logits [B, T, V], ids/mask/old_logp/ref_logp/is_weights [B, T], advantages [B] (or None and
    token_advantages [B, T]) -> (loss, metrics). grpo, bnpo, dapo and dr_grpo only: cispo, sapo, luspo and vespo
    are held to TRL's own `_compute_loss` instead (tests/kernels/test_trl_objectives.py)."""
    c = config
    if c.loss_type not in ("grpo", "bnpo", "dapo", "dr_grpo"):
        raise ValueError(f"grpo_loss_reference has no {c.loss_type!r}: it covers grpo, bnpo, dapo and dr_grpo")
    live = mask.bool()
    logits = logits.masked_fill(~live[..., None], 0.0)  # masked rows: any id, any logits, never NaN
    ids = ids.masked_fill(~live, 0)
    logp, entropy = selective_logprobs_reference(logits, ids, c.temperature, return_entropy=True)
    mask = mask.float()

    def masked(x):
        return None if x is None else torch.where(live, x, 0.0)

    old_logp = logp.detach() if old_logp is None else masked(old_logp)
    ref_logp, is_weights = masked(ref_logp), None if is_weights is None else masked(is_weights.expand_as(mask))
    log_ratio = logp - old_logp
    if c.importance_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    adv = masked(token_advantages) if token_advantages is not None else advantages.unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - c.eps_low, 1 + c.eps_high)
    unclipped = ratio if c.delta is None else torch.clamp(ratio, max=c.delta)
    per_token = -torch.min(unclipped * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = torch.zeros_like(logp)
    if c.beta != 0:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        if c.bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + c.beta * kl
    loss = _reference_aggregate(per_token.expand_as(mask), mask, c, num_items, num_sequences, num_batches)

    def masked_mean(x):
        return ((x.expand_as(mask) * mask).sum() / mask.sum().clamp(min=1)).detach()

    metrics = {
        "kl": masked_mean(kl),
        "clip_low": masked_mean(((ratio < 1 - c.eps_low) & (adv < 0)).float()),
        "clip_high": masked_mean(((ratio > 1 + c.eps_high) & (adv > 0)).float()),
        "entropy": masked_mean(entropy),
        "ratio": masked_mean(ratio),
    }
    metrics["clip_region"] = metrics["clip_low"] + metrics["clip_high"]
    return loss, metrics


def _reference_aggregate(per_token, mask, config, num_items, num_sequences, num_batches):
    """The loss from per-token losses [B, T] under config.loss_type (the weights of the module docstring)."""
    B, T = mask.shape
    S = max(float(B if num_sequences is None else num_sequences), 1.0)
    if config.loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / S
    if config.loss_type == "bnpo":
        return (per_token * mask).sum() / (mask.sum().clamp(min=1) * num_batches)
    if config.loss_type == "dapo":
        return (per_token * mask).sum() / max(float(mask.sum() if num_items is None else num_items), 1.0)
    return (per_token * mask).sum() / (S * (config.max_completion_length or T))


# ----------------------------------------------------------------------------------------------------------
# Per-token inputs, flattened to [N], and the O(N) objective shared by the logits and fused-linear ops.


class TokenBatch(NamedTuple):
    """Everything the objective needs besides logp; every tensor is flat [N] (seq_len aside). Masked positions hold
    zeros in every input, so nothing there can turn into NaN or inf."""

    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor  # per token
    is_weights: torch.Tensor | None
    mask: torch.Tensor  # fp32 0/1
    live: torch.Tensor  # bool: mask != 0
    weights: torch.Tensor  # aggregation weight w_t (zero where masked)
    seq_idx: torch.Tensor  # which sequence each token belongs to
    seq_len: torch.Tensor  # [B] unmasked tokens per sequence

    def rows(self, rows: slice) -> "TokenBatch":
        """The tokens in `rows` (config.token_local objectives only: sequence stats stay whole)."""
        pick = lambda x: x if x is None or x is self.seq_len else x[rows]  # noqa: E731
        return TokenBatch(*(pick(x) for x in self))


class Normalizers(NamedTuple):
    """The loss's denominators (see the module docstring); None: this batch's own count."""

    num_items: float | torch.Tensor | None = None  # dapo, cispo, vespo: tokens in the step
    num_sequences: float | torch.Tensor | None = None  # grpo, sapo, luspo, dr_grpo: sequences in the step
    num_batches: int = 1  # bnpo: batches whose losses one step sums

    def check(self):
        if not (isinstance(self.num_batches, int) and self.num_batches >= 1):
            raise ValueError(f"num_batches must be an int >= 1, got {self.num_batches!r}")
        for name in ("num_items", "num_sequences"):
            value = getattr(self, name)
            if value is not None and not torch.is_tensor(value) and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")


def _flat(x, name, n):
    if x is None:
        return None
    x = x.reshape(-1)
    if x.numel() != n:
        raise ValueError(f"{name} has {x.numel()} elements, expected one per token ({n})")
    return x.float()


def _count(value, local):
    """A normalizer (this batch's `local` count where value is None), at least 1: an empty batch (nothing to train)
    gives a loss of 0, not NaN. Tensors stay tensors (no host sync), numbers stay numbers."""
    value = local if value is None else value
    return value.float().clamp(min=1) if torch.is_tensor(value) else max(float(value), 1.0)


def _sequences(ids, cu_seqlens):
    """(B, T, seq_idx [N]) of the padded [B, T] or packed [N] (cu_seqlens [B + 1]) layout."""
    device = ids.device
    if cu_seqlens is None:
        if ids.dim() != 2:
            raise ValueError(f"token ids must be [B, T], or [N] with cu_seqlens; got shape {tuple(ids.shape)}")
        B, T = ids.shape
        return B, T, torch.arange(B, device=device).repeat_interleave(T)
    if ids.dim() != 1:
        raise ValueError(f"with cu_seqlens, token ids must be [N]; got shape {tuple(ids.shape)}")
    lengths = cu_seqlens.diff()
    if int(cu_seqlens[-1]) != ids.numel():
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but there are {ids.numel()} tokens")
    B, T = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    return B, T, torch.arange(B, device=device).repeat_interleave(lengths)


def _token_advantages(advantages, token_advantages, B, seq_idx, n):
    """Advantages per token [N]: per-sequence ones [B] spread over their tokens, or token_advantages as given."""
    if token_advantages is not None:
        if advantages is not None:
            raise ValueError("pass advantages (one per sequence, [B]) or token_advantages (one per token), not both")
        return _flat(token_advantages, "token_advantages", n)
    if advantages is None:
        raise ValueError("advantages is None: pass one per sequence ([B]), or per-token ones as token_advantages=")
    if advantages.numel() != B:
        raise ValueError(f"advantages has {advantages.numel()} elements, expected one per sequence (B={B}); "
                         f"per-token advantages go in token_advantages=")
    return advantages.float().reshape(B)[seq_idx]


def make_token_batch(ids, advantages, mask=None, old_logp=None, ref_logp=None, is_weights=None, config=GRPOLossConfig(),
                     cu_seqlens=None, norms=Normalizers(), token_advantages=None) -> TokenBatch:
    """Flatten per-token inputs given as [B, T] (padded) or [N] with cu_seqlens [B + 1] (packed)."""
    B, T, seq_idx = _sequences(ids, cu_seqlens)
    norms.check()
    n, device = ids.numel(), ids.device
    mask = torch.ones(n, device=device) if mask is None else _flat(mask, "mask", n)
    live = mask != 0
    if config.beta != 0 and ref_logp is None:
        raise ValueError(f"beta={config.beta} needs ref_logp (reference log-probs); pass beta=0 to train without one")

    def masked(x, name):
        x = _flat(x, name, n)
        return None if x is None else torch.where(live, x, 0.0)

    adv = torch.where(live, _token_advantages(advantages, token_advantages, B, seq_idx, n), 0.0)
    seq_len = torch.zeros(B, device=device).index_add_(0, seq_idx, mask)
    if config.loss_type in ("grpo", "sapo"):
        weights = mask / (seq_len.clamp(min=1)[seq_idx] * _count(norms.num_sequences, B))
    elif config.loss_type == "luspo":
        weights = mask / _count(norms.num_sequences, B)
    elif config.loss_type == "bnpo":
        weights = mask / (mask.sum().clamp(min=1) * norms.num_batches)
    elif config.loss_type in ("dapo", "cispo", "vespo"):
        weights = mask / _count(norms.num_items, mask.sum())
    else:
        weights = mask / (_count(norms.num_sequences, B) * (config.max_completion_length or T))
    return TokenBatch(masked(old_logp, "old_logp"), masked(ref_logp, "ref_logp"), adv, masked(is_weights, "is_weights"),
                      mask, live, weights, seq_idx, seq_len)


def _policy_loss(logp, log_ratio, ratio, batch, c):
    """l_t of the module docstring, before IS weights and KL: [n], differentiable w.r.t. logp (and ratio)."""
    adv = batch.advantages
    if c.loss_type == "cispo":
        return -torch.clamp(ratio, max=c.eps_high).detach() * adv * logp
    if c.loss_type == "sapo":
        tau = torch.where(adv > 0, c.sapo_temperature_pos, c.sapo_temperature_neg)
        return -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * adv
    if c.loss_type == "vespo":
        return -_vespo_weights(log_ratio, batch, c) * adv * logp
    clipped = torch.clamp(ratio, 1 - c.eps_low, 1 + c.eps_high)
    unclipped = ratio if c.delta is None else torch.clamp(ratio, max=c.delta)
    return -torch.minimum(unclipped * adv, clipped * adv)


@torch.no_grad()
def _vespo_weights(log_ratio, batch, c):
    """VESPO's Gamma weight phi_b per token [n], from the token log-ratios (and IS weights) of the whole sequence."""
    floor = math.log(1e-8)
    per_token = torch.clamp(log_ratio, -20.0, 20.0)
    if batch.is_weights is not None:
        per_token = per_token + torch.clamp(torch.log(batch.is_weights), floor, 20.0)
    seq_sum = torch.zeros_like(batch.seq_len).index_add(0, batch.seq_idx, per_token * batch.mask)
    log_w = torch.clamp(seq_sum, floor, 20.0)[batch.seq_idx]
    nonneg = batch.advantages >= 0
    k = torch.where(nonneg, c.vespo_k_pos, c.vespo_k_neg)
    lam = torch.where(nonneg, c.vespo_lambda_pos, c.vespo_lambda_neg)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _clip_flags(ratio, adv, c):
    """(clipped low, clipped high) per token, fp32: where the loss type's hard clip removes the gradient."""
    if c.loss_type == "cispo":
        return torch.zeros_like(ratio), ((ratio > c.eps_high) & (adv > 0)).float()
    if c.loss_type not in CLIPPED_LOSS_TYPES:  # sapo, vespo: soft weights, nothing clipped
        return torch.zeros_like(ratio), torch.zeros_like(ratio)
    return ((ratio < 1 - c.eps_low) & (adv < 0)).float(), ((ratio > 1 + c.eps_high) & (adv > 0)).float()


def objective(logp: torch.Tensor, batch: TokenBatch, config: GRPOLossConfig):
    """Loss (sum of w_t l_t over the given tokens) and metric sums; differentiable w.r.t. logp [n]."""
    c = config
    # Before any math, not after: a masked -inf log-prob times a zero weight is NaN, and so is its gradient.
    logp = torch.where(batch.live, logp, 0.0)
    old_logp = logp.detach() if batch.old_logp is None else batch.old_logp
    log_ratio = logp - old_logp
    seq_log_ratio = log_ratio
    if c.importance_level == "sequence":
        seq_sum = torch.zeros_like(batch.seq_len).index_add(0, batch.seq_idx, log_ratio * batch.mask)
        seq_log_ratio = (seq_sum / batch.seq_len.clamp(min=1))[batch.seq_idx]
    ratio = torch.exp(seq_log_ratio)
    per_token = _policy_loss(logp, log_ratio, ratio, batch, c)
    if batch.is_weights is not None and c.loss_type != "vespo":
        per_token = per_token * batch.is_weights
    if c.beta != 0:
        diff = batch.ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        if c.bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + c.beta * kl
    loss = (batch.weights * per_token).sum()
    with torch.no_grad():
        m = batch.mask
        low, high = _clip_flags(ratio, batch.advantages, c)
        sums = torch.stack([
            (m * kl).sum() if c.beta != 0 else m.new_zeros(()),
            (m * low).sum(), (m * high).sum(), (m * (low + high)).sum(),
            m.new_zeros(()),  # entropy: filled in by the caller, which has it
            (m * ratio).sum(),
        ])
    return loss, sums


def objective_grad(logp, batch, config):
    """(loss, dloss/dlogp, metric sums) for the given tokens, without building a graph beyond O(n)."""
    with torch.enable_grad():
        leaf = logp.detach().requires_grad_()
        loss, sums = objective(leaf, batch, config)
        (dlogp,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), dlogp, sums


def finish_metrics(sums: torch.Tensor, entropy: torch.Tensor | None, batch: TokenBatch) -> torch.Tensor:
    """Metric sums (and entropy [N] or None) -> [means over unmasked tokens..., token count], one tensor (no host
    sync)."""
    if entropy is not None:
        sums = sums.clone()
        sums[METRICS.index("entropy")] = (torch.where(batch.live, entropy, 0.0) * batch.mask).sum()
    tokens = batch.mask.sum()
    return torch.cat([sums / tokens.clamp(min=1), tokens[None]])


def metrics_dict(values: torch.Tensor, config: GRPOLossConfig) -> dict[str, torch.Tensor]:
    metrics = dict(zip(METRICS + ("tokens",), values.unbind()))
    if not config.compute_entropy:
        del metrics["entropy"]
    if config.beta == 0:
        del metrics["kl"]
    return metrics


# ----------------------------------------------------------------------------------------------------------


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, batch, config, inplace_backward, backend, chunk_bytes):
        logp, lse, entropy = logits_forward(logits, ids, config.temperature, config.compute_entropy, backend,
                                            chunk_bytes)
        loss, dlogp, sums = objective_grad(logp, batch, config)
        metrics = finish_metrics(sums, entropy, batch)
        ctx.mark_non_differentiable(metrics)
        ctx.save_for_backward(logits, ids, lse, dlogp)
        ctx.config = (config.temperature, inplace_backward, backend, chunk_bytes)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        logits, ids, lse, dlogp = ctx.saved_tensors
        temperature, inplace_backward, backend, chunk_bytes = ctx.config
        dlogits = logits_backward(logits, ids, lse, dlogp * grad_loss.float(), temperature=temperature,
                                  out=logits if inplace_backward else None, backend=backend, chunk_bytes=chunk_bytes)
        return dlogits, None, None, None, None, None, None


def grpo_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    config: GRPOLossConfig = GRPOLossConfig(),
    *,
    is_weights: torch.Tensor | None = None,
    token_advantages: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    num_items: float | torch.Tensor | None = None,
    num_sequences: float | torch.Tensor | None = None,
    num_batches: int = 1,
    inplace_backward: bool = False,
    backend: str | None = None,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss over logits; gradients flow to `logits` only.

    Padded layout:  logits [B, T, V]; ids / mask / old_logp / ref_logp / is_weights [B, T]
    Packed layout:  logits [N, V]; those per-token tensors [N]; cu_seqlens [B + 1] (int)
    advantages [B], one per sequence, always; per-token advantages ([B, T] or [N]) go in token_advantages instead,
    with advantages=None. ids must lie in [0, V) where mask is nonzero; elsewhere they may hold anything (-100).
    old_logp None means on-policy (ratio 1, gradient still flows); is_weights are importance-sampling weights for
    rollout/trainer mismatch (see `rollout_is_weights`, `truncated_is_weights`).
    Normalizers, for a step split into micro-batches (and ranks), each the step's total over all of them:
    num_sequences (grpo, sapo, luspo, dr_grpo) and num_items (dapo, cispo, vespo) replace this batch's sequence /
    token count; num_batches (bnpo) is how many batch losses the step sums. With them the micro-batch losses add up
    to the step's loss.
    logits: fp32, bf16 or fp16 with unit stride along V. Returns (loss, metrics): loss is an fp32 scalar; metrics
    holds 0-dim means over unmasked tokens of clip_low, clip_high, clip_region, ratio, kl (when beta > 0), entropy
    (when config.compute_entropy), and the token count.
    """
    norms = Normalizers(num_items, num_sequences, num_batches)
    batch = make_token_batch(ids, advantages, mask, old_logp, ref_logp, is_weights, config, cu_seqlens, norms,
                             token_advantages)
    rows, flat_ids = as_rows(logits, ids)
    flat_ids = checked_ids(flat_ids, rows.shape[1], "grpo_loss", keep=batch.live)
    loss, metrics = _GRPOLoss.apply(rows, flat_ids, batch, config, inplace_backward, backend, chunk_bytes)
    return loss, metrics_dict(metrics, config)


def truncated_is_weights(trainer_logp, rollout_logp, mask=None, cap=2.0, level="token"):
    """Truncated importance-sampling weights min(exp(trainer - rollout), cap), detached.

    Corrects for the generator (e.g. vLLM) sampling from slightly different probabilities than the trainer
    computes. trainer_logp / rollout_logp / mask: [B, T]; level "sequence" uses the masked mean log-ratio (TRL's
    "sequence_truncate" uses the sum: `rollout_is_weights` has TRL's modes).
    """
    log_ratio = (trainer_logp - rollout_logp).detach().float()
    if level == "sequence":
        m = torch.ones_like(log_ratio) if mask is None else mask.float()
        log_ratio = ((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(m)
    elif level != "token":
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    return torch.exp(log_ratio).clamp(max=cap)


def rollout_is_weights(trainer_logp, rollout_logp, mask=None, mode="sequence_mask", clip_min=None, clip_max=3.0,
                       cu_seqlens=None):
    """Importance-sampling weights for the rollout engine's mismatch, TRL 1.16's `vllm_importance_sampling_mode`.

    trainer_logp / rollout_logp / mask: [B, T], or [N] with cu_seqlens [B + 1]. The ratio rho is
    exp(trainer - rollout) per token ("token_*"), or exp(sum over the sequence of trainer - rollout) on each of its
    tokens ("sequence_*": a product of token ratios, not GSPO's mean); masked tokens and NaN rollout log-probs
    count as equal log-probs. "*_truncate" clamps rho to [clip_min, clip_max]; "*_mask" zeroes it outside that range.
    Either bound may be None (no bound); truncation needs one. Returns detached fp32 weights shaped like
    trainer_logp, for `is_weights` (vespo folds them into its sequence weight, so give it a token mode).
    """
    if mode not in IS_MODES:
        raise ValueError(f"mode must be one of {IS_MODES}, got {mode!r}")
    if clip_min is not None and clip_max is not None and not clip_min < clip_max:
        raise ValueError(f"clip_min ({clip_min}) must be less than clip_max ({clip_max})")
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"mode {mode!r} needs clip_min or clip_max (both are None)")
    m = torch.ones_like(trainer_logp, dtype=torch.float32) if mask is None else mask.float()
    diff = torch.nan_to_num((trainer_logp.detach().float() - rollout_logp.detach().float()) * m, nan=0.0)
    if mode.startswith("sequence_"):
        B, _, seq_idx = _sequences(diff, cu_seqlens)
        diff = torch.zeros(B, device=diff.device).index_add_(0, seq_idx, diff.reshape(-1))[seq_idx].view_as(diff)
    rho = torch.exp(diff)
    if mode.endswith("_truncate"):
        return torch.clamp(rho, min=clip_min, max=clip_max)
    outside = torch.zeros_like(rho, dtype=torch.bool)
    if clip_min is not None:
        outside |= rho < clip_min
    if clip_max is not None:
        outside |= rho > clip_max
    return rho.masked_fill(outside, 0.0)
