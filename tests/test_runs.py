"""Run directories and command lines (fastgrpo.runs): one writer per run dir, records written whole, model paths
that fail at once, and every entry point reporting bad input in one line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest

from fastgrpo.config import ConfigError, GRPOConfig, LogConfig, ModelConfig
from fastgrpo.metrics import MetricsLogger
from fastgrpo.runs import RunError, check_model_path, command_line, lock_run_dir, read_record, write_atomic
from fastgrpo.tiny import build_tiny_model

ROOT = Path(__file__).parents[1]
HOLD = "import sys; from fastgrpo.runs import lock_run_dir; lock_run_dir(sys.argv[1]); print('locked', flush=True); " \
       "sys.stdin.read()"


def test_a_run_dir_has_one_writer_until_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunError, match=re.escape(f"run dir {tmp_path} is in use by process {holder.pid} ")):
            lock_run_dir(tmp_path)
        with pytest.raises(RunError, match=re.escape(f"run dir {tmp_path} is in use by process {holder.pid} ")):
            MetricsLogger(tmp_path, tensorboard=False)  # what trainers write through, whoever calls it
    finally:
        holder.kill()
        holder.wait()
    lock_run_dir(tmp_path)  # the kernel dropped the lock with its holder: nothing stale to clean up
    lock_run_dir(tmp_path)  # taking it again in the same process is no conflict
    MetricsLogger(tmp_path, tensorboard=False).close()


def test_records_are_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    path = tmp_path / "DONE.json"
    write_atomic(path, '{"seconds": 1}')
    assert read_record(path, then="x") == {"seconds": 1}

    def killed(*args):
        raise KeyboardInterrupt  # the process stopped between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, '{"seconds": 2}')
    monkeypatch.undo()
    assert read_record(path, then="x") == {"seconds": 1} and [p.name for p in tmp_path.iterdir()] == ["DONE.json"]

    for text, problem in [("", "is empty"), ('{"seconds": ', "is not JSON (Expecting value: line 1 column 13"),
                          ("[1]", "holds a list, not a JSON object")]:
        path.write_text(text)
        assert read_record(path, then="the stage runs again") is None
        err = capsys.readouterr().err
        assert err.startswith(f"warning: {path} {problem}") and err.endswith(": the stage runs again\n"), err


def test_a_model_path_that_cannot_exist_fails_at_once(tmp_path, monkeypatch):
    check_model_path(str(tmp_path), "model.path")  # a folder: left to transformers
    check_model_path("Qwen/Qwen2.5-0.5B", "model.path")  # a hub name, online: left to transformers
    for path in [str(tmp_path / "nope"), "./nope", "../nope", "~/nope", "runs/tiny/nope"]:
        with pytest.raises(ConfigError, match=re.escape(f"model.path={path!r} does not exist")):
            check_model_path(path, "model.path")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match="read as a local path, since runs/ exists here"):
        check_model_path("runs/nope", "model.path")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="not in the Hugging Face cache"):
        check_model_path("someone/not-cached-model", "rewards.reward_model")


def test_every_trainer_checks_its_model_path_before_loading(tmp_path):
    from fastgrpo import grpo, rejection, reward_model, sft
    from fastgrpo.evaluate import EvalConfig, evaluate
    from fastgrpo.rejection import RejectionConfig

    missing = str(tmp_path / "missing")
    model, log = ModelConfig(path=missing), LogConfig(run_dir=str(tmp_path / "run"))
    runs = [lambda: grpo.train(GRPOConfig(model=model, log=log)),
            lambda: sft.train(sft.SFTConfig(model=model, log=log)),
            lambda: reward_model.train(reward_model.RewardModelConfig(model=model, log=log)),
            lambda: rejection.run(RejectionConfig(model=missing, out=str(tmp_path / "run" / "d.jsonl")))]
    for run in runs:
        with pytest.raises(ConfigError, match=re.escape(f"={missing!r} does not exist")):
            run()
    cfg = EvalConfig(model=str(tmp_path))
    cfg.data.general_source, cfg.rewards.reward_model = "builtin:assist", missing
    with pytest.raises(ConfigError, match=re.escape(f"rewards.reward_model={missing!r} does not exist")):
        evaluate(cfg)


def start(module: str, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})


def test_every_entry_point_reports_bad_input_in_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1\n")
    base = tmp_path / "base"
    build_tiny_model(base)
    lock_run_dir(tmp_path / "locked")
    # One process per entry point, all at once: each spends its few seconds importing torch and transformers.
    cases = {m: (start(f"fastgrpo.{m}", broken), f"config file {broken}, line 3, column 1: ")
             for m in ["reward_model", "evaluate", "rejection", "pipeline"]}
    cases["sft"] = (start("fastgrpo.sft", ROOT / "configs/sft_tiny.yaml", f"model.path={tmp_path}/x"),
                    f"model.path='{tmp_path}/x' does not exist")
    cases["grpo"] = (start("fastgrpo.grpo", ROOT / "configs/grpo_tiny.yaml", f"model.path={base}",
                           f"log.run_dir={tmp_path / 'locked'}"),
                     f"run dir {tmp_path / 'locked'} is in use by process {os.getpid()} ")
    for name, (proc, expected) in cases.items():
        _, err = proc.communicate(timeout=300)
        assert (proc.returncode, err.count("\n")) == (2, 1), (name, err[-2000:])
        assert err.startswith("error: ") and expected in err, (name, err)


def test_a_traceback_only_for_bugs_or_when_asked_for(monkeypatch, capsys):
    def bad_input():
        raise ConfigError("config error in x.yaml: bad")

    def bug():
        raise KeyError("a bug")

    with pytest.raises(SystemExit) as exit_:
        command_line(bad_input)
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: config error in x.yaml: bad\n"
    with pytest.raises(KeyError):
        command_line(bug)
    monkeypatch.setenv("FASTGRPO_DEBUG", "1")
    with pytest.raises(ConfigError):
        command_line(bad_input)
