"""The GPU acceptance run (issue 20): one command, within 8 minutes on one H200, every part time-boxed.

    bash scripts/gpu_check.sh              # CUDA machine: bench/GPU.md + bench/GPU.json (and copies in $OUT if set)
    bash scripts/gpu_check.sh --dry-run    # any machine: every part at toy sizes on the CPU, Triton interpreted (CI)
    bash scripts/gpu_check.sh --parts loss step_0.5b    # a subset, e.g. to rerun what failed

Each part runs in a process group of its own under its time box; a part that fails or runs out of time keeps
what it had written (its result file is rewritten after every case, test or step), and the report is rewritten
after every part:

  kernels    tests/kernels on the device (bench/on_device.py; compiled Triton on CUDA): fp32 / bf16 / fp16 against
             the PyTorch references, the fused-linear ops under autocast, Liger parity when liger-kernel is there
  loss       bench_loss.py's cases, each in a fresh process (harness.run_case), at N = 8,192 and 16,384, H = 3,584,
             V = 151,936, bf16; and the loss alone on given logits, whose floor is reading and writing them
  step_0.5b  GRPO steps of fastgrpo.grpo on a random Qwen2.5-0.5B-shaped model from configs/grpo_qwen2.5-0.5b.yaml:
             bf16 compute over fp32 weights, transformers generation, packed micro-batches with per-sequence SDPA
  step_1.5b  the same at Qwen2.5-1.5B's shape, when the budget leaves time for it

The dry run calls the same functions; only SIZES and the device differ.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
HBM_GBPS = 4300.0  # H200, device-to-device copy measured on the lent machine (KINDS.md)
BF16_TFLOPS = 790.0  # H200, 8192^3 bf16 GEMM measured there (769-798)
PARTS = ("kernels", "loss", "step_0.5b", "step_1.5b")
STEP_CONFIG = REPO / "configs" / "grpo_qwen2.5-0.5b.yaml"
# Qwen2.5's shapes (their config.json); vocabulary 151,936 and tied embeddings in both
QWEN = {
    "step_0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936),
    "step_1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                      num_key_value_heads=2, vocab_size=151936),
}
TOY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
DRY_TESTS = [  # a few of each kind, both backends: seconds under the interpreter
    "tests/kernels/test_logprobs.py::test_shapes_and_inplace_backward",
    "tests/kernels/test_grpo_loss.py::test_packed_equals_padded",
    "tests/kernels/test_fused_linear.py::test_autocast_computes_like_bf16_inputs_with_fp32_gradients[many_tiles]",
    "tests/kernels/test_advantages.py::test_matches_reference[triton-5-group]",
    "tests/kernels/test_advantages.py::test_matches_reference[torch-5-group]",
]
SIZES = {
    "real": dict(
        device="cuda", budget_s=465, reserve_s=5, min_box_s=45,
        boxes={"kernels": 110, "loss": 160, "step_0.5b": 110, "step_1.5b": 90},
        # the core ops' files first (a run cut short by its box has them), then the rest of the folder (pytest
        # collects each file once)
        tests=["tests/kernels/test_logprobs.py", "tests/kernels/test_grpo_loss.py", "tests/kernels/test_fused_linear.py",
               "tests/kernels", "--ignore=tests/kernels/test_aot.py"],
        loss=dict(shapes=[(16, 512), (32, 512)], H=3584, V=151936, case_timeout_s=60, warmup=1, repeats=3),
        step=dict(models=QWEN, B=8, G=8, completion=256, micro_batch_tokens=8192, examples=256,
                  steps={"step_0.5b": 3, "step_1.5b": 2})),
    "dry": dict(
        # boxes against a hang only: a loaded 2-core CI machine takes ~30 s for a part
        device="cpu", budget_s=1200, reserve_s=5, min_box_s=10,
        boxes={"kernels": 300, "loss": 300, "step_0.5b": 300, "step_1.5b": 300},
        tests=DRY_TESTS,
        loss=dict(shapes=[(2, 16)], H=32, V=512, case_timeout_s=60, warmup=1, repeats=2),
        step=dict(models={"step_0.5b": TOY_MODEL, "step_1.5b": {**TOY_MODEL, "hidden_size": 96}}, B=2, G=2,
                  completion=8, micro_batch_tokens=32, examples=16, steps={"step_0.5b": 3, "step_1.5b": 2})),
}
LOSS_CASES = ("gemm_floor", "fastgrpo_fused", "liger_chunked", "fastgrpo_logits", "liger_triton", "torch")
LOGITS_CASES = ("fastgrpo", "liger_triton", "torch")  # the loss alone on given logits
LIGER = ("liger_chunked", "liger_triton")
NOT_HERE = [  # what no run of this script checks, whatever the budget
    "vLLM and flash-attn: not on the GPU image and far too big to carry as wheels (scripts/gpu_wheels.sh), so CUDA "
    "vLLM generation, its weight sharing and flash-attn varlen attention stay unverified; the step generates with "
    "transformers and packs with per-sequence SDPA instead",
    "tests/kernels/test_aot.py: not run (it compiles for sm_80 / sm_90 on the CPU side; CI runs it)",
    "TRL parity (tests/kernels/test_parity.py's TRL cases) and bench_loss's trl cases: TRL is not on the image",
]


# ----------------------------------------------------------------------------------------------------------
# Parts, each in a fresh process: `python bench/gpu_check.py --part NAME --result FILE [--dry-run]`


def save_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def part_loss(sizes: dict, save) -> None:
    """bench_loss.py's cases and the logits-only loss, one fresh process each, N = B*T per shape; rows saved as they
    come."""
    import harness

    s, device = sizes["loss"], sizes["device"]
    have_liger = importlib.util.find_spec("liger_kernel") is not None
    rows = []
    for B, T in s["shapes"]:
        cases = [("bench_loss", "build", impl, dict(H=s["H"])) for impl in LOSS_CASES]
        cases += [("gpu_check", "build_logits_loss", impl, {}) for impl in LOGITS_CASES]
        for module, builder, impl, extra in cases:
            params = dict(impl=impl, B=B, T=T, V=s["V"], device=device, **extra)
            if impl in LIGER and not have_liger:
                result = {"skipped": "liger-kernel is not installed (scripts/gpu_wheels.sh brings it)"}
            elif impl == "liger_triton" and device != "cuda":  # as its builders say, without a process to say it
                result = {"skipped": "Triton kernel, CUDA only"}
            else:
                result = harness.run_case(module, builder, params, warmup=s["warmup"], repeats=s["repeats"],
                                          timeout_s=s["case_timeout_s"])
            level = "logits only" if module == "gpu_check" else "lm head + loss"
            rows.append({"level": level, "N": B * T, **params, **result})
            print(f"loss {level} N={B * T} {impl}: {_case_line(result)}", flush=True)
            save({"rows": rows})


def _case_line(row: dict) -> str:
    if "total_s" not in row:
        return row.get("skipped") or row.get("error", "?")
    return f"{row['total_s'] * 1e3:.2f} ms, {row['gbps']:.0f} GB/s, {row['tflops']:.1f} TFLOP/s, " \
           f"peak +{row['peak_extra_mib']:.0f} MiB"


def build_logits_loss(impl, B, T, V, device="cpu"):
    """The GRPO loss alone on given logits [B, T, V] (bf16 on CUDA), as bench_loss's loss (grpo, beta 0.04, eps 0.2):
    the floor is reading the logits forward and reading them and writing their gradient backward (3 N V elements)."""
    import torch

    import bench_loss
    from harness import Skip, Step

    if impl == "liger_triton" and torch.device(device).type != "cuda":
        raise Skip("Triton kernel, CUDA only")
    dtype = bench_loss.dtype_for(device)
    gen = torch.Generator(device).manual_seed(0)  # drawn on the device: N x V values are slow to draw on a CPU
    positions = T + 1 if impl == "liger_triton" else T  # Liger's kernel drops the last position, as a causal LM's
    logits = torch.randn(B, T + 1, V, generator=gen, device=device, dtype=dtype)[:, :positions].contiguous()
    logits.requires_grad_()
    ids = torch.randint(V, (B, T), generator=gen, device=device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen, device=device)
    mask = (torch.arange(T, device=device) < lengths[:, None]).float()  # (B, T)
    advantages = torch.randn(B, generator=gen, device=device)
    with torch.no_grad():
        logp = torch.stack([torch.log_softmax(row[:T].float(), -1).gather(-1, i[:, None]).squeeze(-1)
                            for row, i in zip(logits, ids)])  # (B, T), one sequence at a time
    noise = torch.randn(2, B, T, generator=gen, device=device)
    old_logp, ref_logp = logp + 0.1 * noise[0], logp + 0.1 * noise[1]
    forward = _logits_forward(impl, logits, ids, advantages, mask, old_logp, ref_logp)
    N = B * T
    return Step(forward=forward, backward=torch.Tensor.backward, params=[logits], flops=0.0,
                min_bytes=3 * N * V * logits.element_size(), tokens=N)


def _logits_forward(impl, logits, ids, advantages, mask, old_logp, ref_logp):
    import torch

    import bench_loss

    if impl == "torch":
        return lambda: bench_loss.trl_grpo_loss(torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])
                                                .squeeze(-1), old_logp, ref_logp, advantages, mask)
    if impl == "liger_triton":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        return lambda: triton_grpo_loss(logits, old_logp, ref_logp, ids, advantages, mask, temperature=1.0,
                                        beta=bench_loss.BETA, eps_low=bench_loss.EPS, eps_high=bench_loss.EPS,
                                        loss_type="grpo", reduce=True)[0]
    if impl == "fastgrpo":
        from fastgrpo_kernels.grpo_loss import GRPOLossConfig, grpo_loss

        config = GRPOLossConfig(beta=bench_loss.BETA)
        return lambda: grpo_loss(logits, ids, advantages, mask, old_logp, ref_logp, config)[0]
    raise ValueError(f"impl must be one of {LOGITS_CASES}, got {impl!r}")


def token_parity_reward(prompts, completions, completion_ids, **columns) -> list[float]:
    """The share of even token ids in each completion: a random model's completions differ in it, so every group
    has advantages to learn from (the built-in rewards score a random model's text 0 everywhere)."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def build_random_model(path: Path, shape: dict, device) -> int:
    """A randomly initialized Qwen2 of `shape` in bf16 and a tokenizer covering its whole vocabulary (tiny.py's
    characters, then filler tokens) saved at `path`; returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fastgrpo import tiny

    tokenizer = tiny.char_tokenizer()
    tokenizer.save_pretrained(path)
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<t{i}>": i for i in range(len(vocab), shape["vocab_size"])})  # decodable, never produced
    (path / "tokenizer.json").write_text(json.dumps(spec))
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def part_step(name: str, sizes: dict, save) -> None:
    """GRPO steps through fastgrpo.grpo's own start_run / grpo_step on a random model of the part's shape."""
    import torch

    from fastgrpo import grpo
    from fastgrpo.config import GRPOConfig, load_config
    from fastgrpo.packing import attention_implementation
    from on_device import compiled_kernels

    s, device = sizes["step"], sizes["device"]
    work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
    t0 = time.perf_counter()
    params = build_random_model(work / "model", s["models"][name], device)
    overrides = step_overrides(s, work)
    cfg = load_config(GRPOConfig, STEP_CONFIG, overrides)
    run, _ = grpo.start_run(cfg, reward_funcs=[token_parity_reward])
    losses = record_losses(grpo)
    result = {"parameters": params, "config": str(STEP_CONFIG.relative_to(REPO)), "overrides": overrides,
              "setup_s": time.perf_counter() - t0, "weights_dtype": str(next(run.model.parameters()).dtype),
              "packed_attention": attention_implementation(run.model), "steps": []}
    before = [p.detach().to("cpu", copy=True) for p in run.model.parameters()]  # on the host: out of the CUDA peaks
    for step in range(s["steps"][name]):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        compiled = compiled_kernels()
        t = time.perf_counter()
        losses.clear()
        metrics = grpo.grpo_step(run, step)
        # the micro-batch losses of a step add up to its loss: every normalizer is the step's global count
        # (none recorded: the trainer no longer calls the loss op the recorder wraps, and the check fails)
        row = {"step": step, "wall_s": time.perf_counter() - t, "loss": sum(losses) if losses else float("nan"),
               "micro_batches": len(losses), **_step_metrics(metrics)}
        if device == "cuda":
            row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        after = compiled_kernels()
        row["kernels_compiled"] = None if after is None else after - compiled
        result["steps"].append(row)
        print(f"{name} step {step}: {json.dumps(row)}", flush=True)
        save(result)
    result["weights"] = _weights_changed(before, list(run.model.parameters()))
    save(result)
    if run.logger is not None:
        run.logger.close()


def step_overrides(s: dict, work: Path) -> list[str]:
    """What the step part changes in configs/grpo_qwen2.5-0.5b.yaml: the local random model, transformers
    generation (no vLLM on the GPU image), the built-in prompts (no hub), the part's sizes."""
    return [f"model.path={work / 'model'}", "model.dtype=bfloat16", "model.param_dtype=float32",
            "generation.backend=hf", f"generation.num_generations={s['G']}",
            f"generation.max_completion_length={s['completion']}", "generation.ignore_eos=true",
            "data.source=builtin:arithmetic", "data.prompt_column=prompt", "data.answer_column=answer",
            f"data.num_examples={s['examples']}", f"train.prompts_per_step={s['B']}",
            f"train.micro_batch_tokens={s['micro_batch_tokens']}", "train.dynamic_sampling=false",
            "loss.beta=0.04",  # loads and runs the frozen bf16 reference too
            "loss.mask_truncated=false",  # every completion runs to the length limit (ignore_eos)
            f"log.run_dir={work / 'run'}", "log.tensorboard=false"]


def record_losses(module) -> list[float]:
    """Wrap `module.fused_linear_grpo_loss` (the trainer's loss op) so that every loss value it returns lands in
    the list returned: the trainer logs the loss's metrics, not the loss."""
    losses, loss_op = [], module.fused_linear_grpo_loss

    def recorded(*args, **kwargs):
        loss, metrics = loss_op(*args, **kwargs)
        losses.append(float(loss.detach()))
        return loss, metrics

    module.fused_linear_grpo_loss = recorded
    return losses


def _step_metrics(metrics: dict) -> dict:
    keep = ("loss/", "grad_norm", "time/", "tokens_per_s", "peak_memory_mib", "reward/mean", "completion/length_mean",
            "packing/", "bad_updates")
    return {k: v for k, v in metrics.items() if k.startswith(keep)}


def _weights_changed(before: list, after: list) -> dict:
    import torch

    after = [a.detach().cpu() for a in after]
    changed = [bool((a != b).any()) for b, a in zip(before, after)]
    largest = max(float((a - b).abs().max()) for b, a in zip(before, after))
    finite = all(bool(torch.isfinite(a).all()) for a in after)
    return {"tensors_changed": sum(changed), "tensors": len(changed), "max_abs_change": largest, "finite": finite}


def run_part_here(name: str, result_path: Path, sizes: dict) -> None:
    def save(data: dict) -> None:
        save_json(result_path, data)

    if name == "loss":
        part_loss(sizes, save)
    elif name.startswith("step_"):
        part_step(name, sizes, save)
    else:
        raise ValueError(f"no part {name!r} runs through --part; parts: {', '.join(PARTS)}")


# ----------------------------------------------------------------------------------------------------------
# The parent: time boxes, then the report


def part_command(name: str, result: Path, dry_run: bool, sizes: dict) -> tuple[list[str], dict]:
    """(argv, extra environment) of the process that runs part `name`."""
    device = sizes["device"]
    env = {"TRITON_INTERPRET": "0" if device == "cuda" else "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(BENCH), str(REPO / "kernels" / "src"), str(REPO),
                                          os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if name == "kernels":
        env.update(FASTGRPO_TEST_DEVICE=device, FASTGRPO_TEST_RESULTS=str(result))
        # a test file that cannot be collected there (a package the image lacks) must not stop the others
        return [sys.executable, "-m", "pytest", "-p", "on_device", "-p", "no:cacheprovider", "-q",
                "--continue-on-collection-errors", *sizes["tests"]], env
    argv = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--result", str(result)]
    return argv + (["--dry-run"] if dry_run else []), env


def run_part(name: str, work: Path, dry_run: bool, sizes: dict, deadline: float) -> dict:
    """Run one part in its own process group within min(its box, the time left); its status and results."""
    box = min(sizes["boxes"][name], deadline - time.monotonic() - sizes["reserve_s"])
    if box < sizes["min_box_s"]:
        return {"status": "skipped", "why": f"out of time: {max(box, 0):.0f} s left of the budget, "
                                           f"{sizes['min_box_s']} s needed at least"}
    result = work / (f"{name}.jsonl" if name == "kernels" else f"{name}.json")
    log = work / f"gpu_check_{name}.log"
    argv, env = part_command(name, result, dry_run, sizes)
    t0, cpu0 = time.monotonic(), _children_cpu_s()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=box)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and every case process it started
            proc.wait()
            code, status = None, "timed out"
    part = {"status": status, "seconds": round(time.monotonic() - t0, 1), "box_s": round(box), "exit_code": code,
            "cpu_s": round(_children_cpu_s() - cpu0, 1)}
    if status == "timed out":
        part["why"] = f"stopped at its {box:.0f} s box; the results below are what it finished"
    elif status == "failed":
        part["why"] = " | ".join(log.read_text().strip().splitlines()[-4:])[-800:]
    if name == "kernels":
        part.update(summarize_tests(result))
    elif result.exists():
        part.update(json.loads(result.read_text()))
    return part


def _children_cpu_s() -> float:
    """CPU seconds of the finished processes this one has waited for (a part and, through it, its case processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarize_tests(path: Path) -> dict:
    """Counts, failures and skip reasons from on_device.py's JSON lines."""
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    tests = [line for line in lines if "test" in line]
    session = next((line for line in lines if line.get("session")), {})
    counts = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    skips = {}
    for t in tests:
        if t["outcome"] == "skipped":
            skips[t["message"]] = skips.get(t["message"], 0) + 1
    by_file = {}
    for t in tests:
        file = by_file.setdefault(t["test"].split("::")[0], {})
        file[t["outcome"]] = file.get(t["outcome"], 0) + 1
    return {"counts": counts, "by_file": by_file, "failures": [t for t in tests if t["outcome"] in ("failed", "error")],
            "skip_reasons": skips, "compiled_kernels": session.get("compiled_kernels"),
            "finished": bool(session), "test_seconds": round(sum(t["seconds"] for t in tests), 1)}


def environment() -> dict:
    import torch

    import harness

    env = harness.environment()
    env["versions"].update({p: harness._version(p) for p in ("transformers", "omegaconf", "datasets", "accelerate")})
    env["python"] = platform.python_version()
    env["torch_cuda"] = torch.version.cuda
    if os.environ.get("FASTGRPO_COMMIT") and env["commit"] == "uncommitted":
        env["commit"] = os.environ["FASTGRPO_COMMIT"]  # the device's copy of the tree has no .git
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        env["driver"] = smi.stdout.strip() or None
    return env


def _row(rows: list, level: str, N: int, impl: str) -> dict | None:
    return next((r for r in rows if r["level"] == level and r["N"] == N and r["impl"] == impl and "total_s" in r),
                None)


def targets(parts: dict) -> list[dict]:
    """Issue 20's targets, each with the measured value and whether it is met (None: not measured)."""
    rows = parts.get("loss", {}).get("rows", [])
    out = []
    for N in sorted({r["N"] for r in rows}):
        logits = _row(rows, "logits only", N, "fastgrpo")
        fused, floor = _row(rows, "lm head + loss", N, "fastgrpo_fused"), _row(rows, "lm head + loss", N, "gemm_floor")
        liger = _row(rows, "lm head + loss", N, "liger_chunked")
        share = logits and logits["gbps"] / HBM_GBPS
        out.append(_target(f"N={N}: logits-level loss >= 80% of HBM bandwidth (3 N V bytes)", share,
                           share is not None and share >= 0.8, f"{share:.0%}" if share is not None else None))
        ratio = fused and floor and fused["total_s"] / floor["total_s"]
        out.append(_target(f"N={N}: fused-linear loss <= 1.15x its three matmuls", ratio,
                           ratio is not None and ratio <= 1.15, f"{ratio:.2f}x" if ratio else None))
        memory = fused and liger and fused["peak_extra_mib"] / liger["peak_extra_mib"]
        out.append(_target(f"N={N}: fused-linear peak memory <= 1/4 of Liger's fused-linear", memory,
                           memory is not None and memory <= 0.25, f"{memory:.2f}x" if memory else None))
    steps = parts.get("step_0.5b", {}).get("steps", [])
    if steps:
        finite = all(math.isfinite(s[k]) for s in steps for k in ("loss", "grad_norm"))
        late = [s["kernels_compiled"] for s in steps[2:]]
        recompiled = None if not late or None in late else sum(late)
        met = finite and recompiled == 0
        value = f"finite loss: {finite}; kernels compiled after step 2: {recompiled if late else 'no step 3'}"
        out.append(_target("GRPO step at 0.5B shape: no NaN, no recompilation after step 2", value,
                           met if late and recompiled is not None else None, value))
    return out


def _target(what: str, value, met, shown) -> dict:
    return {"target": what, "value": value, "met": met if value is not None else None, "shown": shown or "not measured"}


def render(report: dict) -> str:
    env, parts = report["environment"], report["parts"]
    v = env["versions"]
    lines = [
        "# GPU acceptance run" + (" (DRY RUN: toy sizes on the CPU, Triton interpreted)" if report["dry_run"] else ""),
        "",
        f"`{report['command']}` at commit {env['commit']}, {report['started']}, {report['wall_s']:.0f} s wall-clock "
        f"(budget {report['budget_s']} s). Machine-readable: GPU.json beside this file.",
        "",
        f"- machine: {env['gpu'] or 'no GPU'}"
        + (f" ({env.get('gpu_memory_gib')} GiB, {env.get('multiprocessors')} SMs, sm_{env.get('capability')}, "
           f"driver {env.get('driver')}, CUDA {env.get('torch_cuda')})" if env["gpu"] else "")
        + f"; {env['cpu']}, {env['cores']} cores",
        f"- versions: Python {env['python']}, " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- not installed: {', '.join(k for k, val in v.items() if not val) or 'none'}",
        f"- ceilings of the fractions: {HBM_GBPS / 1000:.1f} TB/s HBM, {BF16_TFLOPS:.0f} bf16 TFLOP/s (measured on "
        "the lent H200s: device-to-device copy; 8192^3 bf16 GEMM, 769-798)",
        "",
        "| part | status | seconds (box) | CPU seconds | note |",
        "|---|---|--:|--:|---|",
    ]
    for name in PARTS:
        p = parts.get(name, {"status": "not run", "why": "not selected (--parts)"})
        lines.append(f"| {name} | {p['status']} | {p.get('seconds', '')} ({p.get('box_s', '')}) | {p.get('cpu_s', '')} "
                     f"| {_cell(p.get('why', ''))} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|--:|---|"]
    lines += [f"| {t['target']} | {t['shown']} | {_met(t['met'])} |" for t in report["targets"]]
    lines += _render_kernels(parts.get("kernels")) + _render_loss(parts.get("loss"))
    for name in ("step_0.5b", "step_1.5b"):
        lines += _render_step(name, parts.get(name))
    lines += ["", "## Not checked here, and why", ""] + [f"- {n}" for n in report["not_checked"]]
    return "\n".join(lines) + "\n"


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _met(met) -> str:
    return {True: "yes", False: "**no**", None: "not measured"}[met]


def _render_kernels(part: dict | None) -> list[str]:
    if not part or "counts" not in part:
        return []
    counts = ", ".join(f"{n} {k}" for k, n in sorted(part["counts"].items())) or "none ran"
    lines = ["", "## Kernel tests (tests/kernels on the device)", "",
             f"{counts}; {part['test_seconds']} s in tests; Triton kernels compiled: "
             f"{part['compiled_kernels'] if part['compiled_kernels'] is not None else 'none (interpreter)'}; "
             f"{'the session finished' if part['finished'] else 'the session did not finish'}."]
    lines += [f"- `{file}`: " + ", ".join(f"{n} {k}" for k, n in sorted(c.items())) for file, c in part["by_file"].items()]
    if part["failures"]:
        lines += ["", "| failed test | message |", "|---|---|"]
        lines += [f"| `{f['test']}` | {_cell(f['message'])} |" for f in part["failures"][:40]]
    if part["skip_reasons"]:
        lines += ["", "Skipped: " + "; ".join(f"{n} x {_cell(why)}" for why, n in part["skip_reasons"].items())]
    return lines


def _render_loss(part: dict | None) -> list[str]:
    if not part or not part.get("rows"):
        return []
    lines = ["", "## Loss-level benchmark (bf16 on CUDA; forward + backward, median of the timed steps)", "",
             "`lm head + loss`: bench/bench_loss.py's cases (hidden [N, H] x weight [V, H]; flops 6 N H V; bytes: "
             "3 (N H + V H)). `logits only`: the loss on given logits (bytes: 3 N V). Each case in a fresh process.",
             "", "| level | N | H | V | impl | total ms | fwd ms | bwd ms | GB/s | of HBM | TFLOP/s | of bf16 peak | "
             "peak extra MiB | loss |", "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in part["rows"]:
        head = f"| {r['level']} | {r['N']} | {r.get('H', '')} | {r['V']} | {r['impl']} |"
        if "total_s" not in r:
            lines.append(f"{head} {_cell(r.get('skipped') or r.get('error'))} |" + " |" * 9)
            continue
        tflops = f"{r['tflops']:.1f} | {r['tflops'] / BF16_TFLOPS:.0%}" if r["tflops"] else " | "
        loss = f"{r['loss']:.5f}" if r.get("loss") is not None else ""
        lines.append(f"{head} {r['total_s'] * 1e3:.2f} | {r['fwd_s'] * 1e3:.2f} | {r['bwd_s'] * 1e3:.2f} | "
                     f"{r['gbps']:.0f} | {r['gbps'] / HBM_GBPS:.0%} | {tflops} | {r['peak_extra_mib']:.0f} | {loss} |")
    return lines


def _render_step(name: str, part: dict | None) -> list[str]:
    if not part or "steps" not in part:
        return []
    lines = ["", f"## GRPO step, {name.removeprefix('step_')} shape ({part['parameters'] / 1e6:.3g}M parameters, "
             "random weights)", "",
             f"{part['config']} with {' '.join(part['overrides'][1:])}; a reward of even token ids (random text "
             f"scores 0 on the built-in rewards). Weights {part['weights_dtype']}, packed attention "
             f"`{part['packed_attention']}`. Setup (model built, saved, loaded): {part['setup_s']:.1f} s.", "",
             "| step | wall s | generation s | training s | sync s | tokens/s | micro-batches | peak MiB | loss | "
             "grad norm | KL | Triton kernels compiled |", "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for s in part["steps"]:
        lines.append(f"| {s['step']} | {s['wall_s']:.2f} | {s.get('time/generation', 0):.2f} | "
                     f"{s.get('time/training', 0):.2f} | {s.get('time/weight_sync', 0):.2f} | "
                     f"{s.get('tokens_per_s', 0):.0f} | {s['micro_batches']} | "
                     f"{s.get('peak_cuda_mib', s.get('peak_memory_mib', 0)):.0f} | {s['loss']:.6f} | "
                     f"{s.get('grad_norm', float('nan')):.4f} | {s.get('loss/kl', float('nan')):.3g} | "
                     f"{s['kernels_compiled']} |")
    lines += ["", "tokens/s: completion tokens over the step's timed phases; peak MiB: CUDA memory allocated "
              "(the process's RSS on the CPU)."]
    w = part.get("weights")
    if w:
        lines += ["", f"Weights after the steps: {w['tensors_changed']} of {w['tensors']} tensors changed (largest "
                      f"change {w['max_abs_change']:.3g}), all finite: {w['finite']}."]
    return lines


def write_report(report: dict, outs: list[Path]) -> None:
    report["targets"] = targets(report["parts"])
    text = render(report)
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / "GPU.json", report)
        (out / "GPU.md").write_text(text)


def run_all(args, sizes: dict) -> dict:
    started = time.monotonic()
    deadline = started + (args.budget_s or sizes["budget_s"])
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    outs = [Path(args.out)] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") and not args.dry_run else [])
    report = {"dry_run": args.dry_run, "command": " ".join(["bash scripts/gpu_check.sh", *sys.argv[1:]]),
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget_s": args.budget_s or
              sizes["budget_s"], "environment": environment(), "parts": {}, "not_checked": list(NOT_HERE)}
    if importlib.util.find_spec("liger_kernel") is None:
        report["not_checked"].append("Liger: liger-kernel is not installed (scripts/gpu_wheels.sh brings its wheel)")
    for name in args.parts:
        print(f"gpu_check: {name} ...", flush=True)
        report["parts"][name] = part = run_part(name, work, args.dry_run, sizes, deadline)
        print(f"gpu_check: {name} {part['status']} in {part.get('seconds', 0)} s {part.get('why', '')}", flush=True)
        report["wall_s"] = time.monotonic() - started
        write_report(report, outs)
        for out in outs[1:]:  # the part's log comes back from the device too
            log = work / f"gpu_check_{name}.log"
            if log.exists():
                shutil.copy(log, out)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every part at toy sizes on the CPU")
    parser.add_argument("--out", default=str(BENCH), help="where GPU.md and GPU.json go (default bench/)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of all parts")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # inside a part's own process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SIZES["dry" if args.dry_run else "real"]
    if args.part:
        run_part_here(args.part, Path(args.result), sizes)
        return 0
    import torch

    if sizes["device"] == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run on the GPU machine, or --dry-run for toy sizes on the CPU",
              file=sys.stderr)
        return 2
    report = run_all(args, sizes)
    failed = [name for name, part in report["parts"].items() if part["status"] != "ok"]
    print(f"gpu_check: wrote {Path(args.out) / 'GPU.md'} in {report['wall_s']:.0f} s; "
          + (f"not ok: {', '.join(failed)}" if failed else "every part ok"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
