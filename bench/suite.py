"""The whole benchmark suite in one run, one Markdown report: loss level, generation, packing, a GRPO step.

    python bench/suite.py [--size quick|default] [--out bench/REPORT.md]

quick fits in about ten minutes on the 2-core CPU machine; default is the size the issues' targets name
(N=2048 for the loss, a ~180M-parameter model with a 151,936-token vocabulary for generation and the step).
Each part is its own script (runnable alone) and each of its cases runs in a fresh process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
STEP_MODEL = {"quick": "tiny", "default": "qwen2-180m"}


def parts(size: str, tmp: Path):
    """(title, argv, the report file it writes, or None when it prints its table)."""
    return [
        ("Loss level", ["run.py", "--size", size, "--out", str(tmp / "loss.md")], tmp / "loss.md"),
        ("Generation", ["bench_generation.py", "--size", size, "--out", str(tmp / "generation.md")],
         tmp / "generation.md"),
        ("Packing", ["bench_packing.py"], None),
        ("GRPO step", ["bench_step.py", "--model", STEP_MODEL[size], "--kv-cache-gib", "0.0625",
                       "--out", str(tmp / "step.md")], tmp / "step.md"),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(STEP_MODEL), default="quick")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "REPORT.md")
    args = parser.parse_args()
    sections = [f"# fastgrpo benchmark suite (`python bench/suite.py --size {args.size}`, "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for title, argv, report in parts(args.size, Path(tmp)):
            print(f"== {title}: {' '.join(argv)}", flush=True)
            start = time.time()
            proc = subprocess.run([sys.executable, str(BENCH_DIR / argv[0]), *argv[1:]], cwd=BENCH_DIR.parent,
                                  capture_output=True, text=True)
            took = time.time() - start
            if proc.returncode != 0:
                body = f"failed (exit {proc.returncode}): {' | '.join(proc.stderr.strip().splitlines()[-3:])}"
            else:
                body = report.read_text() if report else proc.stdout
            # every part's own title becomes a subsection of the suite's report
            body = "\n".join("#" + line if line.startswith("#") else line for line in body.strip().splitlines())
            sections += [body, "", f"_({title}: {took:.0f} s)_", ""]
            print(f"   done in {took:.0f} s", flush=True)
    args.out.write_text("\n".join(sections) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
