"""Process reward model (fastgrpo/prm.py): the loss reads step ends only, self-labelled arithmetic steps, held-out
accuracy of a tiny PRM, scoring as a reward function, exact resume of a killed run, bad input named by row."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo import prm
from fastgrpo.checkpoint import latest_checkpoint
from fastgrpo.config import RewardConfig, load_config
from fastgrpo.data import builtin_dataset, encode_prompt, split_of
from fastgrpo.generation import Completion
from fastgrpo.prm import (PRMConfig, ProcessRewardModelReward, collate, encode_row, label_samples, load_rows,
                          policy_rows, step_loss, train, written_chain)
from fastgrpo.rewards import ARITHMETIC_STEP_PATTERN, build_rewards, compute_rewards
from fastgrpo.steps import find_steps
from fastgrpo.tiny import build_tiny_model, char_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on the shared 2-core machine two threads spin against the
    other engineers' processes (a training step took 1-4 s with two, 0.1 s with one, at load average ~8)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


def make_cfg(model_path, run_dir, *overrides):
    return load_config(PRMConfig, None, [
        f"model.path={model_path}", f"log.run_dir={run_dir}", "log.tensorboard=false", "data.num_examples=400",
        "data.eval_examples=100", "data.max_length=64", "train.steps=30", "train.chains_per_step=16",
        "train.lr=1e-3", *overrides,
    ])


@pytest.fixture(scope="module")
def trained(model_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("prm")
    cfg = make_cfg(model_path, run_dir)
    return cfg, run_dir, train(cfg)


def test_the_loss_reads_only_step_end_tokens():
    tokenizer = char_tokenizer()
    rows = [{"prompt": "47+38=", "steps": ["<think>7+8=15 ", "4+3=7</think>", "Answer: 75"], "labels": [1, 0, None]},
            {"prompt": "5+5=", "steps": ["<think>5+5=10</think>", "Answer: 10"], "labels": [1.0, 0.25]}]
    chains = [encode_row(tokenizer, row) for row in rows]
    for row, chain in zip(rows, chains):  # each step ends on its own last token, after the prompt as RL encodes it
        assert chain.ids[:len(encode_prompt(tokenizer, row["prompt"]))] == encode_prompt(tokenizer, row["prompt"])
        starts = [len(encode_prompt(tokenizer, row["prompt"]))] + [e + 1 for e in chain.ends[:-1]]
        assert [tokenizer.decode(chain.ids[s:e + 1]) for s, e in zip(starts, chain.ends)] == row["steps"]
    input_ids, attention_mask, targets = collate(chains, tokenizer.pad_token_id)
    logits = torch.randn(targets.shape, requires_grad=True)  # (B, T)
    loss = step_loss(logits, targets)

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    labelled = [(b, e, y) for b, c in enumerate(chains) for e, y in zip(c.ends, c.labels) if not math.isnan(y)]
    assert len(labelled) == 4  # the null label trains nothing
    expected = sum(bce(logits[b, e].item(), y) for b, e, y in labelled) / len(labelled)
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    loss.backward()
    step_ends = torch.zeros(targets.shape, dtype=torch.bool)
    for b, e, _ in labelled:
        step_ends[b, e] = True
    assert torch.all(logits.grad[~step_ends] == 0) and torch.all(logits.grad[step_ends] != 0)
    changed = logits.detach().clone()
    changed[~step_ends] = torch.randn(int((~step_ends).sum())) * 100  # every other token, padding included
    assert step_loss(changed, targets).item() == loss.item()
    assert attention_mask.sum().item() == sum(len(c.ids) for c in chains)


def test_arithmetic_chains_are_labelled_step_by_step():
    rng = random.Random(0)
    for prompt, answer in zip(*(builtin_dataset("arithmetic3", 50, 0, "train")[c] for c in ("prompt", "answer"))):
        right = written_chain(prompt, "none", rng)
        assert right.endswith(f"Answer: {answer}")
        row = label_samples([prompt], [right], [answer])[0]
        assert len(row["steps"]) == len(max(prompt[:-1].split("+"), key=len)) + 1  # the columns and the answer
        assert row["labels"] == [1.0] * len(row["steps"])
        for mistake in ("sum", "carry"):
            labels = label_samples([prompt], [written_chain(prompt, mistake, rng)], [answer])[0]["labels"]
            first = labels.index(0.0)  # the mistake: every step before it is right, and the answer is wrong
            assert labels[:first] == [1.0] * first and labels[-1] == 0.0
    rows = load_rows(make_cfg("unused", "unused").data, "train")
    assert len(rows) == 400  # a third right, the rest with one mistake each
    assert 0.3 < sum(all(x == 1.0 for x in r["labels"]) for r in rows) / len(rows) < 0.4


class Policy:
    """Samples a right and a wrong chain for a prompt; continues a partial chain with the rest of the right chain
    where it is a beginning of it, else with a wrong answer."""

    def __init__(self, tokenizer):
        self.tokenizer, self.asked = tokenizer, []

    def generate(self, prompts, sampling):
        return [[Completion(ids, [], "stop") for ids in (self.sample(p) * sampling.n)[:sampling.n]] for p in prompts]

    def sample(self, ids):
        prompt, _, head = self.tokenizer.decode(ids).removeprefix("<|user|>").partition("<|assistant|>")
        right = written_chain(prompt, "none", random.Random(0))
        if head:
            texts = [right[len(head):] if right.startswith(head) else "</think>Answer: 0"]
        else:
            self.asked.append(prompt)
            texts = [right, written_chain(prompt, "sum", random.Random(0))]
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                for t in texts]


def test_policy_samples_are_labelled_on_their_split():
    """policy_rows labels what the generator sampled, on prompts of the split asked for: by rule, or by rollouts."""
    tokenizer = char_tokenizer()
    by_rule, by_rollouts = ({"right": [], "wrong": []} for _ in range(2))
    for labels, out in (("rule", by_rule), ("rollouts", by_rollouts)):
        policy = Policy(tokenizer)
        cfg = make_cfg("unused", "unused", "data.policy_eval_prompts=8", "data.samples_per_prompt=2",
                       f"data.labels={labels}", "data.rollouts=2").data
        rows = policy_rows(policy, tokenizer, cfg, "eval")
        assert len(policy.asked) == 8 and all(split_of(p) == "eval" for p in policy.asked)
        assert len(rows) == 16 and all(r["steps"][-1].startswith("Answer: ") for r in rows)
        for i, row in enumerate(rows):
            out["wrong" if i % 2 else "right"].append(row["labels"])
    assert by_rollouts["right"] == by_rule["right"] and all(x == 1.0 for r in by_rule["right"] for x in r)
    # from the rule's first wrong step on, no continuation reaches the right answer: rollouts label it and every
    # later step 0 (where the rule may pass a later column that is right given the true carry)
    for rule, rollouts in zip(by_rule["wrong"], by_rollouts["wrong"]):
        first = rule.index(0.0)
        assert rollouts == [1.0] * first + [0.0] * (len(rule) - first)
    with pytest.raises(ValueError, match="data.labels must be 'rule' or 'rollouts'"):
        policy_rows(Policy(tokenizer), tokenizer, make_cfg("unused", "unused", "data.labels=votes").data, "eval")


def test_a_tiny_prm_beats_chance_on_held_out_steps(trained, model_path):
    cfg, run_dir, result = trained
    eval_rows = load_rows(cfg.data, "eval")
    train_prompts, eval_prompts = ({r["prompt"] for r in rows} for rows in (load_rows(cfg.data, "train"), eval_rows))
    assert not train_prompts & eval_prompts and all(split_of(p) == "eval" for p in eval_prompts)
    assert result["chains"] == 100 and result["steps"] == sum(len(r["labels"]) for r in eval_rows)
    assert result["accuracy"] > result["majority_accuracy"] + 0.05 and result["auc"] > 0.6, result
    assert json.loads((run_dir / "eval.json").read_text()) == result
    assert (run_dir / "final" / "model.safetensors").exists() and not (run_dir / "checkpoints").exists()
    weights = (run_dir / "final" / "model.safetensors").stat().st_mtime_ns
    assert train(cfg) == result  # a finished run is a no-op
    assert (run_dir / "final" / "model.safetensors").stat().st_mtime_ns == weights


def test_the_reward_scores_each_step_with_the_models_sigmoid_at_its_end(trained):
    cfg, run_dir, _ = trained
    tokenizer = char_tokenizer()
    texts = ["<think>7+8=15 4+3+1=8</think>Answer: 85", "<think>7+8=15 4+3=7</think>Answer: 75", "no steps", ""]
    completion_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    prompts = ["47+38="] * len(texts)
    rewards_cfg = RewardConfig(funcs=["process_reward_model"], weights=[1.0],
                               process_reward_model=str(run_dir / "final"), step_pattern=ARITHMETIC_STEP_PATTERN)
    funcs, weights = build_rewards(rewards_cfg)
    steps = [find_steps(tokenizer, ids, ARITHMETIC_STEP_PATTERN) for ids in completion_ids]
    scores = funcs[0](prompts=prompts, completions=texts, completion_ids=completion_ids,
                      step_ends=[ends for _, ends in steps])
    assert [len(s) for s in scores] == [3, 3, 1, 0]

    model = funcs[0].model
    for prompt, ids, (_, ends), got in zip(prompts, completion_ids, steps, scores):
        prompt_ids = encode_prompt(tokenizer, prompt)
        with torch.no_grad():  # one sequence alone, no padding
            logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0, :, 0]
        expected = torch.sigmoid(logits[[len(prompt_ids) + e for e in ends]])
        assert torch.allclose(torch.tensor(got), expected, atol=1e-5), (got, expected)
    assert scores[0][0] != scores[0][1]  # the scores differ by step: they are read at the step ends

    merged = compute_rewards(funcs, weights, prompts, texts, completion_ids, {}, steps=steps).step_rewards
    assert [[end for end, _ in s] for s in merged[:2]] == [ends for _, ends in steps[:2]]
    with pytest.raises(ValueError, match="set rewards.step_pattern"):
        funcs[0](prompts=prompts, completions=texts, completion_ids=completion_ids)
    with pytest.raises(ValueError, match="set rewards.process_reward_model"):
        build_rewards(RewardConfig(funcs=["process_reward_model"], weights=[1.0]))
    assert build_rewards(rewards_cfg, rule_only=True) == ([], [])


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(model_path, tmp_path,
                                                                                   monkeypatch):
    args = ("train.steps=4", "log.save_every=2", "train.chains_per_step=4", "data.num_examples=64",
            "data.eval_examples=8")
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = train(make_cfg(model_path, straight_dir, *args))

    real_logits, calls = prm.token_logits, []

    def killed_at_the_fourth_step(*logit_args):  # one call per training step
        calls.append(len(calls))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_logits(*logit_args)

    monkeypatch.setattr(prm, "token_logits", killed_at_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(model_path, killed_dir, *args))
    monkeypatch.undo()
    assert latest_checkpoint(killed_dir).name == "step-00000002"

    assert train(make_cfg(model_path, killed_dir, *args)) == straight
    logged = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 2, 3]  # resumed at step 2, not from the start
    a, b = (load_file(d / "final" / "model.safetensors") for d in (straight_dir, killed_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_file_source_and_bad_input_named_by_row(model_path, tmp_path):
    good = [{"q": f"{a}+1=", "s": [f"<think>{a}+1={a + 1}</think>", f"Answer: {a + 1}"], "y": [1, 1]}
            for a in range(5)]
    path = write_rows(tmp_path / "good.jsonl", good)
    result = train(make_cfg(model_path, tmp_path / "run", f"data.source={path}", "data.prompt_column=q",
                            "data.steps_column=s", "data.labels_column=y", "data.eval_examples=1", "train.steps=1"))
    assert result["chains"] == 1 and result["steps"] == 2  # the file's last row is held out

    def error(rows, *overrides):
        source = write_rows(tmp_path / "bad.jsonl", rows)
        with pytest.raises(ValueError) as e:
            train(make_cfg(model_path, tmp_path / "bad", f"data.source={source}", "data.eval_examples=1", *overrides))
        assert "\n" not in str(e.value)
        return str(e.value)

    rows = [{"prompt": "1+1=", "steps": ["a", "b"], "labels": [1, 0]}] * 3
    assert "no column 'labels'" in error([{k: v for k, v in r.items() if k != "labels"} for r in rows])
    assert "row 1 has 2 steps but 1 labels" in error([rows[0], {**rows[1], "labels": [1]}, rows[2]])
    assert "row 2: label 2" in error([rows[0], rows[1], {**rows[2], "labels": [1, 2]}])
    assert "row 0: steps must be a non-empty list" in error([{**rows[0], "steps": ["a", ""]}, *rows[1:]])
    assert "row 1 is empty" in error([rows[0], {**rows[1], "prompt": ""}, rows[2]])
    assert "fits data.max_length=3" in error(rows, "data.max_length=3")
    assert "unknown built-in" in error(rows, "data.source=builtin:arithmetic")
    assert "all held out" in error(rows, "data.eval_examples=3")


def test_grpo_trains_on_the_process_reward_models_step_scores(trained, model_path, tmp_path):
    """The built-in "process_reward_model" in a GRPO run: every step found is scored, and the advantages train."""
    from fastgrpo.config import GRPOConfig
    from fastgrpo.grpo import train as grpo_train

    _, run_dir, _ = trained
    cfg = load_config(GRPOConfig, "configs/grpo_tiny.yaml", [
        f"model.path={model_path}", f"log.run_dir={tmp_path / 'run'}", "train.steps=2", "train.prompts_per_step=2",
        "generation.num_generations=4", "generation.backend=hf", "model.dtype=float32", "log.tensorboard=false",
        "rewards.funcs=[process_reward_model]", "rewards.weights=[1.0]",
        f"rewards.process_reward_model={run_dir / 'final'}", "rewards.step_pattern='[aeiou ]'"])
    history = grpo_train(cfg)
    assert len(history) == 2
    for h in history:
        assert h["steps/per_completion_mean"] > 1  # random text: a step ends at every vowel and space
        assert 0 < h["reward/process_reward_model"] < 1 and h["steps/reward_std"] > 0
        assert h["bad_updates"] == 0 and h["advantage/abs_mean"] > 0
