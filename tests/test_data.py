"""Prompt data: built-in splits disjoint by construction (for every consumer of the tiny pipeline), mixed sources
with different prompt columns and types, and bad datasets named in one line."""

import doctest
import json
import signal
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from datasets import Dataset

from fastgrpo import data
from fastgrpo.config import DataConfig, load_config
from fastgrpo.data import TASKS, PromptSampler, encode_prompt, load_general, load_prompts, split_of
from fastgrpo.evaluate import evaluate_general, evaluate_reasoning
from fastgrpo.generation import Completion
from fastgrpo.pipeline import PipelineConfig
from fastgrpo.rejection import accepted_samples, general_rows
from fastgrpo.reward_model import RewardDataConfig, load_pairs
from fastgrpo.rewards import FormatReward, accuracy_reward
from fastgrpo.sft import SFTDataConfig, load_examples
from fastgrpo.tiny import char_tokenizer

R1_TINY = Path(__file__).parents[1] / "configs" / "r1_tiny.yaml"


def test_doctests():
    assert doctest.testmod(data).failed == 0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_builtin_train_and_eval_draws_never_share_a_problem(task):
    train, held_out = set(), set()
    for seed in (0, 1, 7):
        for size in (64, 2000):
            # load_general: the general task has no answers, which load_prompts requires
            cfg = DataConfig(general_source=f"builtin:{task}", num_examples=size, eval_examples=size, seed=seed)
            train.update(load_general(cfg)["prompt"])
            held_out.update(load_general(cfg, split="eval")["prompt"])
    assert not train & held_out, sorted(train & held_out)[:5]
    assert {split_of(p) for p in train} == {"train"} and {split_of(p) for p in held_out} == {"eval"}
    assert len(held_out) >= 30  # enough distinct held-out problems (assist has 288 in all, a tenth held out)


def test_assist_asks_each_kind_equally_often_in_both_splits():
    for split in ("train", "eval"):
        prompts = data.builtin_dataset("assist", 3000, 0, split)["prompt"]
        kinds = [p.split()[0] for p in prompts]  # Greet / Thank / How
        assert all(0.3 < kinds.count(k) / len(kinds) < 0.37 for k in ("Greet", "Thank", "How")), split


class Recorder:
    """A generator that records the prompts it is asked to complete and answers each with one fixed text."""

    def __init__(self, tokenizer):
        self.prompts, self.answer = [], tokenizer("<think>1</think>Answer: 1", add_special_tokens=False)["input_ids"]

    def generate(self, prompts, sampling):
        self.prompts += [tuple(p) for p in prompts]
        return [[Completion(self.answer, [0.0] * len(self.answer), "stop")] * sampling.n for _ in prompts]


def test_the_tiny_pipelines_train_and_eval_sets_are_disjoint():
    """Every stage of configs/r1_tiny.yaml draws its training prompts through its own loader; none is one that the
    held-out evaluation (or the reward model's held-out pairs) scores. Prompts are compared as the token ids each
    consumer feeds the model, up to the assistant turn."""
    cfg = load_config(PipelineConfig, R1_TINY)
    tok = char_tokenizer()
    assistant = tok.convert_tokens_to_ids("<|assistant|>")

    def up_to_reply(ids):
        return tuple(ids[:ids.index(assistant) + 1])

    def ids_of(prompts):
        return {tuple(encode_prompt(tok, p)) for p in prompts}

    train = {"reward_model": {up_to_reply(c) for c, _ in load_pairs(cfg.reward_model.data, tok, "train")[0]},
             "cold_start": {tuple(s[:n]) for s, n in zip(*load_examples(cfg.cold_start.data, tok)[:2])},
             "reasoning_rl": ids_of(load_prompts(cfg.reasoning_rl.data)["prompt"]),
             "helpfulness_rl": ids_of(load_prompts(cfg.helpfulness_rl.data)["prompt"])}
    sampler = Recorder(tok)
    accepted_samples(sampler, tok, cfg.rejection_sampling)
    train["rejection_sampling"] = set(sampler.prompts) | ids_of(r["prompt"] for r in general_rows(
        cfg.rejection_sampling, 500, tok.eos_token))

    scorer = Recorder(tok)
    eval_cfg = replace(cfg.eval, rewards=replace(cfg.eval.rewards, reward_model=None))
    evaluate_reasoning(scorer, tok, eval_cfg)
    evaluate_general(scorer, tok, eval_cfg)
    held_out = set(scorer.prompts) | {up_to_reply(c) for c, _ in load_pairs(cfg.reward_model.data, tok, "eval")[0]}
    assert len(held_out) > 100
    for stage, prompts in train.items():
        assert len(prompts) > 30, stage
        assert not prompts & held_out, (stage, len(prompts & held_out))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mixed_sources_with_their_own_prompt_columns_and_types(tmp_path):
    """DeepScaleR-style rows (text in `problem`) mixed with UltraFeedback-style rows (chat messages in `prompt`):
    every row holds messages in `problem`, the tokens of a text prompt are unchanged, and `task` names the source."""
    reasoning = write_jsonl(tmp_path / "math.jsonl", [{"problem": f"{i}+1=", "answer": str(i + 1), "solution": "."}
                                                      for i in range(6)])
    general = tmp_path / "chat.parquet"
    Dataset.from_dict({"prompt": [[{"content": f"Hi {i}", "role": "user"}] for i in range(3)]}).to_parquet(general)
    cfg = DataConfig(source=reasoning, prompt_column="problem", general_source=str(general),
                     general_prompt_column="prompt", general_fraction=1 / 3)
    ds = load_prompts(cfg)
    assert list(ds["task"]) == ["reasoning"] * 6 + ["general"] * 3
    assert list(ds["answer"]) == [str(i + 1) for i in range(6)] + [None] * 3
    assert ds["problem"][0] == [{"role": "user", "content": "0+1="}]
    assert ds["problem"][6] == [{"role": "user", "content": "Hi 0"}]
    tok = char_tokenizer()
    assert encode_prompt(tok, ds["problem"][0]) == encode_prompt(tok, "0+1=")
    # the rule rewards abstain on general rows (the reward model scores only those: RewardModelReward)
    texts = ["<think>x</think>Answer: 1"] * len(ds)
    assert FormatReward()(ds["problem"], texts, task=ds["task"])[6:] == [None] * 3
    assert accuracy_reward(ds["problem"], texts, answer=ds["answer"])[6:] == [None] * 3
    # two text sources stay text
    text = load_prompts(replace(cfg, general_source=reasoning, general_prompt_column="problem"))
    assert text["problem"][6] == "0+1=" and list(text["task"])[6] == "general"
    with pytest.raises(ValueError, match=r"chat.parquet' has no column 'question'"):
        load_prompts(replace(cfg, general_prompt_column="question"))


@contextmanager
def time_limit(seconds):
    """Fail, instead of hanging the suite, where the code under test loops forever."""
    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_every_prompt_too_long_is_an_error_not_a_hang():
    cfg = DataConfig(source="builtin:arithmetic", num_examples=20, max_prompt_length=4)  # prompts are >= 8 tokens
    sampler = PromptSampler(load_prompts(cfg), char_tokenizer(), cfg)
    with time_limit(30), pytest.raises(ValueError, match="every prompt of dataset 'builtin:arithmetic' .* longer "
                                                         "than data.max_prompt_length=4"):
        sampler.next()
    assert sampler.skipped_long == 20


def test_empty_and_null_prompts_are_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl' has no rows"):
        load_prompts(DataConfig(source=str(empty)))
    with pytest.raises(ValueError, match="'builtin:arithmetic' has no rows"):
        load_prompts(DataConfig(num_examples=0))
    with pytest.raises(ValueError, match="has no rows"):
        PromptSampler(Dataset.from_dict({"prompt": [], "answer": []}), char_tokenizer(), DataConfig())
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": None, "answer": "3"}]
    nulls = write_jsonl(tmp_path / "nulls.jsonl", rows)
    with pytest.raises(ValueError, match=r"nulls.jsonl': the prompt in column 'prompt' of row 1 is null"):
        load_prompts(DataConfig(source=nulls))
    blank = write_jsonl(tmp_path / "blank.jsonl", [rows[0], {"prompt": "", "answer": "3"}])
    with pytest.raises(ValueError, match="of row 1 is empty"):
        load_prompts(DataConfig(source=blank))
    with pytest.raises(ValueError, match="dataset file 'missing.jsonl' does not exist"):
        load_prompts(DataConfig(source="missing.jsonl"))
    # SFT and reward-model files go through the same checks
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "completion": "2"}, {"prompt": None,
                                                                                          "completion": "3"}])
    with pytest.raises(ValueError, match="sft.jsonl': the prompt in column 'prompt' of row 1 is null"):
        load_examples(SFTDataConfig(source=sft_rows), char_tokenizer())
    with pytest.raises(ValueError, match="empty.jsonl' has no rows"):
        load_pairs(RewardDataConfig(source=str(empty)), char_tokenizer(), "train")
