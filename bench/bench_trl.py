"""TRL 1.16's GRPOTrainer as shipped against the same trainer with fastgrpo_kernels' LM head and loss
(fastgrpo_kernels.integrations.trl.FastGRPOTrainer): the training part of a step, where the two differ.

    python bench/bench_trl.py [--model qwen2-180m] [--prompts 2] [--G 8] [--length 512] [--steps 5]
                              [--device cpu|cuda] [--out bench/TRL.md]

Generation is TRL's own on both sides (the same code, the same weights), so it is left out: each case builds its
trainer on the local model (bench_generation.MODELS; the README's qwen2-180m: 151,936-token vocabulary), then one
prepared batch as `_generate_and_score_completions` leaves it: P x G sequences of a 32-token prompt and a
completion of up to L tokens (lengths uniform in [L/2, L]), advantages ~ N(0, 1), reference log-probs from the
reference model. loss_type "grpo", beta 0.04 (plain k3: use_bias_correction_kl off), epsilon 0.2, temperature 1,
one micro-batch of all P x G sequences. fp32 on CPU; on CUDA bf16 autocast over fp32 weights (bf16=True).

Per case and step: `ref` the reference log-prob pass (no grad, as TRL runs it after generation), `loss` the policy's
compute_loss forward + backward; peak memory above what was resident before the step (harness._PeakMemory: CUDA's
max_memory_allocated, the CPU's RSS high-water mark). Every case runs in its own process, all at once taking
turns step by step (harness.run_interleaved), so each round gives a paired ratio against TRL.

The issue also asks for TRL + Liger's fused-linear GRPO loss: TRL 1.16 no longer takes it (its use_liger_kernel
applies Liger's layer kernels only and refuses fused_linear_cross_entropy, since it patches the model with its own
fused head), so that case reports why it cannot run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import MODELS, _model_path  # noqa: E402
from harness import BENCH_DIR, TURNS, Skip, Step, _PeakMemory, environment, run_interleaved  # noqa: E402

CASES = ("trl", "trl_fastgrpo", "trl_liger")
PROMPT_TOKENS, BETA, EPSILON = 32, 0.04, 0.2


def zero_reward(completions, **_):
    return [0.0] * len(completions)


def make_trainer(impl: str, path: Path, rows: int, length: int, device: str):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from fastgrpo_kernels.integrations.trl import FastGRPOTrainer

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), use_cpu=device == "cpu", bf16=device == "cuda",
        report_to="none", save_strategy="no", disable_tqdm=True, seed=0, per_device_train_batch_size=rows,
        num_generations=rows, max_completion_length=length, use_vllm=False, model_init_kwargs={"dtype": "float32"},
        loss_type="grpo", beta=BETA, epsilon=EPSILON, use_bias_correction_kl=False,
    )
    trainer_class = FastGRPOTrainer if impl == "trl_fastgrpo" else GRPOTrainer
    trainer = trainer_class(model=str(path), reward_funcs=zero_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": ["x"] * rows}))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets
    return trainer


def make_batch(trainer, rows: int, length: int, device: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    V = trainer.model.config.vocab_size
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=gen)
    completion_mask = (torch.arange(length) < lengths[:, None]).long()  # (rows, L)
    batch = {
        "prompt_ids": torch.randint(V, (rows, PROMPT_TOKENS), generator=gen),
        "prompt_mask": torch.ones(rows, PROMPT_TOKENS, dtype=torch.long),
        "completion_ids": torch.randint(V, (rows, length), generator=gen) * completion_mask,
        "completion_mask": completion_mask, "advantages": torch.randn(rows, generator=gen),
        "num_items_in_batch": completion_mask.sum(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def ref_pass(trainer, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, attention,
                                                                batch["completion_ids"].size(1))
    return logp


def build(impl: str, model: str, prompts: int, G: int, length: int, steps: int, device: str = "cpu") -> Step:
    """A Step whose forward is the whole run (1 warm-up + steps steps, each taking its turn); timings in info."""
    if impl == "trl_liger":
        raise Skip("TRL 1.16 has no Liger fused-linear GRPO loss: use_liger_kernel applies layer kernels only and "
                   "refuses fused_linear_cross_entropy (grpo_trainer.py)")
    rows = prompts * G
    trainer = make_trainer(impl, _model_path(model), rows, length, device)
    batch = make_batch(trainer, rows, length, device)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    memory, info = _PeakMemory(torch.device(device)), {"ref_s": [], "loss_s": [], "peak_mib": [], "loss": []}

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    def loss_step(inputs):
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        return loss.detach()

    def run():
        for _ in range(1 + steps):
            TURNS.step()
            memory.start()
            ref_logp, ref_s = timed(lambda: ref_pass(trainer, batch))
            loss, loss_s = timed(lambda: loss_step(batch | {"ref_per_token_logps": ref_logp}))
            info["peak_mib"].append(memory.stop_mib())
            for p in params:
                p.grad = None
            info["ref_s"].append(ref_s)
            info["loss_s"].append(loss_s)
            info["loss"].append(float(loss))
        info["tokens"] = int(batch["completion_mask"].sum())
        return None

    return Step(run, lambda _: None, params=[], flops=0.0, min_bytes=1.0, tokens=1, info=info)


def summarize(row: dict) -> dict:
    timed = slice(1, None)  # the first step warms up
    return {name: statistics.median(row[name][timed]) for name in ("ref_s", "loss_s")} | {
        "peak_mib": max(row["peak_mib"][timed]), "tokens": row["tokens"], "loss": row["loss"][-1]}


def report(rows: dict, command: str, env: dict, shape: dict) -> list[str]:
    lines = [
        "# TRL GRPOTrainer: as shipped vs with fastgrpo_kernels (training part of a step)", "",
        f"Command: `{command}`  ",
        f"Machine: {env['cpu']}, {env['cores']} cores, GPU {env['gpu']}; commit {env['commit']}; "
        f"versions {env['versions']}", "",
        f"Model {shape['model']}; {shape['prompts']} x G={shape['G']} sequences, completions of up to "
        f"{shape['length']} tokens; medians over {shape['steps']} steps after one warm-up, cases taking turns.", "",
        "| case | ref pass s | loss fwd+bwd s | completion tok/s (loss) | peak extra MiB | loss | "
        "loss s vs TRL | peak vs TRL |", "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    base = summarize(rows["trl"]) if "ref_s" in rows.get("trl", {}) else None
    for case, row in rows.items():
        if "ref_s" not in row:
            lines.append(f"| {case} | {row.get('skipped') or row.get('error')} |")
            continue
        s = summarize(row)
        vs = (f"{s['loss_s'] / base['loss_s']:.2f}x | {s['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}x"
              if base else "- | -")
        lines.append(f"| {case} | {s['ref_s']:.3f} | {s['loss_s']:.3f} | {s['tokens'] / s['loss_s']:,.0f} | "
                     f"{s['peak_mib']:,.0f} | {s['loss']:.6f} | {vs} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="qwen2-180m")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=str(Path(__file__).with_name("TRL.md")))
    args = parser.parse_args()
    shape = dict(model=args.model, prompts=args.prompts, G=args.G, length=args.length, steps=args.steps,
                 device=args.device)
    cases = args.cases.split(",")
    params = [dict(impl=case, **shape) for case in cases]
    rows = dict(zip(cases, run_interleaved("bench_trl", "build", params, timeout_s=3600)))
    env = environment()
    lines = report(rows, " ".join(["python bench/bench_trl.py", *sys.argv[1:]]), env, shape)
    print("\n".join(lines))
    Path(args.out).write_text("\n".join(lines) + "\n")
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    raw = BENCH_DIR / "results" / f"trl-{time.strftime('%Y%m%d-%H%M%S')}.json"
    raw.write_text(json.dumps({"env": env, "shape": shape, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out} and {raw}")


if __name__ == "__main__":
    main()
