"""Generation benchmark: vLLM in process (zero-copy shared weights vs its own packed weights + reload) against
transformers `generate`, on the tiny model and on a ~180M-parameter Qwen2 with a 151,936-token vocabulary.

    python bench/bench_generation.py [--size quick|default] [--out bench/GENERATION.md]

Each case runs in a fresh process (bench/harness.py). A step is one rollout (`fwd`: generate) followed by a
simulated optimizer step and the weight sync it needs (`bwd`): zero for shared weights, a bucketed in-place
reload otherwise. Rows also carry the process's resident memory once the generator is set up.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Step, environment, run_case  # noqa: E402

MODELS = {
    "tiny": dict(),  # 2 layers, hidden 128, the 105-token character vocabulary
    "qwen2-180m": dict(vocab_size=151936, hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536),
    # between the two, for where vLLM-CPU starts to beat transformers (--models qwen2-3m,...)
    "qwen2-3m": dict(hidden=256, layers=4, heads=4, kv_heads=1, intermediate=768),
    "qwen2-24m": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536),
    "qwen2-82m": dict(hidden=768, layers=12, heads=12, kv_heads=3, intermediate=2304),
    "qwen2-39m-152k-vocab": dict(vocab_size=151936, hidden=128, layers=2, heads=2, kv_heads=1, intermediate=384),
}
CACHE = Path(os.environ.get("FASTGRPO_BENCH_CACHE", "/tmp/fastgrpo-bench-models"))


def _model_path(name: str) -> Path:
    from fastgrpo.tiny import build_tiny_model

    path = CACHE / name
    if not (path / "config.json").exists():
        build_tiny_model(path, **MODELS[name])
    return path


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def build(backend: str, model: str, prompts: int, n: int, max_tokens: int, device: str = "cpu") -> Step:
    from transformers import AutoModelForCausalLM

    from fastgrpo.generation import HFGenerator, SamplingConfig, VLLMGenerator

    path = _model_path(model)
    trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model_mib = sum(p.numel() * p.element_size() for p in trainer.parameters()) / 2**20
    if backend == "hf":
        gen = HFGenerator(trainer, eos_token_id=2, pad_token_id=0)
    else:
        gen = VLLMGenerator(path, trainer, sync=backend.removeprefix("vllm_"), dtype="float32", max_model_len=512,
                            kv_cache_gib=1)
    g = torch.Generator().manual_seed(0)
    prompt_ids = [[1] + torch.randint(8, 100, (16,), generator=g).tolist() for _ in range(prompts)]
    sampling = SamplingConfig(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)
    generated, sync_s = [], []

    def forward():
        out = gen.generate(prompt_ids, sampling)
        generated.append(sum(len(c.token_ids) for cs in out for c in cs))
        return None

    def backward(_):
        with torch.no_grad():  # stands in for an optimizer step: every weight changes in place
            for p in trainer.parameters():
                p.mul_(1.0 + 1e-6)
        sync_s.append(gen.sync_weights())  # timed alone: the stand-in step above is not sync cost

    return Step(forward, backward, params=[], flops=0.0, min_bytes=1.0, tokens=prompts * n * max_tokens,
                info={"rss_after_setup_mib": _rss_mib(), "model_mib": model_mib, "generated": generated,
                      "sync_s": sync_s})


SIZES = {"quick": dict(prompts=4, n=4, max_tokens=32), "default": dict(prompts=8, n=8, max_tokens=64),
         "step": dict(prompts=2, n=8, max_tokens=64)}  # "step": bench_step.py's rollout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="default")
    parser.add_argument("--models", default="tiny,qwen2-180m", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--backends", default="vllm_zero_copy,vllm_reload,hf")
    parser.add_argument("--out", default=str(Path(__file__).with_name("GENERATION.md")))
    args = parser.parse_args()
    env = environment()
    shape = SIZES[args.size]
    lines = [
        "# Generation: vLLM in process vs transformers generate",
        "",
        f"Command: `{' '.join(['python bench/bench_generation.py', *sys.argv[1:]])}`  ",
        f"Machine: {env['cpu']}, {env['cores']} cores; commit {env['commit']}; versions {env['versions']}",
        "",
        f"{shape['prompts']} prompts x {shape['n']} samples x up to {shape['max_tokens']} new tokens, fp32, temperature 1. "
        "`gen s`: one rollout; `sync s`: the weight sync after an optimizer step (0 when vLLM shares the trainer's "
        "weights); `RSS`: the process's resident memory once trainer model and generator are set up.",
        "",
        "| model | backend | gen s | tokens/s | sync s | RSS MiB | model MiB |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for model in args.models.split(","):
        for backend in args.backends.split(","):
            row = run_case("bench_generation", "build", dict(backend=backend, model=model, **shape), warmup=1,
                           repeats=2, timeout_s=1800)
            if "error" in row or "skipped" in row:
                lines.append(f"| {model} | {backend} | {row.get('error') or row.get('skipped')} |")
                continue
            tokens = row["generated"][-1]  # EOS can end a completion early: count what was generated
            lines.append(f"| {model} | {backend} | {row['fwd_s']:.2f} | {tokens / row['fwd_s']:,.0f} | "
                         f"{max(row['sync_s']):.3f} | {row['rss_after_setup_mib']:,.0f} | {row['model_mib']:,.0f} |")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
