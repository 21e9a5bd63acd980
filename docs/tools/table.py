"""The results table of docs/tools/run.sh: held-out pass@1 and the share of episodes that call the calculator, for
the cold start and for GRPO with the tool and without it (one row per RL seed, then their mean).

    python docs/tools/table.py [OUT]      # OUT as given to run.sh (default runs/tools)
"""

import json
import sys
from pathlib import Path


def row(name: str, results: list[dict]) -> str:
    mean = lambda key: sum(r.get(key, 0.0) for r in results) / len(results)  # noqa: E731
    return f"| {name} | {mean('pass@1'):.3f} | {mean('tool_call_share'):.2f} | {mean('turns'):.2f} |"


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


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tools"))
