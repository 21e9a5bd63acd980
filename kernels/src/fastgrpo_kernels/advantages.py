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
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
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


def process_advantages(step_rewards: torch.Tensor, step_ends: torch.Tensor, steps_per_completion: torch.Tensor,
                       completion_lengths: torch.Tensor, group_size: int, scale: str = "group",
                       eps: float = 1e-4) -> torch.Tensor:
    """Process-supervised advantages (DeepSeekMath 4.1.3): per-token, packed completion by completion.

    step_rewards [M] fp (NaN: not scored), step_ends [M] long (the index, within its completion, of the step's last
    token), steps_per_completion [S] long (the M steps are completion 0's, then completion 1's, ...; a completion may
    have none), completion_lengths [S] long; S = B*G, group by group. Each group's valid step rewards are normalized
    together, (r - mean) / scale with `scale` as in group_advantages ("group": their std, "batch": the std of every
    valid step reward, "none"), zero where a group's valid rewards are all equal or NaN; then a token's advantage is
    the sum of the normalized rewards of its completion's steps that end at or after it. Returns fp32
    [sum(completion_lengths)]: completion 0's tokens, then completion 1's, ... (the packed layout's order).

    Outcome supervision is the case of one step per completion ending at its last token.

    >>> process_advantages(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0, 2, 1]), torch.tensor([2, 1]),
    ...                    torch.tensor([3, 2]), group_size=2, scale="none")
    tensor([ 0.3333, -0.3333, -0.3333, -0.3333, -0.3333])
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    S = completion_lengths.numel()
    if group_size < 1 or S % group_size or steps_per_completion.numel() != S:
        raise ValueError(f"{S} completions and {steps_per_completion.numel()} step counts for groups of {group_size}")
    if step_rewards.shape != step_ends.shape or int(steps_per_completion.sum()) != step_rewards.numel():
        raise ValueError(f"{step_rewards.numel()} step rewards and {step_ends.numel()} step ends for "
                         f"{int(steps_per_completion.sum())} steps")
    device = step_rewards.device
    completion_of = torch.repeat_interleave(torch.arange(S, device=device), steps_per_completion.to(device))  # [M]
    lengths = completion_lengths.to(device)
    ends = step_ends.to(device)
    if ((ends < 0) | (ends >= lengths[completion_of])).any():
        raise ValueError("a step ends outside its completion (step_ends must lie in [0, completion length))")
    normalized = _normalize_by_group(step_rewards.float(), completion_of // group_size, S // group_size, scale, eps)
    starts = torch.cumsum(lengths, 0) - lengths  # [S]
    at_end = torch.zeros(int(lengths.sum()), dtype=torch.float64, device=device)
    at_end.index_add_(0, starts[completion_of] + ends, normalized.double())
    # sum over the steps ending at or after each token: a reverse cumulative sum within each completion
    suffix = at_end.flip(0).cumsum(0).flip(0)  # [N]: sum from each token to the end of the last completion
    after = torch.cat([suffix, suffix.new_zeros(1)])[starts + lengths]  # [S]: what belongs to later completions
    return (suffix - torch.repeat_interleave(after, lengths)).float()


def _normalize_by_group(r: torch.Tensor, group: torch.Tensor, num_groups: int, scale: str, eps: float):
    """r [M] -> (r - its group's mean) / scale over the valid entries of each group; 0 for NaN and constant groups."""
    valid = ~torch.isnan(r)
    zero = torch.zeros(num_groups, device=r.device)
    n = zero.index_add(0, group, valid.float())
    mean = zero.index_add(0, group, torch.where(valid, r, 0.0)) / n.clamp(min=1)
    dev = torch.where(valid, r - mean[group], 0.0)
    if scale == "group":
        std = (zero.index_add(0, group, dev.square()) / (n - 1).clamp(min=1)).sqrt()
        dev = dev / (std[group] + eps)
    elif scale == "batch":
        dev = dev / (_batch_std(r) + eps)
    high = torch.full((num_groups,), float("-inf"), device=r.device).scatter_reduce(
        0, group, r.masked_fill(~valid, float("-inf")), "amax")
    low = torch.full((num_groups,), float("inf"), device=r.device).scatter_reduce(
        0, group, r.masked_fill(~valid, float("inf")), "amin")
    return torch.where((high - low)[group] > 0, dev, 0.0)
