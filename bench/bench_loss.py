"""Inputs for the loss-level benchmark: a GRPO loss over an LM head, hidden [B, T, H] x weight [V, H].

Every implementation gets the same seeded inputs: B sequences of T tokens (N = B*T), padded at the end to a
random length in [T/2, T]; old_logp = the true log-probs + noise (std 0.1), so ratios sit near 1 and a few
percent clip; ref_logp likewise; advantages ~ N(0, 1). fp32 on CPU, bf16 on CUDA; the per-token vectors fp32.
The loss is token-level, loss_type="grpo", beta=0.04, eps=0.2 in every implementation.

    build(impl, B, T, H, V, device) -> harness.Step          one case, run by the harness in a fresh process

IMPLS lists the implementations: "floor" is the three matmuls every exact method needs; "logits" ones
materialize the [N, V] logits; "fused" ones never do (their memory is compared with each other).
"""

from __future__ import annotations

import torch

from harness import Skip, Step

BETA = 0.04
EPS = 0.2
IMPLS = {
    "gemm_floor": "floor",
    "torch": "logits",
    "trl": "logits",
    "liger_triton": "logits",
    "fastgrpo_logits": "logits",
    "trl_fused_lm_head": "fused",
    "liger_chunked": "fused",
    "fastgrpo_fused": "fused",
    "fastgrpo_fused_token_adv": "fused",  # the same with per-token advantages [B, T] (process supervision)
}
REFERENCES = ("torch", "trl", "liger_triton", "trl_fused_lm_head", "liger_chunked")


def dtype_for(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def make_inputs(B, T, H, V, device, seed=0, with_logp=True):
    """hidden [B, T, H] and weight [V, H] (leaves requiring grad); ids/mask/old_logp/ref_logp [B, T]; advantages [B]."""
    dtype = dtype_for(device)
    # drawn on the device: a CPU takes seconds for the V x H weight of a real vocabulary (17 s here at H=3584)
    gen = torch.Generator(device).manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, device=device)
    weight = torch.randn(V, H, generator=gen, device=device) * H**-0.5  # logits ~ N(0, 1), as in a trained head
    ids = torch.randint(V, (B, T), generator=gen, device=device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen, device=device)
    mask = (torch.arange(T, device=device) < lengths[:, None]).float()  # (B, T)
    advantages = torch.randn(B, generator=gen, device=device)
    x = dict(hidden=hidden.to(device, dtype).requires_grad_(), weight=weight.to(device, dtype).requires_grad_(),
             ids=ids.to(device), mask=mask.to(device), advantages=advantages.to(device))
    if with_logp:
        logp = _true_logp(x["hidden"], x["weight"], x["ids"])
        noise = torch.randn(2, B, T, generator=gen, device=device)
        x["old_logp"] = logp + 0.1 * noise[0]
        x["ref_logp"] = logp + 0.1 * noise[1]
    return x


@torch.no_grad()
def _true_logp(hidden, weight, ids, rows=256):
    """fp32 log-probs of ids, a few hundred rows at a time so building inputs never holds the [N, V] logits."""
    h, flat_ids = hidden.flatten(0, 1), ids.flatten()
    out = torch.empty(h.shape[0], device=h.device)
    for i in range(0, h.shape[0], rows):
        logits = (h[i:i + rows] @ weight.T).float()
        out[i:i + rows] = logits.gather(-1, flat_ids[i:i + rows, None]).squeeze(-1) - logits.logsumexp(-1)
    return out.view(ids.shape)


def trl_grpo_loss(logp, old_logp, ref_logp, advantages, mask):
    """The lines of TRL 1.16 `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py) that run for
    importance_sampling_level="token", loss_type="grpo", beta != 0, delta=None, no gradient accumulation."""
    advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(logp - old_logp)
    per_token_kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    coef_2 = torch.clamp(coef_1, 1 - EPS, 1 + EPS)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    per_token_loss = per_token_loss + BETA * per_token_kl
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def build(impl, B, T, H, V, device="cpu"):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl == "liger_triton" and torch.device(device).type != "cuda":
        raise Skip("Triton kernel, CUDA only (runs on CPU only under TRITON_INTERPRET=1, for correctness)")
    N = B * T
    x = make_inputs(B, T, H, V, device, with_logp=impl != "gemm_floor")
    h, W = x["hidden"], x["weight"]
    common = dict(params=[h, W], flops=6 * N * H * V, min_bytes=3 * (N * H + V * H) * h.element_size(), tokens=N)
    backward = torch.Tensor.backward
    if impl == "gemm_floor":
        return _gemm_floor(h.detach().flatten(0, 1), W.detach(), common)
    rest = (x["old_logp"], x["ref_logp"], x["advantages"], x["mask"])
    ids = x["ids"]

    if impl == "torch":
        def forward():
            logits = h @ W.T  # (B, T, V)
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
            return trl_grpo_loss(logp, *rest)

    elif impl == "trl":
        from trl.trainer.utils import selective_log_softmax

        def forward():
            return trl_grpo_loss(selective_log_softmax(h @ W.T, ids), *rest)

    elif impl == "trl_fused_lm_head":
        forward = _trl_fused_lm_head(h, W, ids, rest)

    elif impl == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=BETA, epsilon_low=EPS, epsilon_high=EPS, loss_type="grpo")
        old_logp, ref_logp, advantages, mask = rest

        def forward():
            loss, _ = liger(h, W, ids, mask, advantages, ref_per_token_logps=ref_logp, old_per_token_logps=old_logp)
            return loss

    elif impl == "liger_triton":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        old_logp, ref_logp, advantages, mask = rest

        def forward():
            # The kernel takes logits for T + 1 positions (it drops the last), as a causal LM returns them.
            logits = torch.cat([h, h[:, -1:]], 1) @ W.T  # (B, T + 1, V)
            loss, _ = triton_grpo_loss(logits, old_logp, ref_logp, ids, advantages, mask, temperature=1.0,
                                       beta=BETA, eps_low=EPS, eps_high=EPS, loss_type="grpo", reduce=True)
            return loss

    elif impl == "fastgrpo_logits":
        from fastgrpo_kernels.grpo_loss import GRPOLossConfig, grpo_loss

        old_logp, ref_logp, advantages, mask = rest

        def forward():
            loss, _ = grpo_loss(h @ W.T, ids, advantages, mask, old_logp, ref_logp, GRPOLossConfig(beta=BETA),
                                inplace_backward=True)
            return loss

    elif impl in ("fastgrpo_fused", "fastgrpo_fused_token_adv"):
        try:
            from fastgrpo_kernels.fused_linear import fused_linear_grpo_loss
        except ImportError as e:
            raise Skip(f"fastgrpo_kernels.fused_linear not importable yet: {e}") from e
        from fastgrpo_kernels.grpo_loss import GRPOLossConfig

        old_logp, ref_logp, advantages, mask = rest
        per_token = {}
        if impl == "fastgrpo_fused_token_adv":  # one value per token, built before timing
            per_token = {"token_advantages": advantages[:, None].expand_as(mask).contiguous()}
            advantages = None

        def forward():
            loss, _ = fused_linear_grpo_loss(h, W, ids, advantages, mask, old_logp, ref_logp, GRPOLossConfig(beta=BETA),
                                             **per_token)
            return loss

    return Step(forward=forward, backward=backward, **common)


def _gemm_floor(h, W, common):
    """The three matmuls, no autograd: logits = h W^T forward; dh = g W and dW = g^T h backward."""
    g = torch.randn(h.shape[0], W.shape[0], dtype=h.dtype, device=h.device)  # (N, V), built before timing

    def backward(logits):
        g @ W
        g.T @ h

    return Step(forward=lambda: h @ W.T, backward=backward, **common)


def _trl_fused_lm_head(h, W, ids, rest):
    """What TRL 1.16's GRPOTrainer really runs: `add_fused_lm_head` (trl/trainer/utils.py) projects through
    `trl.kernels.ChunkedLogProbFunction` without materializing the logits. Only the valid positions are scored
    on CUDA/XPU and every position elsewhere, as there. The trainer also asks for the entropy (a logged metric);
    this asks for the log-probs only, like the other cases."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask = rest[3].bool()
    compact = h.is_cuda

    def forward():
        rows = h[mask] if compact else h.flatten(0, 1)
        targets = ids[mask] if compact else ids.flatten()
        logp, *_ = ChunkedLogProbFunction.apply(rows, W, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                ("log_probs",))
        logp = logp.new_zeros(mask.shape).masked_scatter(mask, logp) if compact else logp.view(mask.shape)
        return trl_grpo_loss(logp, *rest)

    return forward
