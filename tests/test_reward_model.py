"""Reward-model training (R1 stage 4) on a tiny local model: held-out accuracy, scoring at RL time, no-op rerun,
exact resume of a killed run, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo import reward_model
from fastgrpo.checkpoint import latest_checkpoint
from fastgrpo.config import ConfigError, load_config
from fastgrpo.data import builtin_dataset
from fastgrpo.reward_model import RewardModelConfig, train
from fastgrpo.rewards import RewardModelReward
from fastgrpo.tiny import build_tiny_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


def make_cfg(model_path, run_dir, *overrides):
    return load_config(RewardModelConfig, None, [
        f"model.path={model_path}", f"log.run_dir={run_dir}", "log.tensorboard=false", "data.num_examples=400",
        "data.eval_examples=64", "data.max_length=96", "train.steps=50", "train.pairs_per_step=16",
        "train.lr=1e-3", *overrides,
    ])


@pytest.fixture(scope="module")
def trained(model_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rm")
    cfg = make_cfg(model_path, run_dir)
    return cfg, run_dir, train(cfg)


def test_learns_the_held_out_preferences(trained):
    cfg, run_dir, result = trained
    assert result["accuracy"] >= 0.9 and result["margin"] > 0, result
    assert result["pairs"] == 64
    assert json.loads((run_dir / "eval.json").read_text()) == result
    assert (run_dir / "final" / "model.safetensors").exists()
    assert not any(p.name.startswith(".tmp") for p in run_dir.iterdir())


def test_rl_time_scoring_prefers_chosen(trained):
    """RewardModelReward, as the RL stage loads it, ranks held-out pairs as the trainer's eval did."""
    cfg, run_dir, _ = trained
    held_out = builtin_dataset("assist", 32, cfg.data.seed, "eval")
    rm = RewardModelReward(run_dir / "final")
    chosen = rm(prompts=held_out["prompt"], completions=held_out["chosen"])
    rejected = rm(prompts=held_out["prompt"], completions=held_out["rejected"])
    wins = sum(c > r for c, r in zip(chosen, rejected))
    assert wins >= 0.9 * len(held_out), (chosen, rejected)


def test_rerunning_a_finished_run_is_a_no_op(trained):
    cfg, run_dir, result = trained
    weights = (run_dir / "final" / "model.safetensors").stat().st_mtime_ns
    assert train(cfg) == result
    assert (run_dir / "final" / "model.safetensors").stat().st_mtime_ns == weights


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(model_path, tmp_path,
                                                                                   monkeypatch):
    args = ("train.steps=4", "log.save_every=2", "train.pairs_per_step=4", "data.num_examples=64",
            "data.eval_examples=8")
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = train(make_cfg(model_path, straight_dir, *args))

    real_margins, calls = reward_model.margins, []

    def killed_at_the_fourth_step(*margin_args):  # one call per training step
        calls.append(len(calls))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_margins(*margin_args)

    monkeypatch.setattr(reward_model, "margins", killed_at_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(model_path, killed_dir, *args))
    monkeypatch.undo()
    assert latest_checkpoint(killed_dir).name == "step-00000002"  # step index 2 was done, and is lost

    assert train(make_cfg(model_path, killed_dir, *args)) == straight
    logged = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 2, 3]  # resumed at step 2, not from the start
    a, b = (load_file(d / "final" / "model.safetensors") for d in (straight_dir, killed_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (killed_dir / "checkpoints").exists()  # final/ holds what they held


def test_jsonl_source_and_bad_input(model_path, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"q": f"Greet {n}.", "good": f"Hello {n}!", "bad": "No."} for n in ("Ada", "Ben", "Cleo", "Dev")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = train(make_cfg(model_path, tmp_path / "run", f"data.source={path}", "data.prompt_column=q",
                            "data.chosen_column=good", "data.rejected_column=bad", "data.eval_examples=1",
                            "train.steps=1"))
    assert result["pairs"] == 1  # the file's last row is held out
    with pytest.raises(ValueError, match="no column 'chosen'"):
        train(make_cfg(model_path, tmp_path / "bad", f"data.source={path}", "data.prompt_column=q"))
    with pytest.raises(ValueError, match="fits data.max_length=3"):
        train(make_cfg(model_path, tmp_path / "short", "data.max_length=3"))
    with pytest.raises(ConfigError, match="pairs_per_stp"):
        make_cfg(model_path, tmp_path / "typo", "train.pairs_per_stp=8")
