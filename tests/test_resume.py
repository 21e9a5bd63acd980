"""What a run writes and what a resume accepts: environment values never land in a run's files, a resumed run
applies the changes it can (and says so) and refuses the others by name."""

import pytest

from fastgrpo.config import ConfigError, GRPOConfig, load_cli_config, load_config, to_yaml, write_run_config
from fastgrpo.pipeline import PipelineConfig, stage_config
from fastgrpo.sft import SFTConfig
from fastgrpo.tiny import build_tiny_model

SECRET = "hf_s3cr3t-t0ken"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


def test_environment_values_are_written_as_interpolations(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTGRPO_TEST_TOKEN", SECRET)
    path = tmp_path / "grpo.yaml"
    path.write_text("model: {path: /models/m}\n"
                    "log: {wandb_project: '${oc.env:FASTGRPO_TEST_TOKEN}', run_dir: 'runs/${log.wandb_project}'}\n")
    cfg = load_config(GRPOConfig, path)
    assert cfg.log.wandb_project == SECRET and cfg.log.run_dir == f"runs/{SECRET}"  # the run sees the values
    write_run_config(tmp_path / "run", cfg, resuming=False, may_change=())
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert SECRET not in written and "${oc.env:FASTGRPO_TEST_TOKEN}" in written
    assert load_config(GRPOConfig, tmp_path / "run" / "config.yaml").log.wandb_project == SECRET  # reruns as it ran

    # the pipeline's files: pipeline.yaml and each stage's stage.yaml (which its own process reads the value into)
    path = tmp_path / "r1.yaml"
    path.write_text("base: {path: /models/base}\n"
                    "launcher: [torchrun, '--rdzv-endpoint=${oc.env:FASTGRPO_TEST_TOKEN}']\n"
                    "cold_start: {log: {wandb_project: '${oc.env:FASTGRPO_TEST_TOKEN}'}}\n")
    pipeline = load_cli_config(PipelineConfig, [str(path), f"run_dir={tmp_path / 'r1'}"])
    assert pipeline.launcher[1] == f"--rdzv-endpoint={SECRET}"
    assert SECRET not in to_yaml(pipeline)
    stage = stage_config(pipeline, "cold_start")
    assert stage.log.wandb_project == SECRET and SECRET not in to_yaml(stage)
    assert "${oc.env:FASTGRPO_TEST_TOKEN}" in to_yaml(stage)


def test_resume_compares_the_saved_config(tmp_path, capsys):
    run_dir = tmp_path / "run"
    saved = load_config(SFTConfig, None, ["model.path=/m", f"log.run_dir={run_dir}"])
    write_run_config(run_dir, saved, resuming=False, may_change=())
    changed = load_config(SFTConfig, None, ["model.path=/m", f"log.run_dir={run_dir}", "train.steps=7",
                                            "data.seed=3", "model.path=/other"])
    with pytest.raises(ConfigError, match=r"cannot resume .*run with a changed model.path \('/m' -> '/other'\), "
                                          r"data.seed \(0 -> 3\): its checkpoints were trained with the values in"):
        write_run_config(run_dir, changed, resuming=True, may_change=("train.steps",))
    assert (run_dir / "config.yaml").read_text() == to_yaml(saved)  # a refused resume leaves it as it was
    allowed = load_config(SFTConfig, None, ["model.path=/m", f"log.run_dir={run_dir}", "train.steps=7"])
    write_run_config(run_dir, allowed, resuming=True, may_change=("train.steps",))
    assert "resume: train.steps changed from 100 to 7, applied" in capsys.readouterr().out
    assert (run_dir / "config.yaml").read_text() == to_yaml(allowed)


def sft_cfg(model_path, run_dir, *overrides):
    return load_config(SFTConfig, None, [
        f"model.path={model_path}", f"log.run_dir={run_dir}", "log.tensorboard=false", "data.num_examples=50",
        "data.max_length=64", "train.sequences_per_step=4", "train.micro_batch_tokens=256", "train.lr=3e-3",
        "log.save_every=1", *overrides])


def test_sft_resume_applies_lr_and_refuses_data_changes(model_path, tmp_path, capsys):
    from fastgrpo.sft import train

    train(sft_cfg(model_path, tmp_path, "train.steps=1"))
    with pytest.raises(ConfigError, match=r"data.source \('builtin:arithmetic' -> 'builtin:arithmetic3'\)"):
        train(sft_cfg(model_path, tmp_path, "train.steps=2", "data.source=builtin:arithmetic3"))
    history = train(sft_cfg(model_path, tmp_path, "train.steps=2", "train.lr=1e-4"))
    assert [h["lr"] for h in history] == [3e-3, 1e-4]  # the optimizer state's lr no longer wins
    assert "resume: train.lr changed from 0.003 to 0.0001, applied" in capsys.readouterr().out
    assert load_config(SFTConfig, tmp_path / "config.yaml").train.lr == 1e-4


def sevens(completions, **kwargs):
    return [c.count("7") / max(len(c), 1) for c in completions]


def test_grpo_resume_applies_lr_and_refuses_g_and_beta(model_path, tmp_path, capsys):
    from fastgrpo.grpo import train

    def cfg(*overrides):
        return load_config(GRPOConfig, None, [
            f"model.path={model_path}", f"log.run_dir={tmp_path}", "log.tensorboard=false", "data.num_examples=16",
            "data.max_prompt_length=32", "generation.backend=hf", "generation.num_generations=4",
            "generation.max_completion_length=8", "train.prompts_per_step=2", "train.lr=3e-3", *overrides])

    train(cfg("train.steps=1"), reward_funcs=[sevens])
    with pytest.raises(ConfigError, match=r"changed generation.num_generations \(4 -> 2\), loss.beta \(0.0 -> 0.04\)"):
        train(cfg("train.steps=2", "generation.num_generations=2", "loss.beta=0.04"), reward_funcs=[sevens])
    history = train(cfg("train.steps=2", "train.lr=1e-4"), reward_funcs=[sevens])
    assert [h["lr"] for h in history] == [3e-3, 1e-4]  # the scheduler state's lr no longer wins
    out = capsys.readouterr().out
    assert "resume: train.steps changed from 1 to 2, applied" in out and "train.lr changed" in out
