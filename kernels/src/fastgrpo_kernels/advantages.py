"""Group-normalized advantages: A_i = (r_i - mean_group) / scale, one program per group.

scale: "group" (the group's std, GRPO), "batch" (the std of all rewards), "none" (Dr. GRPO).
Groups whose valid rewards are all equal get exactly zero advantage. NaN rewards (a reward function that
failed) are left out of every statistic and get zero advantage. Std is unbiased (n - 1), as in TRL.
No backward: rewards are not differentiated.
"""

from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, resolve_backend

SCALES = ("group", "batch", "none")

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _group_advantages_kernel(
        # data ptrs
        rewards_ptr, advantages_ptr, batch_std_ptr,
        # shapes and scalars
        G, eps,
        SCALE: tl.constexpr,  # 0 none, 1 group, 2 batch
        BLOCK_G: tl.constexpr,
    ):
        # One program per group: reads G rewards, writes G advantages.
        group = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_G)
        in_group = offs < G
        r = tl.load(rewards_ptr + group * G + offs, mask=in_group, other=float("nan")).to(tl.float32)
        valid = in_group & (r == r)  # NaN != NaN
        n = tl.sum(valid.to(tl.float32), axis=0)
        mean = tl.sum(tl.where(valid, r, 0.0), axis=0) / tl.maximum(n, 1.0)
        dev = tl.where(valid, r - mean, 0.0)
        spread = tl.max(tl.where(valid, r, float("-inf")), axis=0) - tl.min(tl.where(valid, r, float("inf")), axis=0)
        if SCALE == 1:
            dev = dev / (tl.sqrt(tl.sum(dev * dev, axis=0) / tl.maximum(n - 1.0, 1.0)) + eps)
        elif SCALE == 2:
            dev = dev / (tl.load(batch_std_ptr) + eps)
        # spread is -inf for an all-NaN group and 0 for a constant one: both give zero advantage.
        tl.store(advantages_ptr + group * G + offs, tl.where(spread > 0.0, dev, 0.0), mask=in_group)


def group_advantages_reference(rewards, group_size, scale="group", eps=1e-4):
    """The spec, one group at a time."""
    valid_all = rewards[~torch.isnan(rewards)].float()
    batch_std = valid_all.std() if valid_all.numel() > 1 else torch.tensor(0.0)
    out = torch.zeros(rewards.numel(), dtype=torch.float32)
    for start in range(0, rewards.numel(), group_size):
        r = rewards[start:start + group_size].float()
        ok = ~torch.isnan(r)
        if ok.sum() < 2 or r[ok].max() == r[ok].min():
            continue
        adv = r[ok] - r[ok].mean()
        if scale == "group":
            adv = adv / (r[ok].std() + eps)
        elif scale == "batch":
            adv = adv / (batch_std + eps)
        out[start:start + group_size][ok] = adv
    return out


def _batch_std(r: torch.Tensor) -> torch.Tensor:
    """Unbiased std of the non-NaN rewards, as a 1-element tensor (stays on device)."""
    valid = ~torch.isnan(r)
    n = valid.sum()
    mean = torch.where(valid, r, 0.0).sum() / n.clamp(min=1)
    var = torch.where(valid, r - mean, 0.0).square().sum() / (n - 1).clamp(min=1)
    return var.sqrt().reshape(1)


def _torch_group_advantages(r, G, scale, eps):
    r = r.view(-1, G)  # (B, G)
    valid = ~torch.isnan(r)
    n = valid.sum(1, keepdim=True)
    mean = torch.where(valid, r, 0.0).sum(1, keepdim=True) / n.clamp(min=1)
    dev = torch.where(valid, r - mean, 0.0)
    if scale == "group":
        dev = dev / ((dev.square().sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt() + eps)
    elif scale == "batch":
        dev = dev / (_batch_std(r) + eps)
    spread = r.masked_fill(~valid, float("-inf")).amax(1, keepdim=True) - r.masked_fill(~valid, float("inf")).amin(1, keepdim=True)
    return torch.where(spread > 0, dev, 0.0).view(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     backend: str | None = None) -> torch.Tensor:
    """Advantages from rewards [B*G] laid out group by group (the G completions of a prompt adjacent).

    Returns fp32 [B*G]. scale: "group" | "batch" | "none"; eps is added to the std.

    >>> group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2, scale="none")
    tensor([0.5000, -0.5000, 0.0000, 0.0000])
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    r = rewards.float().contiguous()
    if resolve_backend(backend, r) == "torch":
        return _torch_group_advantages(r, group_size, scale, eps)
    out = torch.empty_like(r)
    batch_std = _batch_std(r) if scale == "batch" else r  # dummy pointer otherwise
    _group_advantages_kernel[(r.numel() // group_size,)](
        r, out, batch_std, group_size, eps,
        SCALE={"none": 0, "group": 1, "batch": 2}[scale], BLOCK_G=triton.next_power_of_2(group_size),
    )
    return out
