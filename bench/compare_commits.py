"""Two commits of fastgrpo on the same fixed-seed GRPO runs: is the step as fast, and does it compute the same?

    python bench/compare_commits.py BEFORE [AFTER] --model PATH [--rounds 3] [--out bench/COMMITS.md] [-- key=value ...]

Each commit is checked out in a worktree of its own (AFTER defaults to the working tree). A round runs the same
`python -m fastgrpo.grpo configs/grpo_tiny.yaml` once per commit, alternating which goes first, so that what the
machine does meanwhile falls on both alike; the report gives each phase's median seconds per step (the trainer's own
timers, first step left out as warm-up) and the per-round ratios, and whether the two commits' metrics.jsonl agree
(timing keys aside: a refactor should compute bit for bit the same).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("time/generation", "time/training", "time/weight_sync")
UNTIMED = ("tokens_per_s", "peak_memory_mib", "wall_time")


def worktree(rev: str, parent: Path) -> Path:
    path = parent / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def run(tree: Path, run_dir: Path, model: str, overrides: list[str]) -> tuple[list[dict], float]:
    """(the run's metrics.jsonl rows, the CPU seconds its process used: less swayed by a busy machine than the
    wall-clock timers)."""
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'kernels' / 'src'}", "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "fastgrpo.grpo", "configs/grpo_tiny.yaml", f"model.path={model}",
                    f"log.run_dir={run_dir}", "log.tensorboard=false", *overrides], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], cpu_s


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time") and k not in UNTIMED} for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after", nargs="?", help="a commit; default: the working tree")
    p.add_argument("--model", required=True, help="a Hugging Face folder (e.g. a cold-start SFT checkpoint)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.overrides = argv[split + 1:]  # config overrides for both commits' runs
    with tempfile.TemporaryDirectory(prefix="fastgrpo-commits-") as tmp:
        tmp = Path(tmp)
        trees = {"before": worktree(args.before, tmp / "trees"), "after": ROOT}
        if args.after:
            trees["after"] = worktree(args.after, tmp / "trees")
        try:
            rows, cpu = {name: [] for name in trees}, {name: [] for name in trees}
            for r in range(args.rounds):
                for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                    metrics, cpu_s = run(trees[name], tmp / f"{name}-{r}", args.model, args.overrides)
                    rows[name].append(metrics)
                    cpu[name].append(cpu_s)
        finally:
            for name, tree in trees.items():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    report = render(args, rows, cpu)
    print(report)
    if args.out:
        args.out.write_text(report)


def render(args, rows: dict, cpu: dict) -> str:
    lines = [f"# {args.before} vs {args.after or 'working tree'}: fixed-seed GRPO runs", "",
             f"`python bench/compare_commits.py {args.before} {args.after or ''} --model MODEL --rounds {args.rounds}"
             f" -- {' '.join(args.overrides)}`", "",
             "| phase | before s/step | after s/step | after / before (per round) |", "|---|---|---|---|"]
    for phase in PHASES:
        med = {n: [statistics.median(r[phase] for r in run[1:]) for run in rows[n]] for n in rows}
        ratios = [a / b for a, b in zip(med["after"], med["before"]) if b > 0]
        lines.append(f"| {phase} | {statistics.median(med['before']):.3f} | {statistics.median(med['after']):.3f} | "
                     f"{statistics.median(ratios):.3f} ({', '.join(f'{x:.3f}' for x in ratios)}) |")
    ratios = [a / b for a, b in zip(cpu["after"], cpu["before"])]
    lines.append(f"| CPU seconds of the whole run | {statistics.median(cpu['before']):.1f} | "
                 f"{statistics.median(cpu['after']):.1f} | {statistics.median(ratios):.3f} "
                 f"({', '.join(f'{x:.3f}' for x in ratios)}) |")
    same = all(untimed(a) == untimed(b) for a, b in zip(rows["before"], rows["after"]))
    steady = all(untimed(run) == untimed(rows[n][0]) for n in rows for run in rows[n])
    lines += ["", f"metrics.jsonl (timing keys aside): {'identical' if same else 'DIFFERENT'} between the commits; "
                  f"{'identical' if steady else 'DIFFERENT'} across rounds of one commit."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
