"""Selective log-probs (and entropy) from logits: one pass forward, one pass backward.

logp[i] = log_softmax(logits[i] / T)[ids[i]],  entropy[i] = -sum_v p[i, v] log p[i, v]

The forward and backward kernels here are the logits passes that every other op in this package reuses:
the GRPO loss and the fused-linear ops call `logits_forward` / `logits_backward` and add O(N) math between.
Results are fp32 whatever the logits dtype.
"""

from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, check_temperature, checked_ids, resolve_backend, rows_per_chunk

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _online_lse_step(z, m, s, t, WITH_ENTROPY: tl.constexpr):
        """Fold a block of scaled logits z into per-lane running stats, all relative to the running max m:
        s = sum e^(z-m), t = sum e^(z-m) (z-m). Keeping t relative to m avoids the cancellation of
        lse - sum(p z) when logits are large (1e4)."""
        m_new = tl.maximum(m, z)
        # -inf logits (masked vocab entries) must add nothing and must not turn the sums into NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m - m_new)
        alpha = tl.exp(shift)
        z_rel = z - m_new
        e = tl.where(z == float("-inf"), 0.0, tl.exp(z_rel))
        if WITH_ENTROPY:
            t = alpha * (t + tl.where(s > 0.0, shift * s, 0.0)) + tl.where(e > 0.0, e * z_rel, 0.0)
        s = s * alpha + e
        return m_new, s, t

    @triton.jit
    def _logprob_fwd_kernel(
        # data ptrs
        logits_ptr, ids_ptr, logp_ptr, lse_ptr, entropy_ptr,
        # strides
        stride_logits,
        # shapes and scalars
        V, inv_temperature,
        WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # One program per row. Reads V logits, writes 3 floats: the whole op reads N*V once.
        row = tl.program_id(0).to(tl.int64)
        logits_row = logits_ptr + row * stride_logits
        cols = tl.arange(0, BLOCK_V)
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        t = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            z = tl.load(logits_row + start + cols, mask=start + cols < V, other=float("-inf"))
            z = z.to(tl.float32) * inv_temperature
            m, s, t = _online_lse_step(z, m, s, t, WITH_ENTROPY)
        m_row = tl.max(m, axis=0)
        shift = tl.where(m == float("-inf"), 0.0, m - m_row)
        scale = tl.where(m == float("-inf"), 0.0, tl.exp(shift))
        s_row = tl.sum(s * scale, axis=0)
        lse = m_row + tl.log(s_row)
        target = tl.load(ids_ptr + row)
        z_target = tl.load(logits_row + target).to(tl.float32) * inv_temperature
        tl.store(logp_ptr + row, z_target - lse)
        tl.store(lse_ptr + row, lse)
        if WITH_ENTROPY:
            # entropy = -sum p (z - lse) = log(s) - sum e^(z-m) (z-m) / s, with every lane moved to the row max
            t_row = tl.sum(scale * (t + shift * s), axis=0)
            tl.store(entropy_ptr + row, tl.log(s_row) - t_row / s_row)

    @triton.jit
    def _logprob_bwd_kernel(
        # data ptrs
        logits_ptr, dlogits_ptr, ids_ptr, lse_ptr, entropy_ptr, dlogp_ptr, dentropy_ptr,
        # strides
        stride_logits, stride_dlogits,
        # shapes and scalars
        V, inv_temperature,
        WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # One program per row. Reads V logits, writes V gradients; dlogits may be the logits buffer itself,
        # since each block is read before it is overwritten and no block is read twice.
        row = tl.program_id(0).to(tl.int64)
        logits_row = logits_ptr + row * stride_logits
        dlogits_row = dlogits_ptr + row * stride_dlogits
        cols = tl.arange(0, BLOCK_V)
        target = tl.load(ids_ptr + row)
        lse = tl.load(lse_ptr + row)
        g = tl.load(dlogp_ptr + row) * inv_temperature
        if WITH_ENTROPY:
            entropy = tl.load(entropy_ptr + row)
            g_entropy = tl.load(dentropy_ptr + row) * inv_temperature
        for start in range(0, V, BLOCK_V):
            in_vocab = start + cols < V
            z = tl.load(logits_row + start + cols, mask=in_vocab, other=float("-inf"))
            z = z.to(tl.float32) * inv_temperature
            p = tl.exp(z - lse)
            # d logp / dz = onehot - p
            dz = tl.where(start + cols == target, g, 0.0) - g * p
            if WITH_ENTROPY:
                # d entropy / dz_v = -p_v (log p_v + entropy)
                dz -= g_entropy * tl.where(p > 0.0, p * (z - lse + entropy), 0.0)
            tl.store(dlogits_row + start + cols, dz.to(dlogits_ptr.dtype.element_ty), mask=in_vocab)


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of V. The AOT test compiles every pair this can return."""
    block = min(4096, max(128, 1 << (V - 1).bit_length()))
    return block, 8 if block >= 4096 else 4


# ----------------------------------------------------------------------------------------------------------
# The spec: plain PyTorch, materializes fp32 (fp64 for fp64 logits) log-softmax.


def selective_logprobs_reference(logits, ids, temperature=1.0, return_entropy=False):
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    logp = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs.nan_to_num(neginf=0.0)).sum(-1)
    return logp, entropy


# ----------------------------------------------------------------------------------------------------------
# The two logits passes, on either backend. logits is 2-D [N, V] with unit stride along V.


def _scaled_chunk(logits: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    z = logits.float()
    return z * inv_temperature if inv_temperature != 1.0 else z


def _torch_forward(logits, ids, inv_temperature, with_entropy, chunk_bytes):
    N, V = logits.shape
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    step = rows_per_chunk(N, V * 4 * 2, chunk_bytes, logits.device)
    for start in range(0, N, step):
        rows = slice(start, start + step)
        z = _scaled_chunk(logits[rows], inv_temperature)  # (c, V), fp32
        if with_entropy:
            # torch.logsumexp, not log_softmax: on CPU (torch 2.13, fp32) log_softmax's normalizer is off by ~2.5e-5
            # at V = 151,936, logsumexp's by ~1e-6, and the entropy's gradient multiplies the error by the entropy
            # (4.7e-5 in d(logits) against fp64, 3x the fp32 reference's error). Without entropy the error stays
            # 2.5e-5 in logp and log_softmax is the faster (measured 15% on the whole pass).
            lse[rows] = torch.logsumexp(z, dim=-1)
            logprobs = torch.sub(z, lse[rows, None])  # (c, V); z may be the logits themselves: not in place
        else:
            logprobs = torch.log_softmax(z, dim=-1)  # (c, V): torch's fused kernel, one buffer
            # lse from each row's largest logit, whose log-prob is finite even where other entries are -inf
            lse[rows] = z.amax(1) - logprobs.amax(1)
        logp[rows] = logprobs.gather(1, ids[rows, None]).squeeze(1)
        if with_entropy:
            entropy[rows] = torch.special.entr(logprobs.exp_()).sum(-1)
    return logp, lse, entropy


def _torch_backward(logits, dlogits, ids, lse, entropy, dlogp, dentropy, inv_temperature, chunk_bytes):
    N, V = logits.shape
    step = rows_per_chunk(N, V * 4 * 2, chunk_bytes, logits.device)
    for start in range(0, N, step):
        rows = slice(start, start + step)
        z = _scaled_chunk(logits[rows], inv_temperature)
        g = dlogp[rows, None] * inv_temperature
        if entropy is None:
            p = torch.softmax(z, dim=-1).mul_(-g)  # (c, V): fused, one buffer; d logp / dz = onehot - p
        else:
            # log p from the forward's lse: softmax's normalizer has log_softmax's error (see _torch_forward).
            # d entropy / dz = -p (log p + entropy); at -inf logits (p = 0) nan_to_num_ makes the factor finite: 0
            log_p = torch.sub(z, lse[rows, None])  # (c, V)
            g_entropy = dentropy[rows, None] * inv_temperature
            p = log_p.exp()
            p.mul_(log_p.mul_(-g_entropy).sub_(g + g_entropy * entropy[rows, None]).nan_to_num_(nan=0.0))
        p.scatter_add_(1, ids[rows, None], g)
        dlogits[rows] = p  # casts to the logits dtype; may overwrite logits[rows], already consumed
    return dlogits


def logits_forward(logits, ids, temperature=1.0, with_entropy=False, backend=None, chunk_bytes=None):
    """One read of logits [N, V] -> (logp [N], lse [N], entropy [N] or None), all fp32.

    lse is the log-sum-exp of logits / temperature, which `logits_backward` needs.
    """
    check_temperature(temperature)
    inv_temperature = 1.0 / temperature
    if resolve_backend(backend, logits) == "torch":
        return _torch_forward(logits, ids, inv_temperature, with_entropy, chunk_bytes)
    N, V = logits.shape
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else lse  # dummy pointer when unused
    block, warps = launch_config(V)
    _logprob_fwd_kernel[(N,)](
        logits, ids, logp, lse, entropy, logits.stride(0), V, inv_temperature,
        WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=warps,
    )
    return logp, lse, entropy if with_entropy else None


def logits_backward(logits, ids, lse, dlogp, entropy=None, dentropy=None, temperature=1.0, out=None,
                    backend=None, chunk_bytes=None):
    """One read of logits [N, V], one write of d(logits) [N, V] into `out` (which may be `logits`).

    dlogp, dentropy: [N] fp32 upstream gradients of logp and entropy (dentropy None: entropy has no gradient).
    """
    inv_temperature = 1.0 / temperature
    out = torch.empty_like(logits) if out is None else out
    with_entropy = dentropy is not None
    if resolve_backend(backend, logits) == "torch":
        return _torch_backward(logits, out, ids, lse, entropy if with_entropy else None, dlogp, dentropy,
                               inv_temperature, chunk_bytes)
    N, V = logits.shape
    block, warps = launch_config(V)
    _logprob_bwd_kernel[(N,)](
        logits, out, ids, lse, entropy if with_entropy else lse, dlogp, dentropy if with_entropy else dlogp,
        logits.stride(0), out.stride(0), V, inv_temperature,
        WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=warps,
    )
    return out


def as_rows(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View logits [..., V] and ids [...] as [N, V] and [N]; copies only if the layout forces it."""
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and token ids {tuple(ids.shape)} disagree on the leading dims")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits.reshape(-1, logits.shape[-1]), ids.reshape(-1).contiguous()


# ----------------------------------------------------------------------------------------------------------


class _SelectiveLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, temperature, with_entropy, inplace_backward, backend, chunk_bytes):
        logp, lse, entropy = logits_forward(logits, ids, temperature, with_entropy, backend, chunk_bytes)
        ctx.save_for_backward(logits, ids, lse, entropy if with_entropy else lse)
        ctx.config = (temperature, with_entropy, inplace_backward, backend, chunk_bytes)
        if not with_entropy:
            ctx.mark_non_differentiable(lse)
        return logp, entropy if with_entropy else lse

    @staticmethod
    def backward(ctx, dlogp, dentropy):
        logits, ids, lse, entropy = ctx.saved_tensors
        temperature, with_entropy, inplace_backward, backend, chunk_bytes = ctx.config
        dlogp = torch.zeros_like(lse) if dlogp is None else dlogp.float().contiguous()
        dentropy = dentropy.float().contiguous() if with_entropy and dentropy is not None else None
        dlogits = logits_backward(logits, ids, lse, dlogp, entropy, dentropy, temperature,
                                  out=logits if inplace_backward else None, backend=backend, chunk_bytes=chunk_bytes)
        return dlogits, None, None, None, None, None, None


def selective_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str | None = None,
    chunk_bytes: int | None = None,
):
    """Log-probability of each chosen token, and optionally the entropy of each distribution.

    logits: [..., V] (fp32, bf16 or fp16; unit stride along V), e.g. [N, V] or [B, T, V]
    ids:    [...] integer token ids in [0, V), same leading shape (any other id: ValueError)
    returns logp [...] fp32, or (logp, entropy) both [...] fp32.

    inplace_backward=True writes d(logits) into the logits buffer, so training never holds a second [N, V]
    tensor; only use it when nothing else needs the logits after the backward.

    >>> logits = torch.randn(2, 5, 11); ids = torch.randint(0, 11, (2, 5))
    >>> selective_logprobs(logits, ids).shape
    torch.Size([2, 5])
    """
    lead = ids.shape
    rows, flat_ids = as_rows(logits, ids)
    flat_ids = checked_ids(flat_ids, rows.shape[1], "selective_logprobs")
    logp, entropy = _SelectiveLogprobs.apply(rows, flat_ids, temperature, return_entropy, inplace_backward,
                                             backend, chunk_bytes)
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)
