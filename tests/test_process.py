"""Process supervision: steps found in completions, step rewards, per-token advantages through prepare and the loss,
and a process-supervised GRPO run (DeepSeekMath 4.1.3). The advantage op itself: tests/kernels/test_advantages.py."""

import math
import re

import pytest
import torch

from fastgrpo.data import decode
from fastgrpo.rewards import ARITHMETIC_STEP_PATTERN, RewardError, arithmetic_step_reward, compute_rewards
from fastgrpo.steps import find_steps, split_steps
from fastgrpo.tiny import build_tiny_model, char_tokenizer

COT = "<think>7+8=15 4+3+1=8</think>Answer: 85"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("process") / "model"))


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained here on arithmetic text, so tokens span several characters (and steps
    end inside them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [f"<think>{a}+{b}={a + b} {b}+{a}+1={a + b + 1}</think>Answer: {10 * a + b}" for a in range(10)
              for b in range(10)]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<pad>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>")


@pytest.mark.parametrize("make", [char_tokenizer, bpe_tokenizer], ids=["chars", "bpe"])
def test_a_step_ends_on_the_token_holding_its_last_character(make):
    tokenizer = make()
    ids = tokenizer(COT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    texts, ends = find_steps(tokenizer, ids, ARITHMETIC_STEP_PATTERN)
    assert texts == ["<think>7+8=15 ", "4+3+1=8</think>", "Answer: 85"]
    offsets = [end for _, end in split_steps(COT, ARITHMETIC_STEP_PATTERN)]
    for end, offset in zip(ends, offsets):
        # token `end` adds the step's last character: the prefix through it reaches the offset, the one before not
        assert len(decode(tokenizer, ids[:end + 1])) >= offset > len(decode(tokenizer, ids[:end]))
    assert ends[-1] == len(ids) - 2  # the last step ends on the answer's last token, before EOS
    if make is bpe_tokenizer:
        assert len(ids) < len(COT)  # the tokens do span several characters
    assert find_steps(tokenizer, [tokenizer.eos_token_id], ARITHMETIC_STEP_PATTERN) == ([], [])


def test_arithmetic_steps_are_checked_column_by_column():
    steps = [split_steps(t, ARITHMETIC_STEP_PATTERN) for t in (
        COT,  # right
        "<think>7+8=15 4+3=7</think>Answer: 75",  # the carry forgotten: the second column and the answer are wrong
        "<think>7+8=16 4+3+1=8 and</think>so</think>Answer: 85",  # the first column wrong; "so" is no step it scores
        "no steps here")]
    out = arithmetic_step_reward(["47+38="] * 4, ["-"] * 4, steps=[[t for t, _ in s] for s in steps],
                                 answer=["85"] * 4)
    assert out == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, None, 1.0], [None]]
    assert arithmetic_step_reward(["Say hi"], ["-"], steps=[["a ", "b"]], answer=["x"]) == [[None, None]]
    with pytest.raises(ValueError, match="needs the dataset column 'steps'"):
        arithmetic_step_reward(["47+38="], ["-"], answer=["85"])


def test_step_and_outcome_rewards_merge_on_their_tokens():
    def per_step(steps, **kwargs):
        return [[0.5] * len(s) if s else None for s in steps]

    def explicit(completions, **kwargs):
        return [[(0, 1.0), (2, None)], 2.0]

    def outcome(completions, **kwargs):
        return [1.0, None]

    ids = [[5, 6, 7, 8], [9, 9]]
    steps = [(["a", "b"], [1, 3]), ([], [])]
    scores = compute_rewards([per_step, explicit, outcome], [1.0, 2.0, 4.0], ["p"] * 2, ["c"] * 2, ids, {},
                             steps=steps)
    # completion 0: per_step at tokens 1 and 3, explicit at 0 (and an unscored step at 2), the outcome at 3
    assert scores.step_rewards[0][:2] == [(0, 2.0), (1, 0.5)] and math.isnan(scores.step_rewards[0][2][1])
    assert scores.step_rewards[0][3] == (3, 0.5 + 4.0)
    # completion 1: no steps (per_step says None: an outcome of None), explicit 2.0 as an outcome, outcome None
    assert scores.step_rewards[1] == [(1, 4.0)]
    assert scores.per_func[0].tolist() == [0.5, 1.0, 1.0]  # a process function's scalar: its steps' mean
    assert scores.rewards.tolist() == [0.5 + 2.0 + 4.0, 4.0]
    outcomes = compute_rewards([outcome], [1.0], ["p"] * 2, ["c"] * 2, ids, {}, steps=steps)
    assert outcomes.step_rewards is None  # outcome rewards alone: the per-completion path


@pytest.mark.parametrize("func, steps, match", [
    (lambda completions, **kw: [[1.0, 2.0]] * 2, None, r"returned step rewards, but the run finds no steps"),
    (lambda completions, **kw: [[1.0]] * 2, [(["a", "b"], [0, 1])] * 2, r"returned 1 step rewards for a completion "
                                                                        r"of 2 steps"),
    (lambda completions, **kw: [[(5, 1.0)]] * 2, None, r"returned a step ending outside its completion of 2 tokens"),
    (lambda completions, **kw: [[1.0, math.inf]] * 2, [(["a", "b"], [0, 1])] * 2, r"returned inf for completion 0"),
])
def test_malformed_step_rewards_are_named(func, steps, match):
    with pytest.raises(RewardError, match=r"^reward function '<lambda>' " + match):
        compute_rewards([func], [1.0], ["p"] * 2, ["c"] * 2, [[1, 2]] * 2, {}, steps=steps)


def written_out_advantages(step_rewards, lengths, G):
    """Each token: the sum over its completion's steps ending at or after it of (r - group mean) / (group std + eps)."""
    out = []
    for g in range(0, len(step_rewards), G):
        group = torch.tensor([r for s in step_rewards[g:g + G] for _, r in s if r == r], dtype=torch.float64)
        mean, std = group.mean(), group.std()
        assert group.numel() > 1 and group.max() > group.min()  # the rules for constant groups are tested elsewhere
        for steps, n in zip(step_rewards[g:g + G], lengths[g:g + G]):
            out.append(torch.tensor([sum((r - mean) / (std + 1e-4) for end, r in steps if end >= t and r == r)
                                     for t in range(n)], dtype=torch.float32))
    return out


def test_process_advantages_reach_their_tokens_across_micro_batches(model_path):
    """Per-token advantages of a rollout whose sequences are packed several to a micro-batch and spread over
    micro-batches land on the rows that predict their tokens, and the loss takes them; one step at the last token
    trains exactly as outcome rewards do."""
    from transformers import AutoModelForCausalLM

    from fastgrpo.config import GRPOConfig, load_config
    from fastgrpo.grpo import Rollout, optimize, prepare, rollout_advantages

    prompts = [[1, 10, 11], [1, 12], [1, 10, 11], [1, 12]]
    completions = [[20, 21, 22, 23, 24], [25, 26], [27, 28, 29], [30]]
    S, G = 4, 2
    steps = [[(1, 1.0), (4, 0.0)], [(0, float("nan")), (1, 1.0)], [(0, 0.0), (2, 1.0)], []]  # the last: no step
    rollout = Rollout(prompts, completions, [[-1.0] * len(c) for c in completions], torch.zeros(S, dtype=torch.bool),
                      torch.zeros(S), torch.zeros(S, 1), step_rewards=steps)
    cfg = load_config(GRPOConfig, None, [f"model.path={model_path}", "generation.num_generations=2",
                                         "train.micro_batch_tokens=9", "train.max_grad_norm=1e9"])
    advantages = rollout_advantages(rollout, cfg)
    expected = written_out_advantages(steps, [len(c) for c in completions], G)
    for got, want in zip(advantages, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    micro_batches, _, stats = prepare(model, None, rollout, advantages, cfg)
    assert stats["packing/num_micro_batches"] > 1 and any(len(mb.packed.seq_indices) > 1 for mb in micro_batches)
    for mb in micro_batches:
        assert mb.advantages is None
        want = torch.cat([expected[s] for s in mb.packed.seq_indices.tolist()])
        torch.testing.assert_close(mb.token_advantages, want, rtol=1e-5, atol=1e-6)

    # outcome rewards as one step at each completion's last token: the same step as the per-completion path
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0])
    outcome = Rollout(prompts, completions, rollout.sampling_logp, rollout.truncated, rewards, rewards[:, None])
    as_steps = Rollout(prompts, completions, rollout.sampling_logp, rollout.truncated, rewards, rewards[:, None],
                       step_rewards=[[(len(c) - 1, float(r))] for c, r in zip(completions, rewards)])
    loss_config = cfg.loss.to_kernel(cfg.generation.temperature, cfg.generation.max_completion_length)
    grads = []
    for r in (outcome, as_steps):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        grads.append(optimize(model, None, optimizer, r, rollout_advantages(r, cfg), loss_config, cfg)["grad_norm"])
    assert grads[1] == pytest.approx(grads[0], rel=1e-5) and grads[0] > 0


def digit_share_per_step(steps, **kwargs):
    """Each step's share of digits: varied within a group of random completions."""
    return [[sum(ch.isdigit() for ch in step) / len(step) for step in completion] for completion in steps]


def test_a_process_supervised_run_trains(model_path, tmp_path):
    """GRPO with a process reward (one value per step) and vLLM sampling: the steps are found and scored and the
    per-token advantages train the model."""
    from fastgrpo.config import GRPOConfig, load_config
    from fastgrpo.grpo import train

    cfg = load_config(GRPOConfig, "configs/grpo_tiny.yaml", [
        f"model.path={model_path}", f"log.run_dir={tmp_path / 'run'}", "train.steps=2", "train.prompts_per_step=2",
        "generation.num_generations=4", "generation.kv_cache_gib=0.05", "log.tensorboard=false",
        "rewards.step_pattern='[aeiou ]'"])
    history = train(cfg, reward_funcs=[digit_share_per_step])
    assert len(history) == 2
    for h in history:
        assert h["steps/per_completion_mean"] > 1  # random text: a step ends at every vowel and space
        assert math.isfinite(h["loss/entropy"]) and h["bad_updates"] == 0 and h["advantage/abs_mean"] > 0


def test_bad_step_patterns_are_named_before_anything_runs(model_path, tmp_path):
    from fastgrpo.config import ConfigError, GRPOConfig, load_config
    from fastgrpo.grpo import train

    with pytest.raises(ConfigError, match=r"^config error: the override 'rewards.step_pattern=\"\\d\"' is not valid "
                                          r"YAML \(found unknown escape character\)"):
        load_config(GRPOConfig, None, ['rewards.step_pattern="\\d"'])
    for pattern, match in (("(", "is not a regular expression"), ("x*", "matches the empty string")):
        cfg = load_config(GRPOConfig, None, [f"model.path={model_path}", f"log.run_dir={tmp_path / pattern}",
                                             f"rewards.step_pattern='{pattern}'"])
        with pytest.raises(ValueError, match=rf"^rewards.step_pattern='{re.escape(pattern)}' {match}"):
            train(cfg)
        assert not (tmp_path / pattern).exists()  # refused before the run directory was made


def test_leading_zero_columns_are_right_steps():
    # the built-in task writes every problem at its width: "5+7=" is "5+7=12 0+0+1=1"
    from fastgrpo.data import builtin_dataset

    for ex in builtin_dataset("arithmetic", 200, 0, "train"):
        chain = f"<think>{ex['cot']}</think>Answer: {ex['answer']}"
        steps = [t for t, _ in split_steps(chain, ARITHMETIC_STEP_PATTERN)]
        assert arithmetic_step_reward([ex["prompt"]], ["-"], steps=[steps], answer=[ex["answer"]]) == \
            [[1.0] * len(steps)], chain
    right, dropped = ["5+7=12 ", "0+0+1=1</think>", "Answer: 12"], ["5+7=12 ", "0+0=1</think>", "Answer: 12"]
    assert arithmetic_step_reward(["5+7="] * 2, ["-"] * 2, steps=[right, dropped], answer=["12"] * 2) == \
        [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
