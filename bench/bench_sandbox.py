"""Executions per second of trivial programs: the code reward's worker pool vs one fresh interpreter per program.

    python bench/bench_sandbox.py [--rounds 3] [--pool-programs 600] [--fresh-programs 120]

It prints a markdown table (bench/SANDBOX.md quotes one, beside the other sandbox measurements).

Every program is `def f(x): return x + 1` with one assert, run on all usable cores at once (one thread per core, as
the pool's own). Three ways, taking turns round by round in this one process so that a loaded machine slows all alike:
- pool: fastgrpo.sandbox.Sandbox (pre-started bubblewrap'd workers, a forked child per program, limits, fresh
  directory, cleanup), what the code reward uses;
- fresh bwrap: one `bwrap ... python -I -S -c PROGRAM` per program, the same namespaces, no limits or cleanup;
- fresh python: one bare `python -I -S -c PROGRAM` per program, no isolation at all (the lower bound of that way).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment  # noqa: E402

from fastgrpo import sandbox  # noqa: E402
from fastgrpo.config import CodeConfig  # noqa: E402
from fastgrpo.sandbox import Program, Sandbox  # noqa: E402

CODE = "def f(x): return x + 1\n"
TEST = "assert f(1) == 2"


def per_second(run_all, n: int) -> float:
    start = time.perf_counter()
    run_all(n)
    return n / (time.perf_counter() - start)


def fresh(argv_prefix: list[str], cores: int):
    def run_all(n: int) -> None:
        def one(_):
            done = subprocess.run(argv_prefix + [sandbox._python(), "-I", "-S", "-c", CODE + TEST],
                                  capture_output=True, timeout=30, cwd="/tmp")
            assert done.returncode == 0, done.stderr
        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(one, range(n)))
    return run_all


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool-programs", type=int, default=600)
    parser.add_argument("--fresh-programs", type=int, default=120)
    args = parser.parse_args(argv)
    missing = sandbox._bwrap_missing()
    if missing:
        raise SystemExit(f"bench_sandbox: bubblewrap is not usable here ({missing})")
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    box = Sandbox(CodeConfig(isolation="bwrap"))
    start_s = time.perf_counter() - start
    ways = {"pool": (lambda n: _check(box.run([Program(CODE, [TEST])] * n)), args.pool_programs),
            "fresh bwrap": (fresh(sandbox._bwrap_argv(64 << 20), cores), args.fresh_programs),
            "fresh python": (fresh([], cores), args.fresh_programs)}
    rates = {way: [] for way in ways}
    try:
        for _ in range(args.rounds):
            for way, (run_all, n) in ways.items():
                rates[way].append(per_second(run_all, n))
    finally:
        box.close()
    load = (load_before, os.getloadavg()[0])
    report = render(rates, ways, args, cores, box.num_workers, start_s, load)
    print(report)


FAILED = []  # statuses of the pool's trivial programs that did not pass (a loaded machine can time them out)


def _check(results) -> None:
    FAILED.extend(r.status for r in results if r.passed != [True])


def render(rates, ways, args, cores, workers, start_s, load) -> str:
    env = environment()
    lines = [f"| way | programs per round | executions/s (median of {args.rounds}) | min - max | vs fresh bwrap |",
             "|---|---|---|---|---|"]
    base = statistics.median(rates["fresh bwrap"])
    for way, values in rates.items():
        median = statistics.median(values)
        lines.append(f"| {way} | {ways[way][1]} | {median:.0f} | {min(values):.0f} - {max(values):.0f} | "
                     f"{median / base:.1f}x |")
    machine = ", ".join(f"{k}: {v}" for k, v in env.items() if k in ("cpu", "cores", "python", "commit", "torch"))
    return "\n".join([
        f"`python bench/bench_sandbox.py --rounds {args.rounds} --pool-programs {args.pool_programs} "
        f"--fresh-programs {args.fresh_programs}`",
        "",
        f"Trivial programs (`{CODE.strip()}` and one assert), {cores} usable cores, {workers} pool workers "
        f"(started in {start_s:.2f} s), the three ways taking turns round by round in one process. Machine: {machine}; "
        f"1-minute load average {load[0]:.1f} before, {load[1]:.1f} after (other work shares these cores).",
        "",
        *lines,
        "",
        f"Pool programs that did not pass: {len(FAILED)} ({', '.join(sorted(set(FAILED))) or 'none'}).",
        "",
    ])


if __name__ == "__main__":
    main()
