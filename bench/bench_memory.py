"""Where a full-fine-tuning GRPO step's peak resident memory goes: fastgrpo phase by phase, against TRL 1.16.

    python bench/bench_memory.py [--model qwen2-180m] [--length 64] [--steps 2]
                                 [--cases fastgrpo,trl,fastgrpo+model.gradient_checkpointing=true] [--detail]

The shape and settings are bench_step.py's (its builders run both trainers): P prompts x G completions of L tokens,
fp32, beta 0.04 (a reference model on both sides), AdamW, and otherwise each trainer's defaults (fastgrpo's KV cache
sized from the step). A case is `fastgrpo` or `trl`, and a fastgrpo case may carry config overrides after `+`
(`fastgrpo+train.optimizer=adamw_8bit`). Each case runs in a fresh process (bench/harness.py).

Memory is the process's resident set (VmRSS) and its high-water mark (VmHWM), read at phase boundaries; after each
read the high-water mark is reset to the current RSS (writing "5" to /proc/self/clear_refs), so each phase's peak is
its own and the process's peak is the largest of them. The boundaries are the trainer's own functions, wrapped
here (nothing in fastgrpo changes for the benchmark): model loads, vLLM's creation, and per step the rollout, the
reference pass, the loss forward+backward (up to the grad-norm clip), the optimizer step, the weight sync and the
checkpoint. `pre-model` is the RSS once torch, transformers, vLLM (fastgrpo) or TRL are imported, before any model.

The training state is counted from the tensors: policy weights, their gradients (the trainable parameters' bytes:
both trainers hold all of them at the end of the backward), the optimizer's state tensors and the reference model.
`ratio` = (peak - pre-model) / state: what the step holds beyond the state it must hold (the issue's target: <= 1.15).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import MODELS, _model_path  # noqa: E402
from harness import BENCH_DIR, Step, _status_mib, environment, run_case  # noqa: E402

MIB = 2**20


class Marks:
    """Phase boundaries: each mark closes the interval since the previous one, with its peak and end RSS (MiB)."""

    def __init__(self):
        self.rows = []
        self.step = "setup"
        self.reset()

    @staticmethod
    def reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def mark(self, label: str, **extra) -> None:
        self.rows.append({"step": self.step, "phase": label, "peak_mib": _status_mib("VmHWM"),
                          "rss_mib": _status_mib("VmRSS"), **extra})
        self.reset()

    def around(self, fn, before: str, after: str, extra=None):
        """fn, marking `before` (the interval up to its call) and `after` (its own) around each call."""

        def wrapped(*args, **kwargs):
            self.mark(before)
            try:
                return fn(*args, **kwargs)
            finally:
                self.mark(after, **(extra() if extra else {}))

        return wrapped


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (zero_copy's q/k/v views of one fused tensor count once)."""
    seen = {}
    for t in tensors:
        if torch.is_tensor(t) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_bytes(optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values())


def state_bytes(model, ref_model, optimizer) -> dict:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"policy": tensor_bytes(model.parameters()), "gradients": tensor_bytes(trainable),
            "optimizer": optimizer_bytes(optimizer),
            "reference": tensor_bytes(ref_model.parameters()) if ref_model is not None else 0}


# ----------------------------------------------------------------------------------------------------------
# The two trainers, in the harness's fresh process.


def instrument_fastgrpo(marks: Marks, held: dict) -> None:
    """Wrap the trainer's phase functions (module attributes of fastgrpo.grpo) with marks."""
    import fastgrpo.grpo as grpo

    loads = iter(["policy", "reference"])
    load_model = grpo.load_model

    def load_and_mark(*args, **kwargs):
        name = next(loads)
        marks.mark(f"before the {name}")
        held[name] = load_model(*args, **kwargs)
        marks.mark(f"{name} load", weights_mib=tensor_bytes(held[name].parameters()) / MIB)
        return held[name]

    grpo.load_model = load_and_mark
    make_generator = grpo.make_generator

    def make_generator_and_mark(*args, **kwargs):
        marks.mark("optimizer, rewards, prompts")
        generator = make_generator(*args, **kwargs)
        marks.mark("vLLM: engine, KV cache, weight sharing")
        generator.sync_weights = marks.around(generator.sync_weights, "loss metrics", "weight sync (repack)")
        return generator

    grpo.make_generator = make_generator_and_mark

    def grads():
        return {"grads_mib": tensor_bytes(p.grad for p in held["policy"].parameters()) / MIB}

    collect_rollout = grpo.collect_rollout

    def collect_rollout_and_mark(*args, **kwargs):  # (generator, sampler, tokenizer, funcs, weights, cfg, step, ...)
        marks.mark("between steps")
        marks.step = args[6]
        try:
            return collect_rollout(*args, **kwargs)
        finally:
            marks.mark("generation")

    grpo.collect_rollout = collect_rollout_and_mark
    grpo.score = marks.around(grpo.score, "vLLM sleep, advantages, packing", "reference pass")
    grpo.update = marks.around(grpo.update, "micro-batch inputs", "optimizer step, zero_grad")
    grpo.clip_grad_norm_ = marks.around(grpo.clip_grad_norm_, "loss forward+backward", "grad-norm clip", grads)
    grpo.save_checkpoint = marks.around(grpo.save_checkpoint, "after the step", "checkpoint save")


def build_fastgrpo_case(case: str, path: Path, work: Path, shape: dict, marks: Marks, info: dict):
    import datasets  # noqa: F401  (the prompts' reader: imported before the baseline, as on TRL's side)
    import vllm  # noqa: F401  (and the generator's library, as TRL's are)

    import fastgrpo.grpo as grpo
    from bench_step import build_fastgrpo

    marks.mark("imports")
    held = {}
    instrument_fastgrpo(marks, held)
    backend = "vllm" + case.removeprefix("fastgrpo")
    run = build_fastgrpo(path, work, backend, shape["prompts"], shape["G"], shape["length"], shape["steps"] - 1,
                         None, False, False, info)
    start_run = grpo.start_run

    def start_and_keep(*args, **kwargs):
        run_, state = start_run(*args, **kwargs)
        held["run"] = run_
        return run_, state

    grpo.start_run = start_and_keep

    def totals():
        r = held["run"]
        info["state_bytes"] = state_bytes(r.model, r.ref_model, r.optimizer)
        info["optimizer_dtypes"] = sorted({str(v.dtype) for s in r.optimizer.state.values() for v in s.values()
                                           if torch.is_tensor(v) and v.numel() > 1})
        info["reference_dtype"] = str(next(r.ref_model.parameters()).dtype) if r.ref_model is not None else None

    return run, totals


def build_trl_case(path: Path, work: Path, shape: dict, marks: Marks, info: dict):
    import datasets  # noqa: F401
    import trl  # noqa: F401
    from bench_step import build_trl
    from transformers import TrainerCallback

    marks.mark("imports")
    run = build_trl(path, work, "hf", shape["prompts"], shape["G"], shape["length"], shape["steps"] - 1, False,
                    False, info)
    marks.mark("trainer: policy, reference")
    trainer = trl_trainer(run)
    trainer._generate = marks.around(trainer._generate, "between steps", "generation")
    trainer.compute_loss = marks.around(trainer.compute_loss, "reference pass, scoring", "loss forward")

    class Phases(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks.step = state.global_step

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads = tensor_bytes(p.grad for p in trainer.model.parameters()) / MIB
            marks.mark("loss backward, grad-norm clip", grads_mib=grads)

        def on_optimizer_step(self, args, state, control, **kwargs):
            marks.mark("optimizer step")

    trainer.add_callback(Phases())

    def totals():
        info["state_bytes"] = state_bytes(trainer.model, trainer.ref_model, trainer.optimizer)
        info["optimizer_dtypes"] = sorted({str(v.dtype) for s in trainer.optimizer.state.values()
                                           for v in s.values() if torch.is_tensor(v) and v.numel() > 1})

    return run, totals


def trl_trainer(run):
    """The GRPOTrainer bench_step.build_trl's run() closes over."""
    cells = dict(zip(run.__code__.co_freevars, (c.cell_contents for c in run.__closure__)))
    return cells["trainer"]


def build(case: str, model: str, prompts: int, G: int, length: int, steps: int) -> Step:
    """A Step whose forward is the whole run (setup and `steps` steps), measured phase by phase into `info`."""
    path = _model_path(model)
    shape = dict(prompts=prompts, G=G, length=length, steps=steps)
    info = {}

    def forward():
        import shutil

        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            work = Path(tmp)
            marks = Marks()
            if case == "trl":
                run, totals = build_trl_case(path, work, shape, marks, info)
            else:
                run, totals = build_fastgrpo_case(case, path, work, shape, marks, info)
            info["pre_model_mib"] = marks.rows[0]["rss_mib"]  # "imports"
            try:
                run()
            finally:
                shutil.rmtree(work, ignore_errors=True)
            marks.mark("end")
            totals()
            before = _status_mib("VmRSS")
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            info["allocator_retained_mib"] = before - _status_mib("VmRSS")
            info["marks"] = marks.rows
        return None

    return Step(forward, lambda _: None, params=[], flops=0.0, min_bytes=1.0, tokens=1, info=info)


# ----------------------------------------------------------------------------------------------------------
# The report.


def summary(row: dict) -> dict:
    state = sum(row["state_bytes"].values()) / MIB
    peak = max(m["peak_mib"] for m in row["marks"])
    return {"pre": row["pre_model_mib"], "peak": peak, "state": state, "ratio": (peak - row["pre_model_mib"]) / state,
            "steady": max(m["peak_mib"] for m in row["marks"] if m["step"] not in ("setup", 0))}


def case_table(case: str, row: dict) -> list[str]:
    s = summary(row)
    b = {k: v / MIB for k, v in row["state_bytes"].items()}
    lines = [f"### {case}", "",
             f"Pre-model RSS {s['pre']:,.0f} MiB; state {s['state']:,.0f} MiB (policy {b['policy']:,.0f}, "
             f"gradients {b['gradients']:,.0f}, optimizer {b['optimizer']:,.0f} "
             f"({', '.join(row.get('optimizer_dtypes', []))}), reference {b['reference']:,.0f}"
             + (f", {row['reference_dtype']}" if row.get("reference_dtype") else "") + "); "
             f"peak {s['peak']:,.0f} MiB; ratio {s['ratio']:.3f}; glibc held {row['allocator_retained_mib']:,.0f} MiB "
             f"of freed heap at the end (returned by malloc_trim).", "",
             "| step | phase | peak MiB | peak - pre-model | RSS at its end | gradients held MiB |",
             "|---|---|--:|--:|--:|--:|"]
    for m in row["marks"]:
        grads = f"{m['grads_mib']:,.0f}" if "grads_mib" in m else ""
        lines.append(f"| {m['step']} | {m['phase']} | {m['peak_mib']:,.0f} | {m['peak_mib'] - s['pre']:,.0f} | "
                     f"{m['rss_mib']:,.0f} | {grads} |")
    return lines + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="qwen2-180m")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="steps in all; the first allocates the optimizer state")
    parser.add_argument("--cases", default="fastgrpo,trl")
    parser.add_argument("--detail", action="store_true", help="a phase table per case")
    parser.add_argument("--out", default=str(BENCH_DIR / "MEMORY_RUN.md"))
    args = parser.parse_args()
    env = environment()
    shape = dict(model=args.model, prompts=args.prompts, G=args.G, length=args.length, steps=args.steps)
    rows = {}
    lines = [f"Command: `python bench/bench_memory.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {env['cpu']}, {env['cores']} cores; commit {env['commit']}; versions {env['versions']}", "",
             "| case | pre-model MiB | state MiB | peak MiB | peak - pre-model | ratio to state | steady-state peak |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for case in args.cases.split(","):
        rows[case] = row = run_case("bench_memory", "build", dict(case=case, **shape), warmup=0, repeats=1,
                                    timeout_s=3600)
        if "marks" not in row:
            lines.append(f"| {case} | {row.get('error') or row.get('skipped')} |")
        else:
            s = summary(row)
            lines.append(f"| {case} | {s['pre']:,.0f} | {s['state']:,.0f} | {s['peak']:,.0f} | "
                         f"{s['peak'] - s['pre']:,.0f} | {s['ratio']:.3f} | {s['steady']:,.0f} |")
        print(lines[-1], flush=True)
    if args.detail:
        lines.append("")
        for case, row in rows.items():
            if "marks" in row:
                lines += case_table(case, row)
    Path(args.out).write_text("\n".join(lines) + "\n")
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    raw = BENCH_DIR / "results" / f"memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    raw.write_text(json.dumps({"env": env, "shape": shape, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out} and {raw}")


if __name__ == "__main__":
    main()
