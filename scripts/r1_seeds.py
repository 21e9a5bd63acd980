"""Run the R1 pipeline over several seeds and summarize what each stage changed, per seed and on average.

    python scripts/r1_seeds.py configs/r1_tiny.yaml --seeds 0 1 2 [--out runs/r1_tiny_seeds.md] [key=value ...]

Seed s runs in RUN_DIR-seed{s} (finished stages are skipped, so an interrupted sweep resumes). The summary gives
held-out pass@1 and helpfulness after each stage, and the margins the stages are meant to produce: stage 2 over
stage 1 (pass@1), stage 3 against stage 2 (pass@1 kept), stage 4 over stage 3 (helpfulness) and its pass@1 change.
"""

import argparse
import json
import statistics
from pathlib import Path

from fastgrpo.config import load_config
from fastgrpo.pipeline import PipelineConfig, run

STAGES = ["cold_start", "reasoning_rl", "sft", "helpfulness_rl"]
MARGINS = [  # (label, metric, stage after, stage before)
    ("stage 2 - stage 1, pass@1", "pass@1", "reasoning_rl", "cold_start"),
    ("stage 3 - stage 2, pass@1", "pass@1", "sft", "reasoning_rl"),
    ("stage 4 - stage 3, pass@1", "pass@1", "helpfulness_rl", "sft"),
    ("stage 4 - stage 3, helpfulness", "helpfulness", "helpfulness_rl", "sft"),
    ("stage 4 - stage 3, preferred answers", "preferred", "helpfulness_rl", "sft"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    base = load_config(PipelineConfig, args.config, args.overrides)
    results = {}
    for seed in args.seeds:
        run_dir = f"{base.run_dir}-seed{seed}"
        cfg = load_config(PipelineConfig, args.config,
                          [*args.overrides, f"seed={seed}", f"run_dir={run_dir}", f"base.path={run_dir}/base"])
        run(cfg)
        results[seed] = {s: json.loads((Path(run_dir) / "eval" / f"{s}.json").read_text()) for s in STAGES}

    lines = ["| seed | " + " | ".join(f"{s} pass@1 / helpfulness" for s in STAGES) + " |",
             "|---|" + "--:|" * len(STAGES)]
    for seed, ev in results.items():
        lines.append(f"| {seed} | " + " | ".join(f"{ev[s]['pass@1']:.3f} / {ev[s].get('helpfulness', float('nan')):.2f}"
                                                 for s in STAGES) + " |")
    lines += ["", "| margin | " + " | ".join(f"seed {s}" for s in results) + " | mean | min |",
              "|---|" + "--:|" * (len(results) + 2)]
    for label, metric, after, before in MARGINS:
        deltas = [ev[after][metric] - ev[before][metric] for ev in results.values() if metric in ev[after]]
        if deltas:
            lines.append(f"| {label} | " + " | ".join(f"{d:+.3f}" for d in deltas) +
                         f" | {statistics.mean(deltas):+.3f} | {min(deltas):+.3f} |")
    table = "\n".join(lines)
    out = args.out or Path(f"{base.run_dir}-seeds.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {args.config} over seeds {args.seeds}\n\n{table}\n")
    print(f"\n{table}\n\nwritten to {out}")


if __name__ == "__main__":
    main()
