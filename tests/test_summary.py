"""What a run shows a user at its end (fastgrpo.runs' summaries) and while it runs (progress bars): each entry point's
last screen names its output and a command that runs as printed; sampling in chunks for its bar keeps every sample."""

import json
import shlex
import threading
import time

import pytest

from fastgrpo.metrics import outputs_progress
from fastgrpo.runs import pipeline_summary, trend
from fastgrpo.tiny import build_tiny_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


def section(out: str, heading: str) -> dict[str, str]:
    """{name: value} of one section ("output:", "next:") of a printed summary."""
    lines = out[out.index(f"\n{heading}:\n") + len(heading) + 3:].splitlines()
    rows = {}
    for line in lines:
        if not line.startswith("  "):
            break
        name, _, value = line.strip().partition("  ")
        rows[name] = value.strip()
    return rows


def run_printed(command: str, main) -> None:
    """Run a printed `python -m MODULE ARGS...` line in this process, through the module's own main()."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    main(argv[3:])


SFT = ["log.tensorboard=false", "data.num_examples=32", "data.max_length=64", "train.sequences_per_step=4",
       "train.micro_batch_tokens=256", "log.save_every=100"]
GRPO = ["log.tensorboard=false", "data.num_examples=16", "data.max_prompt_length=32", "generation.backend=hf",
        "generation.num_generations=2", "generation.max_completion_length=8", "train.prompts_per_step=2",
        "log.save_every=100"]


@pytest.mark.parametrize("module,overrides", [("sft", SFT), ("grpo", GRPO)])
def test_the_summary_names_the_checkpoint_and_a_command_that_trains_it_further(model_path, tmp_path, capsys,
                                                                               module, overrides):
    from importlib import import_module

    main = import_module(f"fastgrpo.{module}").main
    run_dir = tmp_path / "run"
    main([f"model.path={model_path}", f"log.run_dir={run_dir}", "train.steps=1", *overrides])
    out = capsys.readouterr().out
    assert f"== {module}: 1 steps" in out, out
    checkpoint = run_dir / "checkpoints" / "step-00000001"
    assert section(out, "output")["checkpoint"] == str(checkpoint) and checkpoint.is_dir()
    metrics = section(out, "metrics")
    assert ("loss" if module == "sft" else "reward/mean") in metrics and " -> " in next(iter(metrics.values()))
    commands = section(out, "next")
    assert shlex.split(commands["evaluate"])[:4] == ["python", "-m", "fastgrpo.evaluate", str(checkpoint)]

    run_printed(commands["train further"], main)  # the same run dir: it resumes at step 1, it does not start over
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1]
    assert section(capsys.readouterr().out, "output")["checkpoint"] == str(run_dir / "checkpoints" / "step-00000002")


def test_evaluate_prints_its_scores_and_a_command_that_repeats_it(model_path, tmp_path, capsys):
    from fastgrpo.evaluate import main

    out_file = tmp_path / "eval.json"
    main([model_path, "backend=hf", "k=2", "data.eval_examples=3", "max_completion_length=8", f"out={out_file}"])
    out = capsys.readouterr().out
    scores = section(out, "metrics")
    assert float(scores["pass@1"]) == pytest.approx(json.loads(out_file.read_text())["pass@1"], abs=1e-3)
    assert section(out, "output")["results"] == str(out_file)
    out_file.unlink()
    run_printed(section(out, "next")["repeat"], main)
    assert section(capsys.readouterr().out, "metrics") == scores and out_file.is_file()


def test_chunked_sampling_keeps_every_samples_seed(model_path, monkeypatch):
    """sample() splits the prompts into chunks for its progress bar: the samples must be those of one call."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastgrpo import evaluate
    from fastgrpo.generation import HFGenerator, SamplingConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    generator = HFGenerator(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    prompts = [f"{a}+{b}=" for a, b in [(12, 34), (5, 67), (89, 1), (40, 40), (3, 3)]]
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=8, seed=11)
    whole = evaluate.sample(generator, tokenizer, prompts, sampling)
    monkeypatch.setattr(evaluate, "SEQUENCES_PER_CHUNK", 6)  # two prompts per chunk: chunks of 2, 2 and 1
    assert evaluate.sample(generator, tokenizer, prompts, sampling) == whole
    assert len(whole) == 5 and all(len(group) == 3 for group in whole)


class Terminal:
    """One stream of a terminal: stdout and stderr are two of them, writing to one screen, as in a process."""

    def __init__(self, screen: list):
        self.screen = screen

    def write(self, text):
        self.screen.append(text)
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_the_stage_bar_counts_the_records_other_processes_write(tmp_path, monkeypatch):
    screen = []
    monkeypatch.setattr("sys.stderr", Terminal(screen))  # tqdm draws on stderr, when it is a terminal
    monkeypatch.setattr("sys.stdout", Terminal(screen))  # and prints land on the same screen
    records = {name: tmp_path / name / "DONE.json" for name in ("first", "second", "third")}
    records["first"].parent.mkdir()
    records["first"].write_text("{}")

    def finish_second():
        time.sleep(0.1)
        records["second"].parent.mkdir()
        records["second"].write_text("{}")

    writer = threading.Thread(target=finish_second)
    with outputs_progress(records, "pipeline", poll_s=0.02):
        assert "1/3" in "".join(screen) and "second" in "".join(screen)
        writer.start()
        writer.join()
        time.sleep(0.2)
        print("a stage's", "line")
        time.sleep(0.05)
    drawn = "".join(screen)
    assert "2/3" in drawn and "third" in drawn and drawn.endswith("\n")  # closed: the next line starts clean
    before, after = drawn.split("a stage's line\n")
    assert before.endswith("\r") and "2/3" in after  # the bar was lifted off its line, then drawn again below


def test_the_pipeline_summary_names_the_results_the_model_and_the_rerun(tmp_path):
    from fastgrpo.config import load_config
    from fastgrpo.pipeline import PipelineConfig

    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path}", f"base.path={tmp_path}/base",
                                               "stages=[cold_start,reasoning_rl]"])
    model = tmp_path / "reasoning_rl" / "checkpoints" / "step-00000009"
    for stage, output in [("cold_start", tmp_path / "cold"), ("reasoning_rl", model)]:
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "DONE.json").write_text(json.dumps({"stage": stage, "output": str(output)}))
    (tmp_path / "eval").mkdir()
    for name, score in [("base", 0.01), ("reasoning_rl", 0.75)]:
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps({"pass@1": score}))
    out = pipeline_summary(cfg, 90)
    assert out.startswith("== pipeline: 2 of 2 stages done")
    assert section(out, "output")["model"] == f"{model} (reasoning_rl)"
    assert section(out, "metrics")["pass@1"] == "0.01 -> 0.75 (base -> reasoning_rl)"
    commands = section(out, "next")
    assert commands["rerun (skips finished stages)"] == f"python -m fastgrpo.pipeline {tmp_path / 'pipeline.yaml'}"
    assert commands["reasoning_rl alone"] == f"python -m fastgrpo.grpo {tmp_path / 'reasoning_rl' / 'stage.yaml'}"
    assert commands["evaluate the model"] == f"python -m fastgrpo.evaluate {model}"


def test_trend_averages_the_first_and_last_tenth_and_expands_patterns():
    history = [{"step": i, "reward/mean": float(i), "reward/accuracy": 1.0, "loss": float("nan")} for i in range(40)]
    assert trend(history, ["reward/*", "loss", "absent"]) == {"reward/mean": "1.5 -> 37.5",
                                                             "reward/accuracy": "1 -> 1"}


def test_the_rejection_summary_gives_an_sft_command_on_the_dataset(tmp_path):
    """Its keys are SFTConfig's: the printed command parses (running it is an SFT run like the ones above)."""
    from fastgrpo.config import load_cli_config
    from fastgrpo.rejection import RejectionConfig
    from fastgrpo.runs import dataset_summary
    from fastgrpo.sft import SFTConfig

    cfg = RejectionConfig(model=str(tmp_path / "rl"), out=str(tmp_path / "rs" / "dataset.jsonl"))
    result = {"rows": 10, "reasoning_rows": 7, "general_rows": 3, "prompts": 5,
              "counts": {"sampled": 16, "kept": 7, "wrong": 9}}
    out = dataset_summary(result, cfg)
    assert section(out, "output")["dataset"] == cfg.out
    assert section(out, "metrics")["samples kept"] == "7"
    argv = shlex.split(section(out, "next")["SFT on it"])
    assert argv[:3] == ["python", "-m", "fastgrpo.sft"]
    sft = load_cli_config(SFTConfig, argv[3:])
    assert (sft.model.path, sft.data.source, sft.log.run_dir) == (cfg.model, cfg.out, str(tmp_path / "rs" / "sft"))
