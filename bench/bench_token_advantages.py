"""Per-token advantages (process supervision) against per-sequence ones in the fused-linear GRPO loss, in one run.

    python bench/bench_token_advantages.py [--tokens 256] [--rounds 6] [--out bench/TOKEN_ADVANTAGES.md]

fused_linear_grpo_loss forward + backward (H=896, V=151,936, fp32, one thread, CPU), with advantages [B] and with
the same values as token_advantages [B, T], in one process, alternating ABBA round by round. Times are CPU seconds
(time.process_time): on a shared machine, wall-clock time also counts the waits for a core. Also checks that both
give the same loss and gradients.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fastgrpo_kernels.fused_linear import fused_linear_grpo_loss
from fastgrpo_kernels.grpo_loss import GRPOLossConfig


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    B, H, V = 4, 896, 151_936
    T = args.tokens // B
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask, old = torch.ones(B, T), torch.randn(B, T, generator=g) * 0.1 - 5
    advantages = torch.randn(B, generator=g)
    per_token = advantages[:, None].expand(B, T).contiguous()

    def step(token_level: bool):
        hidden.grad = weight.grad = None
        start = time.process_time()
        kwargs = {"token_advantages": per_token} if token_level else {}
        loss, _ = fused_linear_grpo_loss(hidden, weight, ids, None if token_level else advantages, mask, old, old,
                                         GRPOLossConfig(beta=0.04), **kwargs)
        loss.backward()
        return time.process_time() - start, loss.detach(), hidden.grad.clone(), weight.grad.clone()

    times = {False: [], True: []}
    for r in range(args.rounds):
        for token_level in ((False, True) if r % 2 == 0 else (True, False)):
            times[token_level].append(step(token_level)[0])
    same = all(torch.equal(a, b) for a, b in zip(step(False)[1:], step(True)[1:]))
    ratios = [t / s for s, t in zip(times[False], times[True])]
    lines = [f"# Per-token vs per-sequence advantages, fused-linear GRPO loss (N={B * T}, H={H}, V={V:,})", "",
             f"`python bench/bench_token_advantages.py --tokens {args.tokens} --rounds {args.rounds}`", "",
             "| round | advantages [B] CPU s | token_advantages [B, T] CPU s | ratio |", "|---|---|---|---|"]
    lines += [f"| {r} | {s:.3f} | {t:.3f} | {q:.3f} |" for r, (s, t, q) in enumerate(zip(times[False], times[True],
                                                                                         ratios))]
    lines += ["", f"Median ratio {statistics.median(ratios):.3f}; loss and gradients "
                  f"{'identical' if same else 'DIFFERENT'} (torch.equal)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
