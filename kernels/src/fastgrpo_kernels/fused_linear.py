"""Fused-linear ops: log-probs, cross-entropy and the GRPO loss from hidden states and the LM-head weight,
chunk by chunk, never holding the [N, V] logits.

Per chunk of rows (its size bounded by `chunk_bytes`):
    z  = h_c W^T                      matmul 1             (c, V) written once into one reused buffer
    logp, dlogp, then dz in place     the logits math (Triton: fwd + bwd kernels; torch: see below)
    dh_c = dz W                       matmul 2
    dW  += dz^T h_c                   matmul 3, skipped when the head is frozen
Gradients are computed during the forward (the loss is a scalar, so the backward only scales them), which is
what makes three matmuls enough. The exceptions are the sequence-level (GSPO) ratio and VESPO's sequence weight,
whose per-token gradient needs the whole sequence's log-probs first: they take a forward sweep and a backward
sweep, recomputing z.
fused_linear_logprobs, whose upstream gradient is unknown at forward time, recomputes z in its backward too.

On the torch (CPU) path each chunk is swept in vocabulary tiles small enough to stay in cache, so the logits
math runs on what the matmul just wrote instead of streaming the whole chunk through memory several times
(_tiled_stats, _tiled_grad).

Under torch.autocast the ops compute as an autocast linear would: hidden states and weight in the autocast dtype
(an fp32 weight still gets an fp32 gradient), the log-softmax math and the per-token results in fp32.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import check_temperature, checked_ids, resolve_backend, rows_per_chunk
from .grpo_loss import (
    GRPOLossConfig, Normalizers, finish_metrics, make_token_batch, metrics_dict, objective_grad,
)
from .logprobs import logits_backward, logits_forward


def _autocast_inputs(hidden, weight):
    """(hidden, compute dtype). Under torch.autocast the ops compute like an autocast linear: hidden states and
    weight in the autocast dtype, log-softmax math in fp32. hidden is cast here (a differentiable cast); the weight
    inside the op, which sums dW straight into the weight's own dtype (fp32 for mixed precision's master weights):
    no low-precision dW, no cast of it."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight.dtype
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), dtype


def _add_mm(out, a, b):
    """out += a @ b; a product in a narrower dtype than out's (bf16 tiles into fp32 sums) is added after it."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out.add_(torch.mm(a, b))


DW_SLICE_ROWS = 16384


def _add_dw(dw, dz, h):
    """dw (V, H) += dz^T h for a whole logits chunk dz (c, V). Summed in dW's dtype: an fp32 weight computed in bf16
    gets fp32 sums of each chunk's bf16 product, whose temporary is one vocabulary slice, not another V x H."""
    if dw.dtype == dz.dtype:
        dw.addmm_(dz.t(), h)
        return
    for v0 in range(0, dw.shape[0], DW_SLICE_ROWS):
        _add_mm(dw[v0: v0 + DW_SLICE_ROWS], dz[:, v0: v0 + DW_SLICE_ROWS].t(), h)


def _without_autocast(fn):
    """Run a sweep with autocast off: its fp32 parts (the gradient sums over tiles and chunks) must stay fp32,
    and its matmuls already see the dtype _autocast_inputs chose."""
    def run(hidden, *args, **kwargs):
        with torch.autocast(hidden.device.type, enabled=False):
            return fn(hidden, *args, **kwargs)
    return run


# ----------------------------------------------------------------------------------------------------------
# The per-chunk work of each backend. The sweeps below are written once and call, per chunk of rows h (c, H):
#   stats(h, ids, with_entropy) -> (logp, lse, entropy or None), fp32 [c]
#   grad(h, ids, lse, dlogp, dh, dw): given dlogp, d(loss)/d(h) into dh (c, H), d(loss)/d(W) added to dw (V, H);
#                                     either may be None
# `eager` marks the sweep that runs both on each chunk (grad reuses the logits stats computed); the forward sweep
# runs only stats, the backward sweep only grad, which then recomputes the logits.


class _TritonChunks:
    """Triton path: each chunk's logits z = h W^T (c, V) go into one reused buffer in the input dtype; the logits
    kernels read it (stats) and overwrite it with dz (grad: read c*V, write c*V), then dh = dz W and dW += dz^T h."""

    def __init__(self, hidden, weight, temperature, backend, chunk_bytes, eager):
        N, V = hidden.shape[0], weight.shape[0]
        self.step = rows_per_chunk(N, V * hidden.element_size(), chunk_bytes, hidden.device)
        self.buf = torch.empty(self.step, V, dtype=hidden.dtype, device=hidden.device)
        self.weight, self.temperature, self.backend, self.eager = weight, temperature, backend, eager
        self.dh_dtype = hidden.dtype  # each chunk's rows written once, by the dh matmul
        self.z = None

    def _logits(self, h):
        return torch.mm(h, self.weight.t(), out=self.buf[: h.shape[0]])

    def stats(self, h, ids, with_entropy):
        self.z = self._logits(h)
        return logits_forward(self.z, ids, self.temperature, with_entropy, self.backend)

    def grad(self, h, ids, lse, dlogp, dh, dw):
        z = self.z if self.eager else self._logits(h)
        logits_backward(z, ids, lse, dlogp, temperature=self.temperature, out=z, backend=self.backend)
        dz = z.to(self.weight.dtype)
        if dh is not None:
            torch.mm(dz, self.weight, out=dh)
        if dw is not None:
            _add_dw(dw, dz, h.to(self.weight.dtype))


# ----------------------------------------------------------------------------------------------------------
# The torch (CPU) path: vocabulary tiles that stay in cache.
#
# A chunk of c rows is swept in tiles of a few hundred vocabulary entries. Pass 1 computes z_t = h_c W_t^T and,
# while z_t is in cache, folds it into a running max and sum of exponentials (online log-sum-exp) and the entropy
# sum. Pass 2 turns each tile into dz_t = -g p_t and applies both gradient matmuls while dz_t is in cache. The
# one-hot part of d(logp)/dz (g at the target) is applied apart, as dh += g W[ids] and dW[ids] += g h. The target's
# logit is read from its tile, so it is the very number the log-sum-exp saw (in bf16: the rounded product, as on the
# Triton path; a separate fp32 dot product disagreed with it by up to 2e-2 in log-prob at T = 0.7). The logits
# chunk is read back from memory once (pass 2) instead of streaming through it in five passes (log-softmax and its
# gradient over the whole chunk), which added 30-40% to the matmuls at N = 1024, H = 512, V = 151,936; with the
# tiles both ops run at the matmul floor there (fp32, 2 cores).

TILE_BYTES = 2 * 2**20  # one c x tile fp32 block, cache-sized (1-4 MiB measured alike; 256 KiB slower)
FORWARD_ROWS_FACTOR = 4  # sweeps that keep no logits chunk (memory: one tile) take 4x the rows: fewer matmuls


def _vocab_tiles(V: int, rows: int) -> list[tuple[int, int]]:
    width = max(128, TILE_BYTES // (4 * max(rows, 1)) // 128 * 128)
    return [(v0, min(v0 + width, V)) for v0 in range(0, V, width)]


def _mm_into(h, weight_tile, out):
    """out = h weight_tile^T in out's dtype (fp32), computing in the weight's dtype.

    bf16 inputs still get fp32 tiles, converted once here: bf16 tiles that the logits math reads into fp32 measured
    slower (on CPU, a bf16-in / fp32-out subtract and a bf16 amax run 2.5-3x slower than their fp32 forms)."""
    if out.dtype == h.dtype:
        return torch.mm(h, weight_tile.t(), out=out)
    return out.copy_(torch.mm(h, weight_tile.t()))


def _tiled_stats(h, weight, ids, inv_t, with_entropy, tiles, z_tiles):
    """Pass 1 over one chunk: (logp, lse, entropy or None), fp32 [c]; fills z_tiles (one (c, v1 - v0) fp32 buffer
    per tile (v0, v1)) with the scaled logits z / T."""
    c = h.shape[0]
    m = torch.full((c,), -math.inf, device=h.device)
    s = torch.zeros(c, device=h.device)
    w = torch.zeros(c, device=h.device) if with_entropy else None  # sum of exp(z - m) z
    scratch = torch.empty(z_tiles[0].numel(), device=h.device)
    width = tiles[0][1] - tiles[0][0]  # every tile's but the last one's
    tile_of, col = ids // width, ids % width  # where each target lies
    z_at = torch.empty(len(tiles), c, device=h.device)  # [i, r]: tile i's logit at row r's target column
    for i, ((v0, v1), z) in enumerate(zip(tiles, z_tiles)):
        _mm_into(h, weight[v0:v1], z)
        if inv_t != 1.0:
            z.mul_(inv_t)
        torch.gather(z, 1, (col if v1 - v0 == width else col.clamp(max=v1 - v0 - 1))[:, None], out=z_at[i, :, None])
        m_new = torch.maximum(m, z.amax(1))
        e = torch.sub(z, m_new[:, None], out=scratch[: z.numel()].view(z.shape)).exp_()
        rescale = torch.exp(m - m_new)
        s = s * rescale + e.sum(1)
        if with_entropy:
            w = w * rescale + torch.linalg.vecdot(e, z)
        m = m_new
    lse = m + torch.log(s)
    z_target = z_at.gather(0, tile_of[None])[0]
    entropy = lse - w / s if with_entropy else None
    return z_target - lse, lse, entropy


def _tiled_grad(h, weight, ids, lse, g, tiles, z_tiles, dh, dw, recompute_inv_t=None):
    """Pass 2 over one chunk: dz = g (onehot - p) with g = dlogp / T; dh (c, H) fp32 += dz W, dw += dz^T h.

    z_tiles hold z / T from pass 1, or (recompute_inv_t given) are scratch to recompute them into."""
    for (v0, v1), z in zip(tiles, z_tiles):
        if recompute_inv_t is not None:
            _mm_into(h, weight[v0:v1], z)
            if recompute_inv_t != 1.0:
                z.mul_(recompute_inv_t)
        dz = z.sub_(lse[:, None]).exp_().mul_(-g[:, None]).to(weight.dtype)  # -g p
        if dh is not None:  # fp32 sums (of bf16 tile products, for bf16 inputs)
            _add_mm(dh, dz, weight[v0:v1])
        if dw is not None:  # in dW's own dtype (fp32 for an fp32 weight computed in bf16)
            _add_mm(dw[v0:v1], dz.t(), h)
    if dh is not None:
        dh.add_(weight[ids].float() * g[:, None])
    if dw is not None:
        dw.index_add_(0, ids, (h.float() * g[:, None]).to(dw.dtype))


def _tile_buffers(rows, V, device, store_all):
    """(tiles, buffers): the vocabulary tiles for chunks of up to `rows` rows, and buffers(c) -> one contiguous
    (c, v1 - v0) fp32 buffer per tile, carved from one allocation: every tile of the chunk (store_all: pass 2
    reads them back) or one tile's worth that every tile reuses."""
    tiles = _vocab_tiles(V, rows)
    width = tiles[0][1] - tiles[0][0]
    flat = torch.empty(rows * (V if store_all else width), device=device)
    if store_all:
        return tiles, lambda c: [flat[c * v0: c * v1].view(c, v1 - v0) for v0, v1 in tiles]
    return tiles, lambda c: [flat[: c * (v1 - v0)].view(c, v1 - v0) for v0, v1 in tiles]


class _TorchChunks:
    """torch path: each chunk swept in vocabulary tiles. The eager sweep keeps all of a chunk's tiles from pass 1
    to pass 2 (store_all); the others keep one tile's worth, so they take FORWARD_ROWS_FACTOR times the rows."""

    def __init__(self, hidden, weight, temperature, chunk_bytes, eager):
        N, V = hidden.shape[0], weight.shape[0]
        row_bytes = V * 4 if eager else V * 4 // FORWARD_ROWS_FACTOR
        self.step = rows_per_chunk(N, row_bytes, chunk_bytes, hidden.device)
        self.tiles, self.buffers = _tile_buffers(self.step, V, hidden.device, store_all=eager)
        self.weight, self.inv_t, self.eager = weight, 1.0 / temperature, eager
        self.dh_dtype = torch.float32  # summed over the tiles
        self.z_tiles = None

    def stats(self, h, ids, with_entropy):
        self.z_tiles = self.buffers(h.shape[0])
        return _tiled_stats(h, self.weight, ids, self.inv_t, with_entropy, self.tiles, self.z_tiles)

    def grad(self, h, ids, lse, dlogp, dh, dw):
        z_tiles = self.z_tiles if self.eager else self.buffers(h.shape[0])
        _tiled_grad(h, self.weight, ids, lse, dlogp * self.inv_t, self.tiles, z_tiles, dh, dw,
                    recompute_inv_t=None if self.eager else self.inv_t)


# ----------------------------------------------------------------------------------------------------------
# The sweeps over chunks of rows, the same for both backends.


def _chunks(hidden, weight, temperature, backend, chunk_bytes, eager):
    if backend == "torch":
        return _TorchChunks(hidden, weight, temperature, chunk_bytes, eager)
    return _TritonChunks(hidden, weight, temperature, backend, chunk_bytes, eager)


def _row_slices(N, step):
    return [slice(start, min(start + step, N)) for start in range(0, N, step)]


def _grad_buffers(chunks, hidden, weight, need_dh, dw_dtype):
    dh = torch.zeros(hidden.shape, dtype=chunks.dh_dtype, device=hidden.device) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=dw_dtype, device=weight.device) if dw_dtype else None
    return dh, dw


@_without_autocast
def _eager_sweep(hidden, weight, ids, temperature, token_grad, with_entropy, need_dh, dw_dtype, backend,
                 chunk_bytes):
    """The three-matmul loop. token_grad(logp_c, rows) -> dlogp_c. Returns (logp, entropy, dh, dW); dW in dw_dtype
    (None: no dW)."""
    N = hidden.shape[0]
    chunks = _chunks(hidden, weight, temperature, backend, chunk_bytes, eager=True)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logp) if with_entropy else None
    dh, dw = _grad_buffers(chunks, hidden, weight, need_dh, dw_dtype)
    for rows in _row_slices(N, chunks.step):
        h = hidden[rows]
        logp[rows], lse, ent = chunks.stats(h, ids[rows], with_entropy)
        if with_entropy:
            entropy[rows] = ent
        chunks.grad(h, ids[rows], lse, token_grad(logp[rows], rows), None if dh is None else dh[rows], dw)
    return logp, entropy, None if dh is None else dh.to(hidden.dtype), dw


@_without_autocast
def _forward_sweep(hidden, weight, ids, temperature, with_entropy, backend, chunk_bytes):
    """logp, lse, entropy (or None) for all rows, one matmul per chunk and no gradient."""
    N = hidden.shape[0]
    chunks = _chunks(hidden, weight, temperature, backend, chunk_bytes, eager=False)
    out = [torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3 if with_entropy else 2)]
    for rows in _row_slices(N, chunks.step):
        for o, r in zip(out, chunks.stats(hidden[rows], ids[rows], with_entropy)):
            o[rows] = r
    return out[0], out[1], out[2] if with_entropy else None


@_without_autocast
def _backward_sweep(hidden, weight, ids, lse, dlogp, temperature, need_dh, dw_dtype, backend, chunk_bytes):
    """Recompute each logits chunk and apply dlogp: (dh, dW in dw_dtype or None)."""
    chunks = _chunks(hidden, weight, temperature, backend, chunk_bytes, eager=False)
    dh, dw = _grad_buffers(chunks, hidden, weight, need_dh, dw_dtype)
    for rows in _row_slices(hidden.shape[0], chunks.step):
        chunks.grad(hidden[rows], ids[rows], lse[rows], dlogp[rows], None if dh is None else dh[rows], dw)
    return None if dh is None else dh.to(hidden.dtype), dw


def _compute_weight(weight, dtype):
    """The weight in the compute dtype: itself, or a cast copy (no autograd: the ops return dW themselves)."""
    return weight if weight.dtype == dtype else weight.detach().to(dtype)


def _dw_dtype(ctx, weight):
    return weight.dtype if ctx.needs_input_grad[1] else None


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
    def forward(ctx, hidden, weight, ids, temperature, backend, chunk_bytes, dtype):
        logp, lse, _ = _forward_sweep(hidden, _compute_weight(weight, dtype), ids, temperature, False, backend,
                                      chunk_bytes)
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.config = (temperature, backend, chunk_bytes, dtype)
        return logp

    @staticmethod
    def backward(ctx, dlogp):
        hidden, weight, ids, lse = ctx.saved_tensors
        temperature, backend, chunk_bytes, dtype = ctx.config
        dh, dw = _backward_sweep(hidden, _compute_weight(weight, dtype), ids, lse, dlogp.float().contiguous(),
                                 temperature, ctx.needs_input_grad[0], _dw_dtype(ctx, weight), backend, chunk_bytes)
        return dh, dw, None, None, None, None, None


def fused_linear_logprobs(hidden, weight, ids, temperature=1.0, backend=None, chunk_bytes=None):
    """log_softmax(hidden @ weight.T / T)[ids] without materializing the logits.

    hidden [..., H], weight [V, H], ids [...] in [0, V) -> logp [...] fp32. Use it under torch.no_grad() for the
    old and reference log-prob passes (one matmul per chunk); its backward recomputes the logits chunk by chunk.
    """
    check_temperature(temperature)
    hidden, dtype = _autocast_inputs(hidden, weight)
    flat_h, flat_ids = _flatten_inputs(hidden, weight, ids)
    flat_ids = checked_ids(flat_ids, weight.shape[0], "fused_linear_logprobs")
    backend = resolve_backend(backend, hidden)
    return _FusedLinearLogprobs.apply(flat_h, weight, flat_ids, temperature, backend, chunk_bytes,
                                      dtype).view(ids.shape)


# ----------------------------------------------------------------------------------------------------------
# Cross-entropy for SFT (eager gradients: three matmuls).


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, token_weights, temperature, backend, chunk_bytes, dtype):
        logp, _, dh, dw = _eager_sweep(hidden, _compute_weight(weight, dtype), ids, temperature,
                                       lambda lp, rows: -token_weights[rows], False, ctx.needs_input_grad[0],
                                       _dw_dtype(ctx, weight), backend, chunk_bytes)
        ctx.save_for_backward(dh, dw)
        return -(logp * token_weights).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return _scaled(dh, grad_loss), _scaled(dw, grad_loss), None, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, ids, mask=None, reduction="mean", temperature=1.0, backend=None,
                               chunk_bytes=None):
    """Token cross-entropy of hidden @ weight.T against ids, never materializing the logits.

    hidden [..., H], weight [V, H], ids [...] (negative ids, e.g. -100, are ignored), mask [...] optional 0/1; where
    mask is 0 the id may be anything, elsewhere a non-negative id must be < V.
    reduction "mean" (over unmasked tokens) or "sum". Returns an fp32 scalar.
    """
    check_temperature(temperature)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden, dtype = _autocast_inputs(hidden, weight)
    flat_h, flat_ids = _flatten_inputs(hidden, weight, ids)
    keep = flat_ids >= 0
    if mask is not None:
        keep &= mask.reshape(-1) != 0
    flat_ids = checked_ids(flat_ids, weight.shape[0], "fused_linear_cross_entropy", keep)
    token_weights = keep.float() / (keep.sum().clamp(min=1) if reduction == "mean" else 1)
    backend = resolve_backend(backend, hidden)
    return _FusedLinearCrossEntropy.apply(flat_h, weight, flat_ids, token_weights, temperature, backend, chunk_bytes,
                                          dtype)


# ----------------------------------------------------------------------------------------------------------
# The GRPO loss.


class _FusedLinearGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, batch, config, backend, chunk_bytes, dtype):
        need_dh, dw_dtype = ctx.needs_input_grad[0], _dw_dtype(ctx, weight)
        weight = _compute_weight(weight, dtype)
        with_entropy = config.compute_entropy
        if config.token_local:
            totals = []

            def token_grad(logp, rows):
                loss, dlogp, sums = objective_grad(logp, batch.rows(rows), config)
                totals.append(torch.cat([loss[None], sums]))
                return dlogp

            _, entropy, dh, dw = _eager_sweep(hidden, weight, ids, config.temperature, token_grad, with_entropy,
                                              need_dh, dw_dtype, backend, chunk_bytes)
            loss, sums = torch.stack(totals).sum(0).split([1, len(totals[0]) - 1])
            loss = loss.squeeze(0)
        else:
            logp, lse, entropy = _forward_sweep(hidden, weight, ids, config.temperature, with_entropy, backend,
                                                chunk_bytes)
            loss, dlogp, sums = objective_grad(logp, batch, config)
            dh, dw = _backward_sweep(hidden, weight, ids, lse, dlogp, config.temperature, need_dh, dw_dtype, backend,
                                     chunk_bytes)
        metrics = finish_metrics(sums, entropy, batch)
        ctx.mark_non_differentiable(metrics)
        ctx.save_for_backward(dh, dw)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        dh, dw = ctx.saved_tensors
        return _scaled(dh, grad_loss), _scaled(dw, grad_loss), None, None, None, None, None, None


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    backend: str | None = None,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of `grpo_loss`, from hidden states and the LM-head weight instead of logits.

    hidden [B, T, H] (padded) or [N, H] with cu_seqlens [B + 1] (packed); weight [V, H] (requires_grad=False for a
    frozen head skips dW); advantages [B] (or None, and token_advantages [B, T] / [N]), the per-token inputs, the
    normalizers num_items / num_sequences / num_batches: as in `fastgrpo_kernels.grpo_loss`. Peak extra memory is
    one logits chunk of at most chunk_bytes (default 128 MiB on CPU, 1 GiB on CUDA) plus O(N) vectors, and dW in
    the weight's dtype. Returns (loss, metrics).
    """
    hidden, dtype = _autocast_inputs(hidden, weight)
    flat_h, flat_ids = _flatten_inputs(hidden, weight, ids)
    norms = Normalizers(num_items, num_sequences, num_batches)
    batch = make_token_batch(ids, advantages, mask, old_logp, ref_logp, is_weights, config, cu_seqlens, norms,
                             token_advantages)
    flat_ids = checked_ids(flat_ids, weight.shape[0], "fused_linear_grpo_loss", keep=batch.live)
    backend = resolve_backend(backend, hidden)
    loss, metrics = _FusedLinearGRPOLoss.apply(flat_h, weight, flat_ids, batch, config, backend, chunk_bytes, dtype)
    return loss, metrics_dict(metrics, config)
