"""Run the loss-level benchmark suite and write a Markdown report plus the raw rows.

    python bench/run.py [--size quick|default|large] [--out bench/REPORT.md]

quick:   N=512 tokens, H=896 (Qwen2.5-0.5B head), V=151,936: a few minutes on the 2-core CPU machine.
default: N=2048, H=896: the anchor in /work/shared/FACTS.md (~10 s per step for the GEMM floor alone on CPU).
large:   N=8192 at H=896, and N=16,384 at H=3584 (Qwen2.5-7B head): for a GPU; on the CPU machine this takes hours
         and the full-logits cases need more memory than it has.
--tokens / --hidden replace the size's shapes with one shape. Every implementation of a shape runs in its own
fresh process, one after another, in the same run. Raw rows go to bench/results/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import bench_loss
from harness import BENCH_DIR, environment, run_case

V = 151_936
SIZES = {  # (B, T, H); N = B * T
    "quick": [(4, 128, 896)],
    "default": [(8, 256, 896)],
    "large": [(16, 512, 896), (32, 512, 3584)],
}
FASTGRPO = ("fastgrpo_logits", "fastgrpo_fused")
TIME_TOLERANCE = 0.05  # the CPU machine is shared: smaller gaps are noise
MEMORY_TOLERANCE = 0.05
MEMORY_SLACK_MIB = 16  # RSS moves by a few MiB for reasons unrelated to the case


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="default")
    p.add_argument("--tokens", type=int, help="one shape with this many tokens N (B=8 sequences of N/8)")
    p.add_argument("--hidden", type=int, help="hidden size H for --tokens (default 896)")
    p.add_argument("--impls", default=",".join(bench_loss.IMPLS), help="comma-separated subset of implementations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case before it is recorded as failed")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "LOSS.md")
    args = p.parse_args()
    unknown = set(args.impls.split(",")) - set(bench_loss.IMPLS)
    if unknown:
        p.error(f"unknown --impls {sorted(unknown)}; choose from {list(bench_loss.IMPLS)}")
    if args.tokens is not None and args.tokens % 8:
        p.error("--tokens must be a multiple of 8 (B=8 sequences)")
    return args


def shapes(args):
    if args.tokens is not None:
        return [(8, args.tokens // 8, args.hidden or 896)]
    return SIZES[args.size]


def run_shape(B, T, H, args, env) -> list[dict]:
    """Every requested implementation at one shape, the GEMM floor first; rows in IMPLS order."""
    N = B * T
    params = dict(B=B, T=T, H=H, V=V, device=args.device)
    case = f"N{N}_H{H}"
    rows = []
    for impl in [i for i in bench_loss.IMPLS if i in args.impls.split(",")]:
        start = time.perf_counter()
        result = run_case("bench_loss", "build", dict(params, impl=impl), warmup=args.warmup, repeats=args.repeats,
                          timeout_s=args.timeout)
        row = {"case": case, "impl": impl, "kind": bench_loss.IMPLS[impl], "N": N, **params,
               "dtype": str(bench_loss.dtype_for(args.device)).removeprefix("torch."), **result, **env}
        rows.append(row)
        print(f"{case} {impl:18s} {_status(row)}  ({time.perf_counter() - start:.0f} s wall)", flush=True)
    floor = next((r["total_s"] for r in rows if r["impl"] == "gemm_floor" and "total_s" in r), None)
    for r in rows:
        r["ratio_to_floor"] = r["total_s"] / floor if floor and "total_s" in r else None
    return rows


def _status(row) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "error" in row:
        return f"FAILED: {row['error']}"
    return f"total {row['total_s']:.3f} s, peak +{row['peak_extra_mib']:.0f} MiB"


# ----------------------------------------------------------------------------------------------------------
# The report.


def behind_lines(rows) -> list[str]:
    """Plain-language verdict: where each fastgrpo implementation is behind a reference. Time is compared with
    every reference (same math, any of them could be used); memory only with references of the same kind,
    since the full-logits methods must hold the [N, V] logits and the fused ones need not."""
    measured = {r["impl"]: r for r in rows if "total_s" in r}
    lines = []
    for impl in FASTGRPO:
        row = next((r for r in rows if r["impl"] == impl), None)
        if row is None:
            continue
        if impl not in measured:
            lines.append(f"**{impl}** was not measured: {row.get('skipped') or row.get('error')}.")
            continue
        gaps = []
        for ref in bench_loss.REFERENCES:
            other = measured.get(ref)
            if other is None:
                continue
            if other["total_s"] < row["total_s"] / (1 + TIME_TOLERANCE):
                gaps.append(f"{ref} on time ({other['total_s']:.3f} s vs {row['total_s']:.3f} s)")
            if (other["kind"] == row["kind"]
                    and other["peak_extra_mib"] < row["peak_extra_mib"] * (1 - MEMORY_TOLERANCE) - MEMORY_SLACK_MIB):
                gaps.append(f"{ref} on memory ({other['peak_extra_mib']:.0f} MiB vs {row['peak_extra_mib']:.0f} MiB)")
        if gaps:
            lines.append(f"**{impl} is behind** " + "; ".join(gaps) + ".")
        else:
            lines.append(f"**{impl}** is behind no reference here (time within {TIME_TOLERANCE:.0%}; memory against "
                         f"the other {row['kind']} methods).")
    return lines


def _num(x, fmt):
    return "—" if x is None else format(x, fmt)


def shape_table(rows) -> list[str]:
    r0 = rows[0]
    out = [f"## N = {r0['N']:,} tokens (B={r0['B']} x T={r0['T']}), H = {r0['H']:,}, V = {r0['V']:,}, "
           f"{r0['dtype']} on {r0['device']}", "",
           "| impl | kind | fwd s | bwd s | total s | best s | spread | x floor | peak extra MiB | tokens/s | TFLOP/s "
           "| GB/s | loss |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if "total_s" not in r:
            out.append(f"| {r['impl']} | {r['kind']} | " + " | " * 10 + f"{_status(r)} |")
            continue
        spread = (max(r["total_s_all"]) - min(r["total_s_all"])) / r["total_s"]
        peak = "n/a" if r["kind"] == "floor" else f"{r['peak_extra_mib']:,.0f}"
        out.append(f"| {r['impl']} | {r['kind']} | {r['fwd_s']:.3f} | {r['bwd_s']:.3f} | {r['total_s']:.3f} | "
                   f"{min(r['total_s_all']):.3f} | {spread:.0%} | {_num(r['ratio_to_floor'], '.2f')} | {peak} | "
                   f"{r['tokens_per_s']:,.0f} | {r['tflops']:.3f} | {r['gbps']:.2f} | {_num(r['loss'], '.6f')} |")
    return out + [""] + behind_lines(rows) + [""]


def report(all_rows, env, command) -> str:
    v = env["versions"]
    lines = [
        "# Loss-level benchmark: a GRPO loss over an LM head, forward + backward", "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  ",
        f"Machine: {env['cpu']}, {env['cores']} cores ({env['torch_threads']} torch threads)"
        + (f", GPU {env['gpu']}" if env["gpu"] else ", no GPU") + "  ",
        "Versions: " + ", ".join(f"{k} {v[k]}" for k in v) + "  ",
        f"Commit: {env['commit']}", "",
        "Loss: token-level GRPO, loss_type=\"grpo\", beta=0.04, eps=0.2, with old and reference log-probs; every "
        "case uses the same seeded inputs, so the `loss` column must agree. Each case runs in a fresh process; "
        "`total` is the median of the timed steps after warmup, `best` the fastest, `spread` their "
        "(max - min) / median. `x floor` is total time over the GEMM floor's (the three matmuls h W^T, g W, g^T h "
        "that every exact method needs). `peak extra` is the most memory one step needed above what was resident "
        "before it (CPU: RSS high-water mark; CUDA: max_memory_allocated); it includes dW (V x H). TFLOP/s counts "
        "the 3 matmuls (6 N H V); GB/s counts the traffic no exact method avoids (read h and W twice, write dh and "
        "dW). The fwd/bwd split is where each library does its work: chunked methods may compute the gradients "
        "in their forward.", "",
    ]
    if env["gpu"] is None:
        lines += ["On the shared 2-core CPU machine other jobs run alongside: time differences of a few percent "
                  "are noise.", ""]
    for case in dict.fromkeys(r["case"] for r in all_rows):
        lines += shape_table([r for r in all_rows if r["case"] == case])
    return "\n".join(lines)


def main():
    args = parse_args()
    env = environment()
    command = "python bench/run.py " + shlex.join(sys.argv[1:])
    rows = []
    for B, T, H in shapes(args):
        rows += run_shape(B, T, H, args, env)
    results = BENCH_DIR / "results"
    results.mkdir(exist_ok=True)
    raw = results / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    raw.write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    args.out.write_text(report(rows, env, command))
    print(f"wrote {args.out} and {raw}")


if __name__ == "__main__":
    main()
