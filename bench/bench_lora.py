"""LoRA: fastgrpo's merge into vLLM's packed copies of the shared base vs vLLM's own LoRA support; and a whole GRPO
step with LoRA vs full fine-tuning.

    python bench/bench_lora.py [--model qwen2-24m] [--size step] [--rounds 4] [--tables generation,step]
                               [--out bench/LORA.md]

The cases of a table run in their own processes at once, taking turns (harness.run_interleaved): round k of every
case runs in one turn each, so what else the machine does slows them alike; the first round warms up, the tables
give medians of the others.

Generation table. A round is one rollout (`gen s`) and the sync after an optimizer step on the adapters (`sync s`):
- merge (fastgrpo's default, vllm_bridge.AdapterRows): vLLM shares the trainer's base (zero-copy); the rollout is
  wake / generate / sleep (sleep frees the packed copies while the trainer runs); the sync repacks every layer, the
  targeted ones from base + B·A.
- vllm_lora: vLLM(enable_lora=True) keeps a base of its own (loaded from the checkpoint) and samples through its
  LoRA layers with a LoRARequest; the sync writes the adapter (peft's save_pretrained, to /dev/shm) under a new
  request id, which vLLM loads at the next rollout (inside `gen s`).
Step table: one whole fastgrpo.grpo.grpo_step (vLLM zero-copy, beta 0.04), full fine-tuning against LoRA.
`setup RSS`: the process's resident memory once models and generator are set up; `peak RSS`: its high-water mark
through the last round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import MODELS, SIZES, _model_path, _rss_mib  # noqa: E402
from harness import TURNS, Step, _status_mib, environment, run_interleaved  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@torch.no_grad()
def _adapter_step(model, g: torch.Generator) -> None:
    """Stands in for an optimizer step on the adapters: every adapter weight changes."""
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)


def _rounds(rounds: int, one_round, info: dict) -> Step:
    """A Step whose one forward runs every round, each starting with its turn; `one_round()` returns its timings."""
    def forward():
        for _ in range(rounds):
            TURNS.step()
            for key, value in one_round().items():
                info.setdefault(key, []).append(value)
        info["peak_rss_mib"] = _status_mib("VmHWM")

    return Step(forward, lambda _: None, params=[], flops=0.0, min_bytes=1.0, tokens=1, info=info)


def build(method: str, model: str, prompts: int, n: int, max_tokens: int, r: int, rounds: int) -> Step:
    from fastgrpo.config import LoraConfig, ModelConfig
    from fastgrpo.generation import SamplingConfig
    from fastgrpo.models import load_model

    path = _model_path(model)
    trainer = load_model(ModelConfig(path=str(path), lora=LoraConfig(r=r, alpha=2.0 * r, target_modules=TARGETS)),
                         trainable=True, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    prompt_ids = [[1] + torch.randint(8, 100, (16,), generator=g).tolist() for _ in range(prompts)]
    sampling = SamplingConfig(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)
    _adapter_step(trainer, g)  # B != 0: the adapters change what is sampled
    one_round = (_merge if method == "merge" else _vllm_lora)(path, trainer, prompt_ids, sampling, r, g)
    return _rounds(rounds, one_round, {"setup_rss_mib": _rss_mib()})


def _merge(path, trainer, prompt_ids, sampling, r, g):
    from fastgrpo.generation import VLLMGenerator

    gen = VLLMGenerator(path, trainer, sync="zero_copy", dtype="float32", max_model_len=512, kv_cache_gib=0.25)

    def one_round():
        t0 = time.perf_counter()
        gen.wake()
        out = gen.generate(prompt_ids, sampling)
        gen.sleep()
        t1 = time.perf_counter()
        _adapter_step(trainer, g)
        return {"gen_s": t1 - t0, "sync_s": gen.sync_weights(),
                "tokens": sum(len(c.token_ids) for cs in out for c in cs)}

    return one_round


def _vllm_lora(path, trainer, prompt_ids, sampling, r, g):
    # in process, with all threads, as vllm_bridge.create_llm sets it up (which takes no LoRA arguments)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(path), dtype="float32", max_model_len=512, enforce_eager=True, enable_lora=True,
              max_lora_rank=r, max_loras=1, kv_cache_memory_bytes=2**28, enable_chunked_prefill=False,
              logprobs_mode="processed_logprobs", seed=0)
    root = Path(tempfile.mkdtemp(dir="/dev/shm"))
    params = [SamplingParams(n=sampling.n, temperature=1.0, max_tokens=sampling.max_tokens, logprobs=0,
                             detokenize=False, seed=i * sampling.n) for i in range(len(prompt_ids))]
    state = {"id": 1}
    trainer.save_pretrained(root / "1")

    def one_round():
        t0 = time.perf_counter()
        request = LoRARequest(f"step-{state['id']}", state["id"], str(root / str(state["id"])))
        out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, lora_request=request,
                           use_tqdm=False)
        t1 = time.perf_counter()
        _adapter_step(trainer, g)
        state["id"] += 1
        trainer.save_pretrained(root / str(state["id"]))
        return {"gen_s": t1 - t0, "sync_s": time.perf_counter() - t1,
                "tokens": sum(len(c.token_ids) for o in out for c in o.outputs)}

    return one_round


def even_tokens(prompts, completions, completion_ids, **kwargs):
    """A reward with spread across a group: the share of even token ids."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def build_step(method: str, model: str, prompts: int, n: int, max_tokens: int, r: int, rounds: int) -> Step:
    """Whole fastgrpo GRPO steps (vLLM zero-copy, beta 0.04), full fine-tuning or LoRA (method "full" / "lora")."""
    from fastgrpo import grpo
    from fastgrpo.config import GRPOConfig, load_config

    lora = [f"model.lora.r={r}", f"model.lora.alpha={2 * r}"] if method == "lora" else []
    cfg = load_config(GRPOConfig, None, [
        f"model.path={_model_path(model)}", f"log.run_dir={tempfile.mkdtemp()}", "log.tensorboard=false",
        "log.save_every=1000000", "data.max_prompt_length=64", f"train.prompts_per_step={prompts}",
        f"generation.num_generations={n}", f"generation.max_completion_length={max_tokens}",
        "generation.ignore_eos=true", "loss.beta=0.04", "loss.loss_type=grpo", "train.lr=1e-6", "train.steps=1000",
        *lora])
    run, _ = grpo.start_run(cfg, reward_funcs=[even_tokens])
    state = {"step": 0}

    def one_round():
        t0 = time.perf_counter()
        grpo.grpo_step(run, state["step"])
        state["step"] += 1
        return {"step_s": time.perf_counter() - t0, "tokens": prompts * n * max_tokens}

    info = {"setup_rss_mib": _rss_mib(), "trainable": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
            "reference_model": run.ref_model is not None}
    return _rounds(rounds, one_round, info)


def _median(row: dict, key: str) -> float:
    return statistics.median(row[key][1:])  # the first round warms up


def generation_table(params: dict) -> list[str]:
    lines = ["| method | gen s | tokens/s | sync s | round s | setup RSS MiB | peak RSS MiB |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    methods = ("merge", "vllm_lora")
    for method, row in zip(methods, run_interleaved("bench_lora", "build", [dict(method=m, **params) for m in methods],
                                                    timeout_s=3600)):
        if "error" in row or "skipped" in row:
            lines.append(f"| {method} | {row.get('error') or row.get('skipped')} |")
            continue
        gen, sync = _median(row, "gen_s"), _median(row, "sync_s")
        lines.append(f"| {method} | {gen:.2f} | {row['tokens'][-1] / gen:,.0f} | {sync:.3f} | {gen + sync:.2f} | "
                     f"{row['setup_rss_mib']:,.0f} | {row['peak_rss_mib']:,.0f} |")
        print(lines[-1], flush=True)
    return lines


def step_table(params: dict) -> list[str]:
    lines = ["| method | s/step | completion tokens/s | setup RSS MiB | peak RSS MiB | trainable params | reference |",
             "|---|--:|--:|--:|--:|--:|---|"]
    methods = ("full", "lora")
    for method, row in zip(methods, run_interleaved("bench_lora", "build_step",
                                                    [dict(method=m, **params) for m in methods], timeout_s=3600)):
        if "error" in row or "skipped" in row:
            lines.append(f"| {method} | {row.get('error') or row.get('skipped')} |")
            continue
        step = _median(row, "step_s")
        lines.append(f"| {method} | {step:.2f} | {row['tokens'][-1] / step:,.0f} | {row['setup_rss_mib']:,.0f} | "
                     f"{row['peak_rss_mib']:,.0f} | {row['trainable']:,} | "
                     f"{'a loaded model' if row['reference_model'] else 'the disabled adapters'} |")
        print(lines[-1], flush=True)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="step")
    parser.add_argument("--model", default="qwen2-24m", choices=MODELS)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="the first warms up")
    parser.add_argument("--tables", default="generation,step")
    parser.add_argument("--out", default=str(Path(__file__).with_name("LORA.md")))
    args = parser.parse_args()
    env, shape = environment(), SIZES[args.size]
    params = dict(model=args.model, r=args.r, rounds=args.rounds, **shape)
    lines = [
        "# LoRA: generation with the adapters, and a whole step against full fine-tuning",
        "",
        f"Command: `{' '.join(['python bench/bench_lora.py', *sys.argv[1:]])}`  ",
        f"Machine: {env['cpu']}, {env['cores']} cores; commit {env['commit']}; versions {env['versions']}",
        "",
        f"{args.model}, LoRA r={args.r}, alpha={2 * args.r} on {', '.join(TARGETS)}; {shape['prompts']} prompts x "
        f"{shape['n']} samples x {shape['max_tokens']} new tokens, fp32, temperature 1; cases interleaved, median of "
        f"{args.rounds - 1} rounds after a warm-up one (bench/bench_lora.py's docstring says what each column times).",
    ]
    if "generation" in args.tables:
        lines += ["", "Generation with the current adapters:", "", *generation_table(params)]
    if "step" in args.tables:
        lines += ["", "One whole GRPO step (vLLM zero-copy, beta 0.04, loss grpo, AdamW):", "", *step_table(params)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
