"""Host memory of loading a checkpoint onto N ranks (FSDP2 under torchrun, gloo on CPU): peak RSS per rank.

    python bench/bench_load.py [--model qwen2-180m] [--ranks 2,4,8] [--out bench/LOAD.md]

Two ways, fp32 weights from a checkpoint saved in bf16 and from one saved in fp32:
- direct: every rank calls from_pretrained in the weights' dtype, then shards (what fastgrpo did before it cast
  after sharding; a bf16 checkpoint is converted into a full fp32 copy on every rank);
- load_sharded: every rank maps the checkpoint in its own dtype, shards, and casts its shards (fastgrpo's
  `models.load_model`, which the trainers load with).
Each (way, checkpoint, N) is one torchrun, run one after another in this invocation. The peak RSS includes the
imports of torch and transformers (the `imports` column), which any rank pays.

This file is also the worker: torchrun --nproc-per-node N bench/bench_load.py --worker WAY MODEL_DIR
"""

from __future__ import annotations

import argparse
import ast
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import _model_path  # noqa: E402

WAYS = ("direct", "load_sharded")


def worker(way: str, model_dir: str):
    from transformers import AutoModelForCausalLM

    from fastgrpo.config import ModelConfig
    from fastgrpo.distributed import all_gather_objects, end_worker, init_distributed, shard_model
    from fastgrpo.models import load_model

    device = init_distributed()
    imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if way == "direct":
        model = shard_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)).to(device)
    else:
        model = load_model(ModelConfig(path=model_dir), trainable=True, device=device)  # fp32 weights
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    peaks = all_gather_objects((imports, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    if int(os.environ["RANK"]) == 0:
        print("PEAKS", repr(peaks), flush=True)
    end_worker()


def measure(way: str, model_dir: Path, ranks: int) -> list[tuple[float, float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(ranks), __file__, "--worker", way, str(model_dir)],
                          env=env, capture_output=True, text=True, timeout=1200)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PEAKS ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{way} on {ranks} ranks failed:\n{proc.stderr[-3000:]}")
    return ast.literal_eval(line.removeprefix("PEAKS "))


def bf16_copy(model_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = model_dir.with_name(model_dir.name + "-bf16")
    if not (out / "config.json").exists():
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(out)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(*sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2-180m")
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    fp32 = _model_path(args.model)
    checkpoints = {"bf16": bf16_copy(fp32), "fp32": fp32}
    rows = ["| checkpoint | ranks | way | imports (MiB) | peak RSS per rank, max (MiB) | sum over ranks (MiB) |",
            "|---|--:|---|--:|--:|--:|"]
    for name, path in checkpoints.items():
        for ranks in map(int, args.ranks.split(",")):
            for way in WAYS:
                peaks = measure(way, path, ranks)
                row = (f"| {name} | {ranks} | {way} | {max(i for i, _ in peaks):,.0f} | "
                       f"{max(p for _, p in peaks):,.0f} | {sum(p for _, p in peaks):,.0f} |")
                rows.append(row)
                print(row, flush=True)
    report = (f"# Loading a checkpoint onto N ranks: host memory\n\n{args.model}, fp32 weights; "
              f"`python bench/bench_load.py --model {args.model} --ranks {args.ranks}`, one invocation.\n\n"
              + "\n".join(rows) + "\n")
    if args.out:
        Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
