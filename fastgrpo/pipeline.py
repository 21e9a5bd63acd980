"""The DeepSeek-R1 recipe end to end: every stage from one config, each starting from the previous stage's model.

    python -m fastgrpo.pipeline configs/r1_tiny.yaml [key=value ...]      # e.g. stages=[cold_start] seed=1

Stages, in order (a config section each; `stages` picks which run):
  reward_model        the stage-4 reward model, trained on preference pairs (independent of the policy, so it
                      runs first and every stage's evaluation can report helpfulness)
  cold_start          1. SFT on chain-of-thought data
  process_reward_model   a PRM trained on the cold-start model's own steps, for process-supervised stage 2
                      (not in the default `stages`: configs/r1_tiny_prm.yaml adds it)
  reasoning_rl        2. GRPO with rule rewards: accuracy, format, language consistency
  rejection_sampling  3. sample from the stage-2 model, keep what the verifiers accept, add general data...
  sft                    ...and SFT on that dataset, from the stage-2 model (or the base: sft.model.path="@base")
  helpfulness_rl      4. GRPO: rule rewards on reasoning prompts, the reward model on general prompts

A LoRA stage (its model.lora set) outputs its base with the adapter merged in (RUN_DIR/<stage>/merged, a Hugging Face
folder that transformers and vLLM load); its adapter stays in its checkpoints, in peft's format.

A value "@previous" is the output of the policy stage before (the base model for cold_start), "@base" the base
model, "@<stage>" that stage's output (a model folder, or rejection_sampling's dataset). Each stage runs in its
own process, from RUN_DIR/<stage>/stage.yaml (the printed command reruns it alone), and its model is evaluated
on held-out prompts. A finished stage leaves RUN_DIR/<stage>/DONE.json: rerunning the pipeline skips it, and an
interrupted stage resumes from its latest checkpoint; DONE.json's seconds are those of every process that ran the
stage. The end: RUN_DIR/RESULTS.md and plots in RUN_DIR/plots.

One pipeline at a time writes a run dir (RUN_DIR/.lock), and each stage process locks its stage's folder; a stage
process dies with the pipeline, even one killed with SIGKILL (a launcher such as torchrun stops its workers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from .checkpoint import latest_checkpoint
from .config import ConfigError, DataConfig, GRPOConfig, ModelConfig, RewardConfig, load_cli_config, to_yaml
from .config_doc import help_text
from .evaluate import EvalConfig
from .lora import export_merged
from .prm import PRMConfig, PRMDataConfig
from .rejection import RejectionConfig
from .reward_model import RewardModelConfig
from .runs import RunError, command_line, lock_run_dir, read_record, start_child, stop_child, write_atomic
from .sft import SFTConfig, SFTDataConfig

STAGES = ["reward_model", "cold_start", "process_reward_model", "reasoning_rl", "rejection_sampling", "sft",
          "helpfulness_rl"]
MODULES = {"reward_model": "fastgrpo.reward_model", "cold_start": "fastgrpo.sft", "process_reward_model": "fastgrpo.prm",
           "reasoning_rl": "fastgrpo.grpo", "rejection_sampling": "fastgrpo.rejection", "sft": "fastgrpo.sft",
           "helpfulness_rl": "fastgrpo.grpo"}
DEFAULT_STAGES = [s for s in STAGES if s != "process_reward_model"]  # R1 has no PRM: a variant adds it
POLICY_STAGES = ["cold_start", "reasoning_rl", "sft", "helpfulness_rl"]  # those whose output is the policy
TABLE_NAMES = {"base": "base model", "cold_start": "1 cold-start SFT", "reasoning_rl": "2 reasoning RL",
               "sft": "3 rejection sampling + SFT", "helpfulness_rl": "4 helpfulness RL"}
SECONDS_FILE = "seconds.json"  # {"processes": [seconds of each process that ran the stage]}
TICK_S = 5.0  # how often a running stage's seconds are saved: a pipeline killed outright loses at most this much


@dataclass
class BaseModelConfig:
    path: str = "???"  # a Hugging Face model folder
    tiny: bool = False  # build a tiny random model (fastgrpo.tiny) at `path` when it does not exist
    hidden: int = 128
    layers: int = 2
    seed: int = 0


def _previous(**kwargs) -> ModelConfig:
    return ModelConfig(path="@previous", **kwargs)


@dataclass
class PipelineConfig:
    run_dir: str = "runs/r1"
    seed: int = 0  # added to every stage's training / sampling seed (data splits stay): for runs over seeds
    threads: int = 0  # torch / OpenMP threads of each stage's process (0: torch's default)
    # how SFT and GRPO stages start, e.g. [torchrun, --nproc-per-node, "8"] (docs/SCALING.md); empty: one process
    launcher: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    reward_model: RewardModelConfig = field(default_factory=lambda: RewardModelConfig(model=ModelConfig(path="@base")))
    cold_start: SFTConfig = field(default_factory=lambda: SFTConfig(model=_previous()))
    # from the cold-start model, on its own samples' steps (configs/r1_tiny_prm.yaml); reasoning_rl reads it as
    # rewards.process_reward_model="@process_reward_model"
    process_reward_model: PRMConfig = field(default_factory=lambda: PRMConfig(
        model=_previous(), data=PRMDataConfig(policy="@previous")))
    reasoning_rl: GRPOConfig = field(default_factory=lambda: GRPOConfig(model=_previous()))
    rejection_sampling: RejectionConfig = field(default_factory=lambda: RejectionConfig(model="@previous"))
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(model=_previous(),
                                                             data=SFTDataConfig(source="@rejection_sampling")))
    helpfulness_rl: GRPOConfig = field(default_factory=lambda: GRPOConfig(
        model=_previous(), data=DataConfig(general_source="builtin:assist", general_fraction=0.5),
        rewards=RewardConfig(funcs=["accuracy", "format", "reward_model"], weights=[1.0, 0.5, 1.0],
                             reward_model="@reward_model")))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(
        model="@previous", data=DataConfig(general_source="builtin:assist"),
        rewards=RewardConfig(reward_model="@reward_model")))


# ----------------------------------------------------------------------------------------------------------
# Stage configs: references resolved, run directories and seeds set


def stage_dir(cfg: PipelineConfig, stage: str) -> Path:
    return Path(cfg.run_dir) / stage


def finished(cfg: PipelineConfig, stage: str) -> dict | None:
    """A finished stage's record ({"stage", "output", "seconds", "processes"}) from its DONE.json, or None (also
    when DONE.json is empty or corrupt: the stage runs again, which resumes from its last checkpoint)."""
    return read_record(stage_dir(cfg, stage) / "DONE.json", then=f"{stage} runs again (it resumes where it was)")


def output_of(cfg: PipelineConfig, stage: str) -> str | None:
    """The recorded output of a finished stage, or None."""
    record = finished(cfg, stage)
    return None if record is None else record["output"]


def resolve(cfg: PipelineConfig, stage: str, value: str) -> str:
    if value == "@base":
        return cfg.base.path
    if value == "@previous":
        policy = [s for s in POLICY_STAGES if STAGES.index(s) < STAGES.index(stage)]
        if not policy:
            return cfg.base.path
        value = f"@{policy[-1]}"
    source = value[1:]
    if source not in STAGES:
        raise ConfigError(f"{stage}: {value!r} names no stage (stages: {', '.join(STAGES)}; or @base, @previous)")
    out = output_of(cfg, source)
    if out is None:
        raise ConfigError(f"{stage} needs the output of {source}, which has not finished (run it, or set the "
                          f"value that says {value!r} to a path)")
    return out


def stage_config(cfg: PipelineConfig, stage: str):
    """The stage's typed config, with "@..." references replaced by paths and the pipeline's run dir and seed."""
    node = OmegaConf.structured(getattr(cfg, stage))

    def walk(n):
        for key in range(len(n)) if OmegaConf.is_list(n) else list(n.keys()):
            v = n[key]
            if OmegaConf.is_config(v):
                walk(v)
            elif isinstance(v, str) and v.startswith("@"):
                n[key] = resolve(cfg, stage, v)

    walk(node)
    out = stage_dir(cfg, stage)
    if stage == "rejection_sampling":
        node.out, node.seed = str(out / "dataset.jsonl"), node.seed + cfg.seed
    else:
        node.log.run_dir = str(out)
        node.train.seed = node.train.seed + cfg.seed
    return OmegaConf.to_object(node)


def eval_config(cfg: PipelineConfig, model: str, out: Path) -> EvalConfig:
    node = OmegaConf.structured(cfg.eval)
    node.model, node.out = model, str(out)
    rm = node.rewards.reward_model
    if isinstance(rm, str) and rm.startswith("@"):
        node.rewards.reward_model = output_of(cfg, rm[1:])  # None until the reward model exists
    return OmegaConf.to_object(node)


# ----------------------------------------------------------------------------------------------------------
# Running a stage


def run_module(module: str, config, yaml_path: Path, log_path: Path, threads: int = 0,
               launcher: list[str] = (), seconds_path: Path | None = None) -> list[float]:
    """`python -m module yaml_path` (or `launcher -m module yaml_path`) in a fresh process that dies with this one,
    output to log_path. Returns the seconds of each process that ran it: those recorded in `seconds_path`, then this
    one's, which it adds there (every TICK_S while it runs). Raises RunError on failure."""
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(to_yaml(config))
    command = [*(launcher or [sys.executable]), "-m", module, str(yaml_path)]
    print(f"    $ {' '.join(['python', *command[1:]] if not launcher else command)}   (log: {log_path})", flush=True)
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    earlier = read_record(seconds_path, then="earlier processes are not counted") if seconds_path else None
    earlier = earlier["processes"] if earlier else []
    t0 = time.time()

    def save_seconds() -> list[float]:
        processes = [*earlier, time.time() - t0]
        if seconds_path:
            write_atomic(seconds_path, json.dumps({"processes": processes}))
        return processes

    with open(log_path, "a") as log:
        proc = start_child(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = wait(proc, save_seconds)
        finally:
            stop_child(proc)  # when this process is stopped by an exception (Ctrl-C): the stage stops too
    processes = save_seconds()
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        raise RunError(f"{module} failed (exit {code}): {tail[0]} -- full log: {log_path}; rerun the pipeline "
                       f"to resume")
    return processes


def wait(proc: subprocess.Popen, every_tick) -> int:
    """proc's exit code, calling every_tick() each TICK_S seconds until it ends."""
    while True:
        try:
            return proc.wait(TICK_S)
        except subprocess.TimeoutExpired:
            every_tick()


def stage_output(cfg: PipelineConfig, stage: str, config) -> str:
    out = stage_dir(cfg, stage)
    if stage in ("reward_model", "process_reward_model"):
        return str(out / "final")
    if stage == "rejection_sampling":
        return config.out
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        raise RunError(f"{stage} ended without error but produced no checkpoint in {out / 'checkpoints'} (did it "
                       f"train? see {out / 'stage.log'})")
    if config.model.lora is not None:  # its checkpoint is an adapter: the next stages get it merged into the base
        return str(export_merged(checkpoint, out / "merged", config.model.trust_remote_code).resolve())
    return str(checkpoint.resolve())


def evaluate_model(cfg: PipelineConfig, name: str, model: str) -> dict:
    out = Path(cfg.run_dir) / "eval" / f"{name}.json"
    results = read_record(out, then="evaluating again")
    if results is None:
        config = eval_config(cfg, model, out)
        run_module("fastgrpo.evaluate", config, out.with_suffix(".yaml"), out.with_suffix(".log"), cfg.threads)
        results = json.loads(out.read_text())
    return results


def run_stage(cfg: PipelineConfig, stage: str) -> dict:
    record = finished(cfg, stage)
    if record is not None:
        print(f"  {stage}: finished earlier, skipped", flush=True)
        return record
    print(f"  {stage}:", flush=True)
    config = stage_config(cfg, stage)
    launcher = cfg.launcher if MODULES[stage] in ("fastgrpo.sft", "fastgrpo.grpo") else []
    folder = stage_dir(cfg, stage)
    processes = run_module(MODULES[stage], config, folder / "stage.yaml", folder / "stage.log", cfg.threads,
                           launcher, seconds_path=folder / SECONDS_FILE)
    seconds = sum(processes)
    record = {"stage": stage, "output": stage_output(cfg, stage, config), "seconds": seconds,
              "processes": len(processes)}
    write_atomic(folder / "DONE.json", json.dumps(record, indent=1))
    print(f"    done in {seconds:.0f} s -> {record['output']}", flush=True)
    return record


def build_base(cfg: PipelineConfig) -> None:
    path = Path(cfg.base.path)
    if path.exists():
        return
    if not cfg.base.tiny:
        raise ConfigError(f"base.path={cfg.base.path!r} does not exist (set base.tiny=true to build a tiny model)")
    from .tiny import build_tiny_model

    build_tiny_model(path, hidden=cfg.base.hidden, layers=cfg.base.layers, intermediate=2 * cfg.base.hidden,
                     seed=cfg.base.seed + cfg.seed)


# ----------------------------------------------------------------------------------------------------------
# Results


COLUMNS = [("pass@1", "pass@1"), ("maj@k", None), ("format", "format"), ("reward", "reward"),
           ("helpfulness", "helpfulness"), ("preferred", "preferred"), ("length", "length")]


def results_table(rows: list[tuple[str, dict, float | None]], k: int) -> str:
    """A markdown table: one row per evaluated model."""
    head = ["stage", *[name.replace("maj@k", f"maj@{k}") for name, _ in COLUMNS], "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "--:|" * (len(head) - 1)]
    for name, ev, seconds in rows:
        cells = []
        for column, key in COLUMNS:
            value = ev.get(key or f"maj@{k}")
            cells.append("" if value is None else f"{value:.1f}" if column == "length" else f"{value:.3f}")
        cells.append("" if seconds is None else f"{seconds / 60:.1f}")
        lines.append(f"| {TABLE_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(cfg: PipelineConfig, rows: list[tuple[str, dict, float | None]]) -> None:
    """Each stage's training curves, and pass@1 / helpfulness across stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import plot_metrics, read_metrics

    plots = Path(cfg.run_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    curves = {"sft": ["loss"], "grpo": ["reward/mean", "reward/accuracy_reward", "reward/format_reward",
                                        "reward/reward_model", "completion/length_mean", "loss/kl"]}
    for stage in cfg.stages:
        kind = "grpo" if MODULES[stage] == "fastgrpo.grpo" else "sft" if MODULES[stage] == "fastgrpo.sft" else None
        if kind and (stage_dir(cfg, stage) / "metrics.jsonl").exists():
            logged = {k for row in read_metrics(stage_dir(cfg, stage)) for k in row}
            keys = [k for k in curves[kind] if k in logged]
            if keys:
                plot_metrics(stage_dir(cfg, stage), keys, plots / f"{stage}.png")
    names = [TABLE_NAMES.get(n, n) for n, _, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, key in zip(axes, ["pass@1", "helpfulness"]):
        ax.bar(range(len(rows)), [ev.get(key) or 0.0 for _, ev, _ in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"held-out {key}")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(plots / "stages.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------


def run(cfg: PipelineConfig) -> str:
    """Run (or resume) the configured stages; returns the results table."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown {unknown}; the stages are {', '.join(STAGES)}")
    t0 = time.time()
    run_dir = Path(cfg.run_dir)
    lock_run_dir(run_dir)
    (run_dir / "pipeline.yaml").write_text(to_yaml(cfg))
    build_base(cfg)
    print(f"R1 pipeline in {run_dir}: {', '.join(cfg.stages)}", flush=True)
    for stage in STAGES:
        if stage in cfg.stages:
            record = run_stage(cfg, stage)
            if stage in POLICY_STAGES:
                evaluate_model(cfg, stage, record["output"])
    rows = [("base", evaluate_model(cfg, "base", cfg.base.path), None)]
    for stage in POLICY_STAGES:
        record = finished(cfg, stage)
        if record is not None:
            seconds = record["seconds"]
            if stage == "sft" and (sampled := finished(cfg, "rejection_sampling")):
                seconds += sampled["seconds"]
            rows.append((stage, evaluate_model(cfg, stage, record["output"]), seconds))
    table = results_table(rows, cfg.eval.k)
    note = (f"Held-out evaluation: {cfg.eval.data.eval_examples} reasoning prompts ({cfg.eval.data.source}) and as "
            f"many general ones ({cfg.eval.data.general_source}), k={cfg.eval.k} samples each at temperature "
            f"{cfg.eval.temperature}; pipeline seed {cfg.seed}; total {(time.time() - t0) / 60:.1f} min.")
    (run_dir / "RESULTS.md").write_text(f"# R1 pipeline: {run_dir}\n\n{table}\n\n{note}\n")
    plot(cfg, rows)
    print(f"\n{table}\n\n{note}\nResults: {run_dir / 'RESULTS.md'}, plots: {run_dir / 'plots'}", flush=True)
    return table


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(__doc__, PipelineConfig))
        return
    from .metrics import outputs_progress
    from .runs import pipeline_summary

    cfg = load_cli_config(PipelineConfig, argv)
    t0 = time.time()
    with outputs_progress({s: stage_dir(cfg, s) / "DONE.json" for s in STAGES if s in cfg.stages}, "pipeline"):
        run(cfg)
    print(pipeline_summary(cfg, time.time() - t0), flush=True)


if __name__ == "__main__":
    command_line(main)
