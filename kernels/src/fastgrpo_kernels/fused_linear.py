"""Fused-linear ops: log-probs, cross-entropy and the GRPO loss from hidden states and the LM-head weight,
chunk by chunk, never holding the [N, V] logits.

Per chunk of rows (its size bounded by `chunk_bytes`):
    z  = h_c W^T                      matmul 1             (c, V) written once into one reused buffer
    logp, dlogp, then dz in place     one logits pass (torch: 5 elementwise passes; Triton: fwd + bwd kernels)
    dh_c = dz W                       matmul 2
    dW  += dz^T h_c                   matmul 3, skipped when the head is frozen
Gradients are computed during the forward (the loss is a scalar, so the backward only scales them), which is
what makes three matmuls enough. The exception is the sequence-level (GSPO) ratio, whose per-token gradient
needs the whole sequence's log-probs first: it takes a forward sweep and a backward sweep, recomputing z.
fused_linear_logprobs, whose upstream gradient is unknown at forward time, recomputes z in its backward too.
"""

from __future__ import annotations

import torch

from ._dispatch import check_temperature, resolve_backend, rows_per_chunk
from .grpo_loss import (
    GRPOLossConfig, finish_metrics, make_token_batch, metrics_dict, objective_grad,
)
from .logprobs import logits_backward, logits_forward


def _chunk_grad_(z, ids, temperature, token_grad, with_entropy, backend):
    """Turn a logits chunk z (c, V) into d(loss)/d(z) in place; return (logp, entropy or None), fp32 [c].

    token_grad(logp) -> d(loss)/d(logp) [c]. On the torch path z must be an fp32 buffer the caller owns.
    """
    if backend == "triton":
        logp, lse, entropy = logits_forward(z, ids, temperature, with_entropy, backend)
        logits_backward(z, ids, lse, token_grad(logp), temperature=temperature, out=z, backend=backend)
        return logp, entropy
    inv_t = 1.0 / temperature
    if inv_t != 1.0:
        z.mul_(inv_t)
    m = z.amax(dim=1)  # read c*V
    z_target = z.gather(1, ids[:, None]).squeeze(1)
    z.sub_(m[:, None])  # read+write c*V; z is now z - max
    z.exp_()  # read+write c*V; z is now e = exp(z - max)
    s = z.sum(dim=1)  # read c*V
    log_s = torch.log(s)
    logp = z_target - m - log_s
    # entropy = log s - sum e (z - max) / s, and e (z - max) = xlogy(e, e) exactly (0 where e = 0): one temporary
    entropy = log_s - torch.special.xlogy(z, z).sum(1) / s if with_entropy else None
    g = token_grad(logp) * inv_t
    z.mul_((-g / s)[:, None])  # read+write c*V: dz = -g p
    z.scatter_add_(1, ids[:, None], g[:, None])  # + g at the target
    return logp, entropy


def _logits_chunk(h, weight, buf, backend):
    """z = h W^T into the reusable buffer (fp32 on the torch path, the input dtype on Triton)."""
    if buf.dtype == h.dtype:
        return torch.mm(h, weight.t(), out=buf[: h.shape[0]])
    return buf[: h.shape[0]].copy_(torch.mm(h, weight.t()))


def _chunk_plan(hidden, weight, with_entropy, backend, chunk_bytes):
    N, V = hidden.shape[0], weight.shape[0]
    dtype = torch.float32 if backend == "torch" else hidden.dtype
    row_bytes = V * torch.finfo(dtype).bits // 8 * (2 if with_entropy and backend == "torch" else 1)
    step = rows_per_chunk(N, row_bytes, chunk_bytes, hidden.device)
    return step, torch.empty(step, V, dtype=dtype, device=hidden.device)


def _eager_sweep(hidden, weight, ids, temperature, token_grad, with_entropy, need_dh, need_dw, backend,
                 chunk_bytes):
    """The three-matmul loop. token_grad(logp_c, rows) -> dlogp_c. Returns (logp, entropy, dh, dW)."""
    N = hidden.shape[0]
    step, buf = _chunk_plan(hidden, weight, with_entropy, backend, chunk_bytes)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logp) if with_entropy else None
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    for start in range(0, N, step):
        rows = slice(start, min(start + step, N))
        h = hidden[rows]
        z = _logits_chunk(h, weight, buf, backend)  # (c, V)
        logp[rows], ent = _chunk_grad_(z, ids[rows], temperature, lambda lp: token_grad(lp, rows), with_entropy,
                                      backend)
        if with_entropy:
            entropy[rows] = ent
        dz = z.to(weight.dtype)
        if need_dh:
            torch.mm(dz, weight, out=dh[rows])
        if need_dw:
            dw.addmm_(dz.t(), h.to(weight.dtype))
    return logp, entropy, dh, dw


def _forward_sweep(hidden, weight, ids, temperature, with_entropy, backend, chunk_bytes):
    """logp, lse, entropy for all rows, one matmul per chunk and no gradient."""
    N = hidden.shape[0]
    step, buf = _chunk_plan(hidden, weight, False, backend, chunk_bytes)
    out = [torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3 if with_entropy else 2)]
    for start in range(0, N, step):
        rows = slice(start, min(start + step, N))
        z = _logits_chunk(hidden[rows], weight, buf, backend)
        for o, r in zip(out, logits_forward(z, ids[rows], temperature, with_entropy, backend, chunk_bytes)):
            o[rows] = r
    return out[0], out[1], out[2] if with_entropy else None


def _backward_sweep(hidden, weight, ids, lse, dlogp, temperature, need_dh, need_dw, backend, chunk_bytes):
    """Recompute each logits chunk and apply dlogp: (dh, dW)."""
    N = hidden.shape[0]
    step, buf = _chunk_plan(hidden, weight, False, backend, chunk_bytes)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    for start in range(0, N, step):
        rows = slice(start, min(start + step, N))
        h = hidden[rows]
        z = _logits_chunk(h, weight, buf, backend)
        logits_backward(z, ids[rows], lse[rows], dlogp[rows], temperature=temperature, out=z, backend=backend,
                        chunk_bytes=chunk_bytes)
        dz = z.to(weight.dtype)
        if need_dh:
            torch.mm(dz, weight, out=dh[rows])
        if need_dw:
            dw.addmm_(dz.t(), h.to(weight.dtype))
    return dh, dw


def _scaled(grad, scale):
    if grad is None:
        return None
    return grad if bool(scale == 1) else grad * scale.to(grad.dtype)


def _flatten_inputs(hidden, weight, ids):
    if hidden.shape[:-1] != ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and token ids {tuple(ids.shape)} disagree on the leading dims")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != weight's {weight.shape[1]} (weight must be [V, H])")
    return hidden.reshape(-1, hidden.shape[-1]).contiguous(), ids.reshape(-1).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Log-probs (old / reference passes; differentiable through a recomputing backward).


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, backend, chunk_bytes):
        logp, lse, _ = _forward_sweep(hidden, weight, ids, temperature, False, backend, chunk_bytes)
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.config = (temperature, backend, chunk_bytes)
        return logp

    @staticmethod
    def backward(ctx, dlogp):
        hidden, weight, ids, lse = ctx.saved_tensors
        temperature, backend, chunk_bytes = ctx.config
        dh, dw = _backward_sweep(hidden, weight, ids, lse, dlogp.float().contiguous(), temperature,
                                 ctx.needs_input_grad[0], ctx.needs_input_grad[1], backend, chunk_bytes)
        return dh, dw, None, None, None, None


def fused_linear_logprobs(hidden, weight, ids, temperature=1.0, backend=None, chunk_bytes=None):
    """log_softmax(hidden @ weight.T / T)[ids] without materializing the logits.

    hidden [..., H], weight [V, H], ids [...] -> logp [...] fp32. Use it under torch.no_grad() for the old and
    reference log-prob passes (one matmul per chunk); its backward recomputes the logits chunk by chunk.
    """
    check_temperature(temperature)
    flat_h, flat_ids = _flatten_inputs(hidden, weight, ids)
    backend = resolve_backend(backend, hidden)
    return _FusedLinearLogprobs.apply(flat_h, weight, flat_ids, temperature, backend, chunk_bytes).view(ids.shape)


# ----------------------------------------------------------------------------------------------------------
# Cross-entropy for SFT (eager gradients: three matmuls).


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, token_weights, temperature, backend, chunk_bytes):
        logp, _, dh, dw = _eager_sweep(hidden, weight, ids, temperature, lambda lp, rows: -token_weights[rows],
                                       False, ctx.needs_input_grad[0], ctx.needs_input_grad[1], backend, chunk_bytes)
        ctx.save_for_backward(dh, dw)
        return -(logp * token_weights).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return _scaled(dh, grad_loss), _scaled(dw, grad_loss), None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, ids, mask=None, reduction="mean", temperature=1.0, backend=None,
                               chunk_bytes=None):
    """Token cross-entropy of hidden @ weight.T against ids, never materializing the logits.

    hidden [..., H], weight [V, H], ids [...] (negative ids, e.g. -100, are ignored), mask [...] optional 0/1.
    reduction "mean" (over unmasked tokens) or "sum". Returns an fp32 scalar.
    """
    check_temperature(temperature)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    flat_h, flat_ids = _flatten_inputs(hidden, weight, ids)
    keep = (flat_ids >= 0).float()
    if mask is not None:
        keep = keep * mask.reshape(-1).float()
    token_weights = keep / keep.sum().clamp(min=1) if reduction == "mean" else keep
    backend = resolve_backend(backend, hidden)
    return _FusedLinearCrossEntropy.apply(flat_h, weight, flat_ids.clamp(min=0), token_weights, temperature, backend,
                                          chunk_bytes)


# ----------------------------------------------------------------------------------------------------------
# The GRPO loss.


class _FusedLinearGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, batch, config, backend, chunk_bytes):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with_entropy = config.compute_entropy
        if config.importance_level == "token":
            totals = []

            def token_grad(logp, rows):
                loss, dlogp, sums = objective_grad(logp, batch.rows(rows), config)
                totals.append(torch.cat([loss[None], sums]))
                return dlogp

            _, entropy, dh, dw = _eager_sweep(hidden, weight, ids, config.temperature, token_grad, with_entropy,
                                              need_dh, need_dw, backend, chunk_bytes)
            loss, sums = torch.stack(totals).sum(0).split([1, len(totals[0]) - 1])
            loss = loss.squeeze(0)
        else:
            logp, lse, entropy = _forward_sweep(hidden, weight, ids, config.temperature, with_entropy, backend,
                                                chunk_bytes)
            loss, dlogp, sums = objective_grad(logp, batch, config)
            dh, dw = _backward_sweep(hidden, weight, ids, lse, dlogp, config.temperature, need_dh, need_dw, backend,
                                     chunk_bytes)
        entropy_sum = (entropy * batch.mask).sum() if with_entropy else None
        metrics = finish_metrics(sums, entropy_sum, batch)
        ctx.mark_non_differentiable(metrics)
        ctx.save_for_backward(dh, dw)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        dh, dw = ctx.saved_tensors
        return _scaled(dh, grad_loss), _scaled(dw, grad_loss), None, None, None, None, None


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    config: GRPOLossConfig = GRPOLossConfig(),
    *,
    is_weights: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    num_items: float | None = None,
    backend: str | None = None,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of `grpo_loss`, from hidden states and the LM-head weight instead of logits.

    hidden [B, T, H] (padded) or [N, H] with cu_seqlens [B + 1] (packed); weight [V, H] (requires_grad=False for a
    frozen head skips dW); the other arguments as in `fastgrpo_kernels.grpo_loss`. Peak extra memory is one logits
    chunk of at most chunk_bytes (default 128 MiB on CPU, 1 GiB on CUDA) plus O(N) vectors. Returns (loss, metrics).
    """
    flat_h, flat_ids = _flatten_inputs(hidden, weight, ids)
    batch = make_token_batch(ids, advantages, mask, old_logp, ref_logp, is_weights, config, cu_seqlens, num_items)
    backend = resolve_backend(backend, hidden)
    loss, metrics = _FusedLinearGRPOLoss.apply(flat_h, weight, flat_ids, batch, config, backend, chunk_bytes)
    return loss, metrics_dict(metrics, config)
