"""The calculator tool task of the tiny default: the multiply task's splits and answers, the tiny chat template's
tool rendering (old conversations unchanged, prefix-consistent), and cold-start demonstrations whose ids are the
ids a multi-turn rollout produces (prompt, sampled turn, observation, final turn)."""

import pytest
from transformers.utils import get_json_schema

from fastgrpo.data import builtin_dataset, encode_prompt, split_of
from fastgrpo.sft import SFTDataConfig, load_examples, tool_episode
from fastgrpo.tiny import char_tokenizer
from fastgrpo.tools import calculator

# fastgrpo.tiny's template before tools were added: every tiny model and published result was trained on it
OLD_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}{% else %}<|assistant|>{{ m['content'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOLS = [get_json_schema(calculator)]


def python(code: str, timeout: float) -> str:
    """Run Python code.

    Args:
        code: the program
        timeout: seconds it may run
    """
DEMOS = SFTDataConfig(source="builtin:multiply_tools", num_examples=400, max_length=256)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def render(tok, messages, tools=None, add_generation_prompt=False, **kwargs) -> list[int]:
    out = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True,
                                  return_dict=True, **kwargs)
    return list(out["input_ids"])


def call_message(expression: str) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}]}


def rollout_ids(tok, prompt: str, tools, call: bool) -> list[int]:
    """The ids a multi-turn rollout builds: prompt ids, the model's turn as sampled, the observation as
    render(conversation + tool message, generation prompt) minus render(conversation), then the final turn."""
    expression = prompt.removesuffix("=")
    a, b = map(int, expression.split("*"))
    ids = encode_prompt(tok, prompt, tools)
    if call:
        turn = '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call></s>' % expression
        ids += tok(turn, add_special_tokens=False)["input_ids"]
        conversation = [{"role": "user", "content": prompt}, call_message(expression)]
        before = render(tok, conversation, tools)
        after = render(tok, conversation + [{"role": "tool", "content": str(a * b)}], tools, add_generation_prompt=True)
        assert before == ids and after[: len(before)] == before
        ids += after[len(before):]
    return ids + tok(f"Answer: {a * b}</s>", add_special_tokens=False)["input_ids"]


def test_multiply_splits_are_disjoint_and_answers_right():
    train = builtin_dataset("multiply", 3000, 0, "train")
    held_out = builtin_dataset("multiply", 300, 0, "eval")
    assert not set(train["prompt"]) & set(held_out["prompt"])
    assert {split_of(p) for p in train["prompt"]} == {"train"} and {split_of(p) for p in held_out["prompt"]} == {"eval"}
    for ex in [*train, *held_out]:
        a, b = map(int, ex["prompt"].removesuffix("=").split("*"))
        assert 10 <= a <= 99 and 10 <= b <= 99 and ex["answer"] == str(a * b) and ex["task"] == "reasoning"
        # one length of prompt and of answer: the cold start's copies are at a fixed distance (data._multiplication)
        assert len(ex["prompt"]) == 6 and len(ex["answer"]) == 4
    assert len(set(train["prompt"])) > 2000  # thousands of distinct problems, not a few repeated


def test_the_demonstrations_hold_train_prompts_only(tok):
    held_out = set(builtin_dataset("multiply", 500, 0, "eval")["prompt"])
    sequences, prompt_lengths, _ = load_examples(DEMOS, tok)
    prompts = {tok.decode(s[:n]).split("<|user|>")[1].removesuffix("<|assistant|>")
               for s, n in zip(sequences, prompt_lengths)}
    assert prompts and {split_of(p) for p in prompts} == {"train"} and not prompts & held_out


CONVERSATIONS = [
    [{"role": "user", "content": "49+97="}],
    [{"role": "user", "content": "Greet Tom."}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="},
     {"role": "assistant", "content": "<think>1+1=2</think>Answer: 2"}, {"role": "user", "content": "and 2+2?"}],
    [{"role": "user", "content": "line one\nline  two {{ not jinja }}"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "tools: x\n<|user|></s>"}],
]


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_conversations_without_tools_render_as_before(tok, conversation, generation_prompt):
    old = tok.apply_chat_template(conversation, chat_template=OLD_TEMPLATE, tokenize=False,
                                  add_generation_prompt=generation_prompt)
    for tools in (None, []):
        new = tok.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
        assert new == old


EPISODE = [{"role": "user", "content": "347*86="}, call_message("347*86"), {"role": "tool", "content": "29842"},
           {"role": "assistant", "content": "Answer: 29842"}, {"role": "user", "content": "and one more?"},
           call_message("29842+1"), {"role": "tool", "content": "29843"},
           {"role": "assistant", "content": "Answer: 29843"}]


@pytest.mark.parametrize("tools", [None, TOOLS, TOOLS + [get_json_schema(python)]])
def test_the_template_is_prefix_consistent_and_describes_tools_in_the_prompt_only(tok, tools):
    whole = render(tok, EPISODE, tools)
    for k in range(1, len(EPISODE)):
        ends_a_turn = EPISODE[k - 1]["role"] == "assistant"
        part = render(tok, EPISODE[:k], tools, add_generation_prompt=not ends_a_turn)
        assert whole[: len(part)] == part, k
    text = tok.decode(whole)
    described = tok.apply_chat_template(EPISODE, tools=tools, tokenize=False).removesuffix(
        tok.apply_chat_template(EPISODE, tokenize=False))
    assert described == ("" if tools is None else "tools: " + " ".join(
        f"{t['function']['name']}({','.join(t['function']['parameters']['properties'])})" for t in tools) + "\n")
    assert text.count("<tool_call>") == 2 and '<tool_response>29843</tool_response><|assistant|>Answer' in text


def test_a_call_renders_as_the_model_writes_it_whatever_the_arguments_type(tok):
    as_string = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2*3"}'}}]}
    for message in (call_message("2*3"), as_string):
        text = tok.apply_chat_template([{"role": "user", "content": "2*3="}, message], tokenize=False)
        assert text == ('<|user|>2*3=<|assistant|><tool_call>{"name": "calculator", "arguments": '
                        '{"expression": "2*3"}}</tool_call></s>')


@pytest.mark.parametrize("tools, call", [(None, False), (TOOLS, False), (TOOLS, True)])
def test_a_demonstration_is_the_rollouts_ids(tok, tools, call):
    example = builtin_dataset("multiply", 1, 3, "train")[0]
    ids, prompt_length = tool_episode(tok, example, tools, call)
    assert ids == rollout_ids(tok, example["prompt"], tools, call)
    assert ids[:prompt_length] == encode_prompt(tok, example["prompt"], tools)


def test_the_cold_start_mixes_calls_direct_answers_and_prompts_without_tools(tok):
    sequences, prompt_lengths, skipped = load_examples(DEMOS, tok)
    assert skipped == 0 and len(sequences) == DEMOS.num_examples
    kinds = []
    for ids, n in zip(sequences, prompt_lengths):
        prompt, completion = tok.decode(ids[:n]), tok.decode(ids[n:])
        tools, call = (TOOLS if prompt.startswith("tools:") else None), "<tool_call>" in completion
        assert ids == rollout_ids(tok, prompt.split("<|user|>")[1].removesuffix("<|assistant|>"), tools, call)
        kinds.append((tools is not None, call))
    shares = {kind: kinds.count(kind) / len(kinds) for kind in [(False, False), (True, False), (True, True)]}
    assert 0.4 < shares[False, False] < 0.6 and 0.07 < shares[True, False] < 0.18 and 0.3 < shares[True, True] < 0.45
    assert sum(shares.values()) == 1  # no call without the tool described
