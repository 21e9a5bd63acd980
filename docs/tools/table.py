"""The results table of docs/tools/run.sh: held-out pass@1 and the share of episodes that call the calculator, for
the cold start and for GRPO with the tool and without it (one row per RL seed, then their mean).

    python docs/tools/table.py [OUT]      # OUT as given to run.sh (default runs/tools)
"""

import json
import sys
from pathlib import Path


def row(name: str, results: list[dict]) -> str:
    """A table row of the mean of `results`; "-" for the tool columns of runs without the tool (none reported)."""
    def mean(key: str, digits: int) -> str:
        if key not in results[0]:
            return "-"
        return f"{sum(r[key] for r in results) / len(results):.{digits}f}"

    return f"| {name} | {mean('pass@1', 3)} | {mean('tool_call_share', 3)} | {mean('turns', 2)} |"


def main(out: Path) -> None:
    print("| condition | held-out pass@1 | episodes calling the tool | turns |")
    print("|---|---|---|---|")
    for condition in ("tools", "direct"):
        print(row(f"cold start, {condition}", [json.loads((out / f"cold-{condition}.json").read_text())]))
        seeds = sorted(out.glob(f"{condition}-[0-9]*/eval.json"))
        results = [json.loads(p.read_text()) for p in seeds]
        for path, r in zip(seeds, results):
            print(row(f"GRPO {condition}, RL seed {path.parent.name.rsplit('-', 1)[1]}", [r]))
        if results:
            print(row(f"GRPO {condition}, mean of {len(results)} seeds", results))
    print("\n| run | training reward, first 5 steps | last 5 steps | calling the tool, first 5 steps | last 5 steps |")
    print("|---|---|---|---|---|")
    for path in sorted(out.glob("*-[0-9]*/metrics.jsonl")):
        print(training_row(path.parent.name, [json.loads(line) for line in path.read_text().splitlines()]))


def training_row(name: str, history: list[dict]) -> str:
    """The GRPO run's mean reward and tool-call share over its first and its last 5 steps (training samples)."""
    def mean(key: str, steps: list[dict]) -> str:
        return "-" if key not in steps[0] else f"{sum(h[key] for h in steps) / len(steps):.3f}"

    first, last = history[:5], history[-5:]
    return (f"| {name} | {mean('reward/mean', first)} | {mean('reward/mean', last)} | "
            f"{mean('tools/call_share', first)} | {mean('tools/call_share', last)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tools"))
