import doctest
import math
import re

import pytest
import torch

from fastgrpo import rewards
from fastgrpo.rewards import (FormatReward, OverlongPenalty, RewardError, RewardModelReward, accuracy_reward,
                              compute_rewards, extract_answer, format_reward, language_consistency_reward,
                              resolve_reward, script_words)


def test_docstring_examples():
    assert doctest.testmod(rewards).failed == 0


# ---------------------------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("completion, answer, expected", [
    ("<think>6*7</think>Answer: 42", "42", 1.0),
    ("<think>6*7</think>Answer: 43", "42", 0.0),
    ("<think>6*7</think>The answer is \\boxed{42}.", "42", 1.0),
    ("<think>6*7</think>\\boxed{41}, i.e. Answer: 42", "42", 0.0),  # boxed wins over "Answer:"
    ("<think>is it 42?</think>so 41", "42", 0.0),  # numbers in the reasoning do not count
    ("Answer: 1,000", "1000", 1.0),
    ("Answer: -3", "3", 0.0),
    ("<think>...</think>Answer: $\\frac{1}{2}$", "0.5", 1.0),
    ("<think>...</think>Answer: 1/2", "0.5", 1.0),
    ("<think>...</think>\\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("<think>...</think>\\boxed{\\frac{1}{3}}", "1/2", 0.0),
    ("<think>...</think>\\boxed{\\sqrt{2}}", "2^{1/2}", 1.0),
    ("<think>...</think>Answer: x = 3", "3", 1.0),
    ("<think>...</think>Answer: 42.0", "42", 1.0),
    ("<think>still thinking, 42", "42", 0.0),  # unfinished reasoning has no answer
    ("<think>...</think>\\boxed{4", "4", 0.0),  # truncated box
    ("<think>...</think>I give up.", "42", 0.0),
])
def test_accuracy(completion, answer, expected):
    assert accuracy_reward(prompts=["q"], completions=[completion], answer=[answer]) == [expected]


def test_accuracy_conversational_and_unparseable_reference():
    completions = [[{"role": "assistant", "content": "Answer: 7"}]] * 2
    assert accuracy_reward(prompts=["q"] * 2, completions=completions, answer=["7", "\\text{}"]) == [1.0, None]


def test_extract_answer_order():
    assert extract_answer("<think>Answer: 1</think>Answer: 2 apples.\nso 3") == "2 apples"
    assert extract_answer("no think tags, just 3 then 4") == "4"
    assert extract_answer("\\boxed{\\frac{a}{b}} and \\boxed{x^{2}}") == "x^{2}"


# ---------------------------------------------------------------------------------------------- format

@pytest.mark.parametrize("completion, expected", [
    ("<think>6*7=42</think>Answer: 42", 1.0),
    ("\n<think>\n6*7=42\n</think>\n\nAnswer:42\n", 1.0),
    ("<think>6*7=42</think>Answer: ", 0.0),  # empty answer
    ("<think>  </think>Answer: 42", 0.0),  # empty reasoning
    ("<think>6*7=42</think>42", 0.0),  # no "Answer:"
    ("6*7=42</think>Answer: 42", 0.0),  # <think> missing (the default expects it in the completion)
    ("<think>a<think>b</think>Answer: 42", 0.0),
    ("<think>a</think>Answer: 42</think>", 0.0),
    ("Answer: 42", 0.0),
])
def test_format(completion, expected):
    assert format_reward(prompts=["q"], completions=[completion]) == [expected]


def test_format_options():
    in_prompt = FormatReward(think_in_prompt=True)
    assert in_prompt(prompts=["q"] * 2, completions=["6*7</think>Answer: 42", "<think>6*7</think>Answer: 42"]) \
        == [1.0, 0.0]
    boxed = FormatReward(answer_pattern=r"\\boxed\{.+\}")
    assert boxed(prompts=["q"] * 2, completions=["<think>r</think>\\boxed{4}", "<think>r</think>Answer: 4"]) \
        == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------- language

def test_script_words():
    assert script_words("Привет, world! 你好 ありがとう 안녕하세요 مرحبا 123 <|im_start|>") == \
        ["CYRILLIC", "LATIN"] + ["CJK"] * 7 + ["HANGUL", "ARABIC"]


def test_language_consistency():
    prompts = ["计算 3 加 4 等于多少?"] * 4 + ["What is 3 plus 4?"]
    completions = [
        "<think>三加四等于七</think>Answer: 7",
        "<think>三加四 equals seven</think>Answer: 7",  # 3 CJK + 2 Latin words
        "<think>three plus four is seven</think>三加四等于七",  # the answer part is not the CoT
        "<think>3+4=7</think>Answer: 7",  # no words: nothing to judge
        "<think>Three plus four, 七.</think>Answer: 7",
    ]
    out = language_consistency_reward(prompts=prompts, completions=completions)
    assert out[:2] == [1.0, pytest.approx(3 / 5)] and out[2] == 0.0 and out[3] is None
    assert out[4] == pytest.approx(3 / 4)


def test_language_column_overrides_prompt():
    completions = ["<think>Считаем: три плюс четыре</think>7"] * 3
    out = language_consistency_reward(prompts=["3+4?"] * 3, completions=completions, language=["ru", "en", "cyrillic"])
    assert out == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        language_consistency_reward(prompts=["q"], completions=["a"], language=["xx"])


def test_language_rendered_prompt():
    # Role words of a rendered chat template must not make a Chinese question "English".
    prompt = ("<|im_start|>user\n一个正方形的边长是五厘米，它的面积是多少？<|im_end|>\n"
              "<|im_start|>assistant\n<think>\n")
    assert language_consistency_reward(prompts=[prompt], completions=["边长五，面积二十五</think>25"]) == [1.0]


# ---------------------------------------------------------------------------------------------- overlong

def test_overlong_ramp():
    penalty = OverlongPenalty(max_length=100, buffer=20)
    lengths = [0, 80, 81, 90, 95, 100, 120]
    out = penalty(prompts=[""] * 7, completions=[""] * 7, completion_ids=[[1] * n for n in lengths])
    assert out == pytest.approx([0.0, 0.0, -0.05, -0.5, -0.75, -1.0, -1.0])
    with pytest.raises(ValueError, match="buffer"):
        OverlongPenalty(max_length=10, buffer=20)


# ---------------------------------------------------------------------------------------------- compute_rewards

def _constant(values):
    def constant(completions, **kwargs):
        return list(values)
    return constant


def test_compute_rewards_weights_and_none():
    funcs = [_constant([1.0, None, None, 0.0]), _constant([0.5, 2.0, None, None])]
    total, per_func, _ = compute_rewards(funcs, [1.0, 0.5], ["p"] * 4, ["c"] * 4, [[1]] * 4, {})
    assert per_func.shape == (4, 2) and per_func.dtype == torch.float32 and total.dtype == torch.float32
    assert per_func.isnan().tolist() == [[False, False], [True, False], [True, True], [False, True]]
    assert total[[0, 1, 3]].tolist() == [1.25, 1.0, 0.0] and math.isnan(total[2])


def test_compute_rewards_errors_are_one_line():
    def broken(completions, **kwargs):
        raise ZeroDivisionError("division\nby zero")

    with pytest.raises(RewardError, match=r"^reward function 'broken' raised ZeroDivisionError: division by zero$"):
        compute_rewards([broken], [1.0], ["p"], ["c"], [[1]], {})
    with pytest.raises(RewardError, match=r"^reward function 'constant' returned 1 values, expected 2$"):
        compute_rewards([_constant([1.0])], [1.0], ["p"] * 2, ["c"] * 2, [[1]] * 2, {})
    with pytest.raises(RewardError, match=r"'accuracy_reward' raised ValueError: accuracy_reward needs the dataset "
                                          r"column 'answer'"):
        compute_rewards([accuracy_reward], [1.0], ["p"], ["c"], [[1]], {"solution": ["1"]})
    with pytest.raises(ValueError, match="overlong_penalty needs the dataset column 'completion_ids'"):
        OverlongPenalty(10, 5)(prompts=["p"], completions=["c"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values, expected 2"):
        compute_rewards([accuracy_reward], [1.0], ["p"] * 2, ["c"] * 2, [[1]] * 2, {"answer": ["1"]})


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_rewards_are_rejected_by_name(value):
    with pytest.raises(RewardError, match=rf"^reward function 'constant' returned {value} for completion 1 \(1 of 3 "
                                          r"values non-finite\); return None"):
        compute_rewards([_constant([1.0, value, None])], [1.0], ["p"] * 3, ["c"] * 3, [[1]] * 3, {})
    total, _, _ = compute_rewards([_constant([1.0, None, None])], [1.0], ["p"] * 3, ["c"] * 3, [[1]] * 3, {})
    assert math.isnan(total[1])  # None stays "not applicable"


@pytest.mark.parametrize("out", [1.0, None, "1.0"], ids=["float", "None", "str"])
def test_a_reward_returning_no_list_is_named(out):
    with pytest.raises(RewardError, match=rf"^reward function '<lambda>' returned a {type(out).__name__}, not a list "
                                          r"of 3 values"):
        compute_rewards([lambda completions, **kwargs: out], [1.0], ["p"] * 3, ["c"] * 3, [[1]] * 3, {})


def test_trl_style_function_unchanged():
    # open-r1's format reward, verbatim in shape: TRL's signature, conversational completions, extra kwargs.
    def format_reward_open_r1(completions, **kwargs):
        pattern = r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$"
        contents = [completion[0]["content"] for completion in completions]
        return [1.0 if re.match(pattern, c, re.DOTALL | re.MULTILINE) else 0.0 for c in contents]

    seen = {}

    def spy(prompts, completions, completion_ids, solution, trainer_state, **kwargs):
        seen.update(solution=solution, trainer_state=trainer_state, ids=completion_ids, keys=set(kwargs))
        return [None] * len(completions)

    prompts = [[{"role": "user", "content": "1+1?"}]] * 2
    completions = [[{"role": "assistant", "content": "<think>\n1+1\n</think>\n<answer>\n2\n</answer>"}],
                   [{"role": "assistant", "content": "2"}]]
    columns = {"prompt": prompts, "solution": ["2", "2"]}
    total, per_func, _ = compute_rewards([format_reward_open_r1, spy], [1.0, 1.0], prompts, completions, [[7], [8]],
                                      columns, trainer_state="state")
    assert total.tolist() == [1.0, 0.0]
    assert seen == {"solution": ["2", "2"], "trainer_state": "state", "ids": [[7], [8]], "keys": set()}


# ---------------------------------------------------------------------------------------------- names

def test_resolve_reward():
    assert resolve_reward("accuracy") is accuracy_reward
    assert isinstance(resolve_reward("format", think_in_prompt=True), FormatReward)
    assert resolve_reward("overlong", max_length=8, buffer=4).buffer == 4
    assert resolve_reward("fastgrpo.rewards:language_consistency_reward") is language_consistency_reward
    assert resolve_reward("fastgrpo.rewards.accuracy_reward") is accuracy_reward
    with pytest.raises(ValueError, match="unknown reward 'acuracy'"):
        resolve_reward("acuracy")
    with pytest.raises(ValueError, match="cannot resolve reward 'fastgrpo.rewards:nope'"):
        resolve_reward("fastgrpo.rewards:nope")
    with pytest.raises(TypeError, match="takes no options"):
        resolve_reward("accuracy", strict=True)


# ---------------------------------------------------------------------------------------------- reward model

@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory):
    from transformers import Qwen2ForSequenceClassification

    from fastgrpo.tiny import char_tokenizer, tiny_config

    path = tmp_path_factory.mktemp("rm")
    tok = char_tokenizer()
    config = tiny_config(vocab_size=len(tok), hidden=64, intermediate=128)
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_model_batching_matches_one_by_one(reward_model_path):
    prompts = ["What is 2+2?", "Name a prime.", "Hi", "Compute 12*12 and explain every step."]
    completions = ["4", "<think>7 is prime</think>Answer: 7", "Hello there, how can I help you today?", "144"]
    rm = RewardModelReward(reward_model_path, batch_size=3)
    scores = rm(prompts=prompts, completions=completions)
    assert len(scores) == 4 and len(set(scores)) == 4
    rm.batch_size = 1
    assert scores == pytest.approx(rm(prompts=prompts, completions=completions), abs=1e-5)
    # The conversational form renders to the same text, so it scores the same.
    conv = rm(prompts=[[{"role": "user", "content": p}] for p in prompts],
                   completions=[[{"role": "assistant", "content": c}] for c in completions])
    assert conv == pytest.approx(scores, abs=1e-5)


def test_reward_model_without_chat_template_concatenates(reward_model_path):
    rm = RewardModelReward(reward_model_path, batch_size=2)
    rm.tokenizer.chat_template = None
    ids = rm.tokenizer("What is 2+2?4", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = rm.model(input_ids=ids).logits[0, 0].item()
    assert rm(prompts=["What is 2+2?", "x"], completions=["4", "yz"])[0] == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------- build_rewards

def test_build_rewards_is_the_one_factory(monkeypatch):
    """The config's functions and weights; a reward model on the given device (rule_only: left out with its weight);
    the caller's functions at weight 1; DAPO's overlong penalty last."""
    from fastgrpo.config import RewardConfig

    built = []
    monkeypatch.setattr(rewards, "RewardModelReward", lambda path, device=None: built.append((path, device)) or len)
    cfg = RewardConfig(funcs=["accuracy", "reward_model", "format"], weights=[1.0, 2.0, 0.5], reward_model="/rm")
    funcs, weights = rewards.build_rewards(cfg, device=torch.device("meta"))
    assert funcs[0] is accuracy_reward and funcs[1] is len and isinstance(funcs[2], FormatReward)
    assert weights == [1.0, 2.0, 0.5] and built == [("/rm", torch.device("meta"))]
    funcs, weights = rewards.build_rewards(cfg, rule_only=True, max_completion_length=32, overlong_buffer=8)
    assert [rewards.reward_name(f) for f in funcs] == ["accuracy_reward", "format_reward", "overlong_penalty"]
    assert weights == [1.0, 0.5, 1.0] and len(built) == 1 and funcs[-1].max_length == 32 and funcs[-1].buffer == 8
    mine = [_constant([1.0])]
    assert rewards.build_rewards(cfg, funcs=mine) == (mine, [1.0])
    with pytest.raises(ValueError, match="rewards.funcs has 2 entries but rewards.weights has 1"):
        rewards.build_rewards(RewardConfig(funcs=["accuracy", "format"], weights=[1.0]))


def test_evaluation_scores_general_prompts_with_the_reward_model_on_its_device(monkeypatch):
    """evaluate_general built its reward model without a device (the CPU, on a GPU machine too)."""
    from dataclasses import replace

    from fastgrpo.config import DataConfig
    from fastgrpo.evaluate import EvalConfig, evaluate_general
    from fastgrpo.generation import Completion
    from fastgrpo.tiny import char_tokenizer

    class Echo:
        def generate(self, prompts, sampling):
            return [[Completion([5, 6], [0.0, 0.0], "stop")] * sampling.n for _ in prompts]

    built = []

    def reward_model(path, device=None):
        built.append((path, device))
        return lambda prompts, completions, **kwargs: [float(len(prompts))] * len(prompts)

    monkeypatch.setattr(rewards, "RewardModelReward", reward_model)
    data = DataConfig(source="builtin:arithmetic", general_source="builtin:assist", eval_examples=4)
    cfg = EvalConfig(model="m", data=data, k=2, rewards=replace(EvalConfig().rewards, reward_model="/rm"))
    out = evaluate_general(Echo(), char_tokenizer(), cfg, device=torch.device("meta"))
    assert built == [("/rm", torch.device("meta"))] and out["helpfulness"] == 2 * out["general_prompts"]
