"""Per-token advantages (process supervision) against per-sequence ones in the fused-linear GRPO loss, in one run.

    python bench/bench_token_advantages.py [--tokens 1024] [--rounds 4] [--out bench/TOKEN_ADVANTAGES.md]

The same fastgrpo_fused case of bench_loss (forward + backward, H=896, V=151,936, fp32 on CPU) with advantages [B]
and with the same values as token_advantages [B, T]; each case in a fresh process, the two alternating ABBA round by
round so drift falls on both alike. Reports each round's times and the per-round ratio.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from harness import environment, run_case

CASES = ("fastgrpo_fused", "fastgrpo_fused_token_adv")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    params = dict(B=8, T=args.tokens // 8, H=896, V=151_936)
    times = {c: [] for c in CASES}
    for r in range(args.rounds):
        for case in (CASES if r % 2 == 0 else CASES[::-1]):
            row = run_case("bench_loss", "build", dict(params, impl=case), repeats=args.repeats)
            if "total_s" not in row:
                raise SystemExit(f"{case}: {row}")
            times[case].append(row["total_s"])
    ratios = [t / s for s, t in zip(*(times[c] for c in CASES))]
    env = environment()
    lines = [f"# Per-token vs per-sequence advantages, fused-linear GRPO loss (N={args.tokens}, H=896, V=151,936)", "",
             f"`python bench/bench_token_advantages.py --tokens {args.tokens} --rounds {args.rounds}`; "
             f"{env.get('cpu', '')}, commit {env.get('commit', '')}.", "",
             "| round | advantages [B] s | token_advantages [B, T] s | per-token / per-sequence |", "|---|---|---|---|"]
    for r, (s, t, q) in enumerate(zip(*(times[c] for c in CASES), ratios)):
        lines.append(f"| {r} | {s:.3f} | {t:.3f} | {q:.3f} |")
    lines += ["", f"Median ratio {statistics.median(ratios):.3f} (forward + backward, median of {args.repeats} repeats "
                  f"per case and round)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
