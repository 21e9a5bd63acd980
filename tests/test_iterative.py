"""Iterative RL (fastgrpo/iterative.py): the reward model learns from the policy's samples, with replay, and a run
killed with SIGKILL resumes to what the uninterrupted run computes."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgrpo.config import GRPOConfig, RewardModelUpdatesConfig, load_config
from fastgrpo.iterative import RewardModelLearner
from fastgrpo.rewards import RewardModelReward

ROOT = Path(__file__).parents[1]


def sevens(completions, **kwargs):
    """The rule reward the pairs come from: the share of '7' characters."""
    return [c.count("7") / max(len(c), 1) for c in completions]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import Qwen2ForSequenceClassification

    from fastgrpo.tiny import build_tiny_model, char_tokenizer, tiny_config

    root = tmp_path_factory.mktemp("iterative")
    policy = build_tiny_model(root / "policy")
    tok = char_tokenizer()
    config = tiny_config(vocab_size=len(tok), hidden=64, intermediate=128)
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return str(policy), str(root / "rm")


def learner(rm_path, **updates):
    cfg = RewardModelUpdatesConfig(every=1, **updates)
    return RewardModelLearner(RewardModelReward(rm_path), cfg, judge=[0], judge_weights=[1.0], seed=0)


def test_pairs_come_from_the_rule_rewards(models):
    nan = math.nan
    per_func = torch.tensor([[1.0, 9.0], [0.0, 9.0], [1.0, 9.0], [nan, 9.0],  # group 0: two right, one wrong
                             [0.2, 0.0], [0.7, 0.0], [0.7, 0.0], [0.1, 0.0]])  # group 1: scores, not right/wrong
    texts = [f"c{i}" for i in range(8)]
    verifier = learner(models[1], source="verifier")
    verifier.observe(["p"] * 8, texts, per_func, G=4)
    encode = verifier.encode
    # right (> 0.5) over wrong, zipped in order within each group
    assert verifier.recent == [(encode("p", "c0"), encode("p", "c1")), (encode("p", "c5"), encode("p", "c4")),
                               (encode("p", "c6"), encode("p", "c7"))]
    preferences = learner(models[1], source="preferences")
    preferences.observe(["p"] * 8, texts, per_func, G=4)  # best over worst; the first of a tie
    assert preferences.recent == [(encode("p", "c0"), encode("p", "c1")), (encode("p", "c5"), encode("p", "c7"))]
    with pytest.raises(ValueError, match="source='votes'"):
        learner(models[1], source="votes")


def test_an_update_learns_the_pairs_and_replays_older_ones(models):
    rm = learner(models[1], steps=10, pairs_per_step=8, replay_fraction=0.25, lr=3e-3)
    chosen, rejected = "7777", "abcd"
    rm.observe(["p", "p"], [chosen, rejected], torch.tensor([[1.0], [0.0]]), G=2)
    before = rm.reward(prompts=["p", "p"], completions=[chosen, rejected])
    metrics = rm.update(step=0)
    after = rm.reward(prompts=["p", "p"], completions=[chosen, rejected])
    assert after[0] - after[1] > before[0] - before[1] + 0.5  # the reward function scores with the updated model
    assert metrics["reward_model/pairs_new"] == 1 and rm.recent == [] and len(rm.history) == 1
    # the next batch: 2 of 8 pairs replayed from the buffer, the rest from the step's new pairs
    rm.observe(["q", "q"], ["77", "xy"], torch.tensor([[1.0], [0.0]]), G=2)
    batch = rm._batch(__import__("random").Random(0))
    assert sum(pair in rm.history for pair in batch) == 2 and len(batch) == 8
    assert rm.update(step=1)["reward_model/pairs_replay"] == 1


def kill_mid_run(args: list[str], run_dir: Path, last: str) -> None:
    """`python -m fastgrpo.grpo ARGS`, killed with SIGKILL once its first checkpoint is written (before `last`)."""
    from fastgrpo.checkpoint import latest_checkpoint

    # as many threads as this process: a reduction split otherwise rounds differently from the resumed run's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "fastgrpo.grpo", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while latest_checkpoint(run_dir) is None:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(run_dir).name < last  # killed mid-run


def run_args(models, run_dir, steps):
    policy, rm = models
    return [f"model.path={policy}", f"log.run_dir={run_dir}", "log.tensorboard=false", "log.save_every=2",
            "data.source=builtin:assist", "data.answer_column=response", "data.num_examples=64", "data.max_prompt_length=48", "generation.backend=hf",
            "generation.num_generations=4", "generation.max_completion_length=12", "train.prompts_per_step=4",
            f"train.steps={steps}", "train.lr=3e-3", "rewards.funcs=[test_iterative:sevens,reward_model]",
            "rewards.weights=[1.0,1.0]", f"rewards.reward_model={rm}", "rewards.reward_model_updates.every=2",
            "rewards.reward_model_updates.steps=2", "rewards.reward_model_updates.pairs_per_step=4",
            "rewards.reward_model_updates.source=preferences", "rewards.reward_model_updates.lr=1e-3"]


def untimed(history):
    return [{k: v for k, v in h.items() if not k.startswith("time") and k not in ("tokens_per_s", "peak_memory_mib")}
            for h in history]


def test_a_killed_run_resumes_to_the_uninterrupted_one(models, tmp_path, monkeypatch):
    from fastgrpo.checkpoint import latest_checkpoint, load_checkpoint
    from fastgrpo.grpo import train

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    straight = train(load_config(GRPOConfig, None, run_args(models, tmp_path / "straight", 6)))
    assert {"reward_model/loss", "reward_model/pairs_new"} <= set(straight[1]) and "reward_model/loss" not in straight[0]
    assert all(math.isfinite(h["reward/reward_model"]) for h in straight)  # the learning model scores the rollouts

    killed = tmp_path / "killed"
    kill_mid_run(run_args(models, killed, 6), killed, last="step-00000006")
    resumed = train(load_config(GRPOConfig, None, run_args(models, killed, 6)))
    assert untimed(resumed) == untimed(straight)
    a, b = (load_checkpoint(latest_checkpoint(d))["reward_model_learner"] for d in (tmp_path / "straight", killed))
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert a["history"] == b["history"] and len(a["history"]) > 0
    first = RewardModelReward(models[1]).model.state_dict()
    assert any(not torch.equal(first[k], a["weights"][k]) for k in first)  # the reward model did learn


def test_updates_need_a_reward_model_and_a_judge(models, tmp_path):
    from fastgrpo.grpo import train

    args = run_args(models, tmp_path / "a", 1)
    with pytest.raises(ValueError, match=r"add reward_model \(or process_reward_model\) to rewards.funcs"):
        train(load_config(GRPOConfig, None, [*args, "rewards.funcs=[test_iterative:sevens]", "rewards.weights=[1.0]"]))
    with pytest.raises(ValueError, match="labels samples by the accuracy reward"):
        train(load_config(GRPOConfig, None, [*args[:-2], f"log.run_dir={tmp_path / 'b'}",
                                             "rewards.reward_model_updates.source=verifier"]))


@pytest.fixture(scope="module")
def prm_path(tmp_path_factory):
    from transformers import Qwen2ForTokenClassification

    from fastgrpo.tiny import char_tokenizer, tiny_config

    path = tmp_path_factory.mktemp("prm")
    tok = char_tokenizer()
    config = tiny_config(vocab_size=len(tok), hidden=64, intermediate=128)
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(0)
    Qwen2ForTokenClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def digit_labels(steps, **kwargs):
    """Step labels a random policy's text varies in: whether the step holds a digit."""
    return [[float(any(ch.isdigit() for ch in step)) for step in completion] for completion in steps]


def prm_args(models, prm, run_dir, steps):
    policy, _ = models
    return [f"model.path={policy}", f"log.run_dir={run_dir}", "log.tensorboard=false", "log.save_every=2",
            "data.num_examples=64", "data.max_prompt_length=32", "generation.backend=hf",
            "generation.num_generations=4", "generation.max_completion_length=24", "train.prompts_per_step=4",
            f"train.steps={steps}", "train.lr=3e-3", "rewards.funcs=[process_reward_model,accuracy]",
            "rewards.weights=[1.0,1.0]", f"rewards.process_reward_model={prm}",
            "rewards.step_pattern='[aeiou ]'", "rewards.reward_model_updates.every=2",
            "rewards.reward_model_updates.steps=2", "rewards.reward_model_updates.pairs_per_step=4",
            "rewards.reward_model_updates.labeler=test_iterative:digit_labels", "rewards.reward_model_updates.lr=1e-3"]


def test_a_process_reward_model_learns_the_labelers_steps(prm_path):
    from fastgrpo.iterative import ProcessRewardModelLearner
    from fastgrpo.prm import ProcessRewardModelReward
    from fastgrpo.rewards import ARITHMETIC_STEP_PATTERN
    from fastgrpo.steps import find_steps

    def make():
        cfg = RewardModelUpdatesConfig(every=1, steps=15, pairs_per_step=4, lr=3e-3, labeler="arithmetic_steps")
        return ProcessRewardModelLearner(ProcessRewardModelReward(prm_path), cfg, seed=0)

    learner = make()
    tok = learner.reward.tokenizer
    texts = ["<think>7+8=15 4+3+1=8</think>Answer: 85", "<think>7+8=16 4+3=7</think>Answer: 76", "hello"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    steps = [find_steps(tok, i, ARITHMETIC_STEP_PATTERN) for i in ids]
    learner.observe_steps(["47+38="] * 3, texts, ids, steps, {"answer": ["85"] * 3})
    assert [c.labels for c in learner.recent] == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]  # "hello": no labelled step
    assert learner.recent[0].ends == [len(learner.recent[0].ids) - len(ids[0]) + e for e in steps[0][1]]
    before = learner.reward(prompts=["47+38="] * 2, completions=texts[:2], completion_ids=ids[:2],
                            step_ends=[s[1] for s in steps[:2]])
    state = learner.state()
    metrics = learner.update(step=0)
    after = learner.reward(prompts=["47+38="] * 2, completions=texts[:2], completion_ids=ids[:2],
                           step_ends=[s[1] for s in steps[:2]])
    assert min(after[0]) > max(after[1]) and metrics["reward_model/train_accuracy"] > 0.5
    assert sum(after[0]) - sum(after[1]) > sum(before[0]) - sum(before[1])
    again = make()  # from the saved state (through the checkpoint's encoding), the same update
    from fastgrpo.checkpoint import _decode, _encode

    tensors = {}
    again.load_state(_decode(_encode(state, tensors, "state"), tensors))
    again.update(step=0)
    assert all(torch.equal(a, b) for a, b in zip(learner.reward.model.state_dict().values(),
                                                 again.reward.model.state_dict().values()))


def test_steps_the_labeler_abstains_on_get_the_unlabeled_label(prm_path):
    """Off-task text (the labeler's None) is skipped by default, and a wrong step with unlabeled=0.0."""
    from fastgrpo.iterative import ProcessRewardModelLearner
    from fastgrpo.prm import ProcessRewardModelReward
    from fastgrpo.rewards import ARITHMETIC_STEP_PATTERN
    from fastgrpo.steps import find_steps

    texts = ["<think>7+8=15 9 hello</think>Answer: 85", "hello hello"]
    labels = {}
    for unlabeled in (None, 0.0):
        cfg = RewardModelUpdatesConfig(every=1, labeler="arithmetic_steps", unlabeled=unlabeled)
        learner = ProcessRewardModelLearner(ProcessRewardModelReward(prm_path), cfg, seed=0)
        ids = [learner.reward.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        steps = [find_steps(learner.reward.tokenizer, i, ARITHMETIC_STEP_PATTERN) for i in ids]
        learner.observe_steps(["47+38="] * 2, texts, ids, steps, {"answer": ["85"] * 2})
        labels[unlabeled] = [[None if math.isnan(v) else v for v in c.labels] for c in learner.recent]
    assert labels[None] == [[1.0, None, 1.0]]  # "hello hello" has no labelled step: not a training chain
    assert labels[0.0] == [[1.0, 0.0, 1.0], [0.0]]


def test_a_run_with_a_learning_process_reward_model_resumes_exactly(models, prm_path, tmp_path, monkeypatch):
    from fastgrpo.grpo import train

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    straight = train(load_config(GRPOConfig, None, prm_args(models, prm_path, tmp_path / "straight", 4)))
    assert "reward_model/loss" in straight[1] and straight[0]["steps/per_completion_mean"] > 1
    train(load_config(GRPOConfig, None, prm_args(models, prm_path, tmp_path / "parts", 2)))
    resumed = train(load_config(GRPOConfig, None, prm_args(models, prm_path, tmp_path / "parts", 4)))
    assert untimed(resumed) == untimed(straight)
