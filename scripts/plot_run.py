"""Plot a run's curves from RUN_DIR/metrics.jsonl to one PNG, one subplot per metric.

    python scripts/plot_run.py runs/r1-zero --keys reward/mean,accuracy,kl --out curves.png
"""

import argparse
from pathlib import Path

from fastgrpo.metrics import plot_metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/curves.png)")
    parser.add_argument("--keys", help="comma-separated metric names (default: all of them)")
    args = parser.parse_args()
    keys = args.keys.split(",") if args.keys else None
    print(plot_metrics(args.run_dir, keys, args.out))


if __name__ == "__main__":
    main()
