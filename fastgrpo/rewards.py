"""Rewards: TRL-compatible reward functions, the built-ins of DeepSeek-R1's RL stages, and their weighted sum.

A reward function is any callable

    f(prompts, completions, completion_ids, **columns) -> list[float | None]     # one value per completion

called with keywords only, exactly as TRL's GRPOTrainer calls it: `prompts` and `completions` are N strings (or,
in TRL's conversational form, lists of {"role", "content"} messages), `completion_ids` N lists of token ids, and
every dataset column other than prompt/completion/completion_ids comes as a keyword holding N values (one per
completion, i.e. each prompt's row repeated G times). The trainer may add TRL's extras (`trainer_state`,
`log_extra`, `log_metric`), so functions must accept **kwargs. None means "not applicable to this sample"; it
becomes NaN and drops out of the weighted sum; a NaN or infinity returned as a number is an error. TRL and open-r1
reward functions therefore work unchanged.

Built-ins, and the names `resolve_reward` knows them by (a name that is a class takes its options as kwargs):
    "accuracy"              accuracy_reward               math answer checked with math-verify against `answer`
    "arithmetic_steps"      arithmetic_step_reward        each step of the built-in addition task, checked (process)
    "format"                FormatReward                  "<think>...</think>" then "Answer: ..."
    "language_consistency"  language_consistency_reward   share of the CoT in the prompt's script (R1)
    "overlong"              OverlongPenalty               DAPO's soft overlong punishment
    "reward_model"          RewardModelReward             a sequence-classification checkpoint's score
    "process_reward_model"  prm.ProcessRewardModelReward  a process reward model's score of each step (process)
    "code"                  sandbox.CodeReward            the final Python block run against `tests` (sandboxed)
    "environment"           environment_reward            what a multi-turn episode's environment scored it (tools)

`build_rewards` turns a RewardConfig into (functions, weights): the one factory GRPO, evaluation and rejection
sampling use.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
import unicodedata
from pathlib import Path
from typing import NamedTuple

import torch

from .config import RewardConfig
from .prm import ProcessRewardModelReward
from .sandbox import CodeReward
from .steps import merge as merge_steps
from .steps import StepError, step_list

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Columns TRL keeps out of the reward kwargs: they are passed as prompts / completions / completion_ids already.
_NOT_COLUMNS = ("prompt", "completion", "completion_ids")


class RewardError(RuntimeError):
    """A reward function failed or broke the contract; the message names the function and fits on one line."""


def reward_name(func) -> str:
    """The name a reward function is logged and reported under (TRL uses `__name__` too)."""
    return getattr(func, "__name__", type(func).__name__)


class Scores(NamedTuple):
    """What compute_rewards returns for N completions of F reward functions."""

    rewards: torch.Tensor  # (N,) float32: nansum_f(weight_f * per_func[:, f]); NaN where every function gave None
    per_func: torch.Tensor  # (N, F) float32, NaN for None; a process function's: the mean of its step rewards
    # None when every function scored outcomes; else per completion its weighted (token index, reward) steps of all
    # functions merged (fastgrpo.steps.merge), an outcome reward being one step at the completion's last token
    step_rewards: list[list[tuple[int, float]]] | None


def compute_rewards(funcs, weights, prompts, completions, completion_ids, columns, steps=None,
                    **trainer_kwargs) -> Scores:
    """Run every reward function on N completions and combine them.

    prompts, completions: N strings (or message lists); completion_ids: N lists of ints;
    columns: dataset columns, each N values; steps: None, or N (step texts, step end token indices) pairs
    (fastgrpo.steps.find_steps), given to the functions as `steps` and `step_ends`; trainer_kwargs: passed through
    unchanged (TRL's `trainer_state`, `log_extra`, `log_metric`).

    >>> def one(completions, **kwargs): return [1.0] * len(completions)
    >>> compute_rewards([one, one], [1.0, 0.5], ["p"], ["c"], [[5]], {}).rewards
    tensor([1.5000])
    """
    if len(funcs) != len(weights):
        raise ValueError(f"{len(funcs)} reward functions but {len(weights)} weights")
    n = len(completions)
    if len(prompts) != n or len(completion_ids) != n:
        raise ValueError(f"got {len(prompts)} prompts, {n} completions, {len(completion_ids)} completion_ids")
    kwargs = {k: v for k, v in columns.items() if k not in _NOT_COLUMNS}
    for key, values in kwargs.items():
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values, expected {n} (one per completion)")
    kwargs.update(trainer_kwargs)
    if steps is not None:
        kwargs.update(steps=[texts for texts, _ in steps], step_ends=[ends for _, ends in steps])

    per_func = torch.empty(n, len(funcs), dtype=torch.float32)  # (N, F)
    per_step = []  # per function: None (outcomes only), or N step lists (None for a completion scored as outcome)
    for f, func in enumerate(funcs):
        per_func[:, f], func_steps = _call(func, n, prompts=prompts, completions=completions,
                                           completion_ids=completion_ids, **kwargs)
        per_step.append(func_steps)

    w = torch.tensor(weights, dtype=torch.float32)
    rewards = (per_func * w).nansum(dim=1)  # (N,)
    # nansum of an all-NaN row is 0, which would look like a real score; NaN lets the advantage op zero it.
    rewards = rewards.masked_fill(per_func.isnan().all(dim=1), math.nan)
    if all(s is None for s in per_step):
        return Scores(rewards, per_func, None)
    return Scores(rewards, per_func, [merge_steps(
        [(s[i] if s is not None and s[i] is not None else [(len(ids) - 1, float(per_func[i, f]))])
         for f, s in enumerate(per_step)], weights) for i, ids in enumerate(completion_ids)])


def _call(func, n: int, **kwargs) -> tuple[torch.Tensor, list | None]:
    """func's N scores (N,) float32 (NaN for None; a completion's step rewards: their mean), and its N step lists
    (None: it scored outcomes only; a completion's entry None: scored as an outcome). RewardError, naming func,
    for a raise or a malformed return."""
    name = reward_name(func)
    try:
        out = func(**kwargs)
    except Exception as e:
        raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {_one_line(e)}") from e
    if not isinstance(out, (list, tuple)) and not (torch.is_tensor(out) and out.dim() == 1):
        raise RewardError(f"reward function {name!r} returned a {type(out).__name__}, not a list of {n} values "
                          f"(one per completion)")
    if len(out) != n:
        raise RewardError(f"reward function {name!r} returned {len(out)} values, expected {n}")
    try:
        step_ends = kwargs.get("step_ends")
        steps = [step_list(r, len(ids), None if step_ends is None else step_ends[i])
                 for i, (r, ids) in enumerate(zip(out, kwargs["completion_ids"]))]
        values = [_mean_step(s) if s is not None else math.nan if r is None else float(r) for r, s in zip(out, steps)]
    except StepError as e:
        raise RewardError(f"reward function {name!r} {e}") from e
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward function {name!r} returned a non-number: {_one_line(e)}") from e
    # None is "not applicable" (NaN from here on); a NaN or infinity returned as a number is a broken reward,
    # which would otherwise make every advantage of the step non-finite
    returned = [(i, r) for i, (r, s) in enumerate(zip(out, steps)) if s is None and r is not None]
    returned += [(i, r) for i, s in enumerate(steps) if s is not None for _, r in s if not math.isnan(r)]
    bad = [(i, r) for i, r in returned if not math.isfinite(float(r))]
    if bad:
        total = sum(1 if s is None else len(s) for s in steps)
        raise RewardError(f"reward function {name!r} returned {float(bad[0][1])} for completion {bad[0][0]} "
                          f"({len(bad)} of {total} values non-finite); return None for a completion it cannot score")
    return torch.tensor(values, dtype=torch.float32), None if all(s is None for s in steps) else steps


def _mean_step(steps: list[tuple[int, float]]) -> float:
    scored = [r for _, r in steps if not math.isnan(r)]
    return sum(scored) / len(scored) if scored else math.nan


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _text(x) -> str:
    """A prompt or completion as text: a string as is; a TRL conversational message list -> its last content."""
    return x if isinstance(x, str) else x[-1]["content"]


def _need(column: str, values, func: str):
    if values is None:
        raise ValueError(f"{func} needs the dataset column {column!r}, which the batch does not have")
    return values


def _split_think(text: str) -> tuple[str | None, str]:
    """(chain of thought, answer part). The CoT is what precedes the first </think> (minus a leading <think>);
    the answer part is what follows the last one. Without </think>: no tags at all means the whole text is
    the answer (a model not trained to think); an opened but unclosed <think> means the reasoning never
    finished, so the CoT is everything after it and the answer is empty."""
    head, closed, _ = text.partition(THINK_CLOSE)
    if closed:
        cot = head.lstrip().removeprefix(THINK_OPEN)
        return cot, text.rpartition(THINK_CLOSE)[2]
    if THINK_OPEN in text:
        return text.partition(THINK_OPEN)[2], ""
    return None, text


# ---------------------------------------------------------------------------------------------- accuracy

_ANSWER_LINE = re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
# Our built-in tasks have integer answers; comparing those directly skips math-verify's ~2 ms per call.
_INTEGER = re.compile(r"-?\d{1,3}(?:,\d{3})+|-?\d+")


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion, or None. Looks only at the answer part (after </think>) and takes,
    in this order: the content of the last \\boxed{...} (a box left open by truncation is no answer); else
    what follows the last "Answer:" on its line; else the last number. Boxed first because it is the
    unambiguous convention of math data (and what math-verify's own extraction prefers); the last number is
    the weakest signal, kept for short answers such as "so it is 42".

    >>> extract_answer(r"<think>2+2=5?</think> So \\boxed{4}, not 5.")
    '4'
    """
    answer = _split_think(completion)[1]
    if "\\boxed{" in answer:
        boxed = _last_boxed(answer)
        return None if boxed is None else boxed.strip()
    lines = _ANSWER_LINE.findall(answer)
    if lines:
        return lines[-1].strip().rstrip(".").strip()
    numbers = _NUMBER.findall(answer)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced braces: a truncated answer


def _as_math(s: str) -> str:
    # math-verify's LaTeX extraction needs delimiters: a bare "\frac{1}{2}" parses to nothing.
    return s if "$" in s or "\\boxed" in s else f"${s}$"


def accuracy_reward(prompts, completions, completion_ids=None, answer=None, **kwargs):
    """1.0 if the completion's final answer (see `extract_answer`) equals the `answer` column by math-verify,
    else 0.0; None where the reference itself does not parse (as TRL does: the sample cannot be scored) or is
    missing (a general prompt mixed into a reasoning set).

    math-verify bounds parse/verify time with signal.alarm, which only works in the main thread; elsewhere
    the timeouts are off (as in TRL). Cost on the 2-core dev machine: ~2 us per completion when reference and
    prediction are both integers (compared directly), ~1.6-2.3 ms through math-verify.

    >>> accuracy_reward(["1/4 + 1/4?"] * 3, [r"\\boxed{\\frac{1}{2}}", "Answer: 0.5", "Answer: 1/3"],
    ...                 answer=["1/2"] * 3)
    [1.0, 1.0, 0.0]
    """
    from math_verify import parse, verify

    answer = _need("answer", answer, "accuracy_reward")
    main = threading.current_thread() is threading.main_thread()
    parse_s, verify_s = (5, 5) if main else (None, None)
    golds = {}  # each prompt's reference is repeated G times: parse it once
    rewards = []
    for completion, ref in zip(completions, answer, strict=True):
        if ref is None:
            rewards.append(None)
            continue
        ref = str(ref).strip()
        pred = extract_answer(_text(completion))
        if _INTEGER.fullmatch(ref) and (pred is None or _INTEGER.fullmatch(pred)):
            rewards.append(float(pred is not None and int(ref.replace(",", "")) == int(pred.replace(",", ""))))
            continue
        if ref not in golds:
            golds[ref] = parse(_as_math(ref), parsing_timeout=parse_s)
        if not golds[ref]:
            rewards.append(None)
        elif pred is None:
            rewards.append(0.0)
        else:
            parsed = parse(_as_math(pred), parsing_timeout=parse_s)
            rewards.append(float(verify(golds[ref], parsed, timeout_seconds=verify_s)))
    return rewards


_COLUMN_STEP = re.compile(r"(\d)\+(\d)(\+1)?=(\d+)")
_ADDITION = re.compile(r"(\d+)\+(\d+)=")
# the built-in addition task's steps: a space between two columns' equations, and the end of the reasoning
ARITHMETIC_STEP_PATTERN = r"(?<=\d) (?=\d)|</think>"


def arithmetic_step_reward(prompts, completions, steps=None, answer=None, **kwargs):
    """Process reward for the built-in addition task, checked by rule: for each step (the `steps` kwarg, with
    rewards.step_pattern = ARITHMETIC_STEP_PATTERN), 1.0 if it is right, 0.0 if wrong, None if it is neither a
    column step nor the answer. The k-th column step ("x+y=s", "+1" for a carry in) is right when it adds the k-th
    digits of the problem (from the right) with the carry the true sum has there; the answer step is judged by
    accuracy_reward. A prompt that is not an addition "a+b=" gets None for every step.

    >>> arithmetic_step_reward(["47+38="], ["-"], steps=[["<think>7+8=15 ", "4+3=7</think>", "Answer: 85"]],
    ...                        answer=["85"])
    [[1.0, 0.0, 1.0]]
    """
    steps = _need("steps", steps, "arithmetic_step_reward (set rewards.step_pattern)")
    answer = _need("answer", answer, "arithmetic_step_reward")
    out = []
    for prompt, completion_steps, ref in zip(prompts, steps, answer, strict=True):
        problem = _ADDITION.search(_text(prompt))
        if problem is None:
            out.append([None] * len(completion_steps))
            continue
        a, b = problem.groups()
        width = max(len(a), len(b))
        # the true (x, y, carry in, sum) of each column, from the right; a chain may write leading-zero columns
        # (the built-in task writes as many as its widest problem has: "5+7=" as "5+7=12 0+0+1=1")
        columns, carry = [], 0
        for x, y in zip(reversed(a.zfill(width + 2)), reversed(b.zfill(width + 2))):
            columns.append((x, y, carry, int(x) + int(y) + carry))
            carry = columns[-1][3] // 10
        rewards, k = [], 0
        for step in completion_steps:
            column = _COLUMN_STEP.search(step)
            if column is not None:
                x, y, plus, total = column.groups()
                right = k < len(columns) and (x, y, int(plus is not None), int(total)) == columns[k]
                rewards.append(float(right))
                k += 1
            elif _ANSWER_LINE.search(step):
                rewards.append(accuracy_reward([prompt], [step], answer=[ref])[0])
            else:
                rewards.append(None)
        out.append(rewards)
    return out


# ---------------------------------------------------------------------------------------------- format

class FormatReward:
    """1.0 if a completion is "<think>reasoning</think>answer" with non-empty reasoning, no further think tags,
    and an answer part in which `answer_pattern` (a regex, searched) matches; else 0.0.

    think_in_prompt=False (default, R1 style): the completion itself must open with <think>.
    think_in_prompt=True: the chat template already ends the prompt with <think>, so the completion must
    start straight with the reasoning (a second <think> is a format error).
    None for rows whose `task` column is "general": the format is what reasoning answers owe.

    >>> FormatReward()(prompts=["q"], completions=["<think>6*7</think>Answer: 42"])
    [1.0]
    """

    __name__ = "format_reward"

    def __init__(self, answer_pattern: str = r"Answer:\s*\S", think_in_prompt: bool = False):
        self.answer_pattern = re.compile(answer_pattern)
        self.think_in_prompt = think_in_prompt

    def __call__(self, prompts, completions, completion_ids=None, task=None, **kwargs):
        tasks = task if task is not None else [None] * len(completions)
        return [None if t == "general" else float(self.well_formed(_text(c)))
                for c, t in zip(completions, tasks, strict=True)]

    def well_formed(self, text: str) -> bool:
        cot, closed, answer = text.partition(THINK_CLOSE)
        if not closed or THINK_OPEN in answer or THINK_CLOSE in answer:
            return False
        if not self.think_in_prompt:
            cot = cot.lstrip()
            if not cot.startswith(THINK_OPEN):
                return False
            cot = cot[len(THINK_OPEN):]
        return THINK_OPEN not in cot and bool(cot.strip()) and bool(self.answer_pattern.search(answer))


format_reward = FormatReward()


# ---------------------------------------------------------------------------------------------- language

# Scripts are Unicode names' first words ("LATIN SMALL LETTER A", "CYRILLIC ...", "CJK UNIFIED IDEOGRAPH-4E00").
# Chinese and Japanese share one group: Japanese prose is kanji + kana, so script alone cannot split them.
_SCRIPT_GROUPS = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "IDEOGRAPHIC": "CJK"}
# Scripts written without spaces: each character counts as one word.
_UNSPACED = {"CJK", "THAI"}
LANGUAGE_SCRIPTS = {
    **dict.fromkeys(["en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "pl", "cs", "ro", "hu",
                     "tr", "vi", "id", "ms", "sw"], "LATIN"),
    **dict.fromkeys(["zh", "ja"], "CJK"),
    "ko": "HANGUL",
    **dict.fromkeys(["ru", "uk", "bg", "be", "kk"], "CYRILLIC"),
    **dict.fromkeys(["ar", "fa", "ur"], "ARABIC"),
    **dict.fromkeys(["hi", "mr", "ne"], "DEVANAGARI"),
    "he": "HEBREW", "el": "GREEK", "th": "THAI",
}
_TAG = re.compile(r"<[^<>\s]*>")  # special tokens such as <|im_start|>: not words of any language


def _script(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    words = unicodedata.name(ch, "UNKNOWN").split()
    first = words[1] if words[0] in ("FULLWIDTH", "HALFWIDTH") and len(words) > 1 else words[0]
    return _SCRIPT_GROUPS.get(first, first)


def script_words(text: str) -> list[str]:
    """The script of each word of `text`: a word is a run of letters in one script, or one character of an
    unspaced script (CJK, Thai). Digits, symbols and <special> tags are not words.

    >>> script_words("Let x = 5, 所以 y")
    ['LATIN', 'LATIN', 'CJK', 'CJK', 'LATIN']
    """
    words, prev = [], None
    for ch in _TAG.sub(" ", text):
        script = _script(ch)
        if script is not None and (script != prev or script in _UNSPACED):
            words.append(script)
        prev = script
    return words


def _target_script(prompt: str, language: str | None) -> str | None:
    if language is not None:
        code = language.lower().replace("_", "-").split("-")[0]
        if code.upper() in LANGUAGE_SCRIPTS.values():
            return code.upper()
        if code not in LANGUAGE_SCRIPTS:
            scripts = sorted(set(LANGUAGE_SCRIPTS.values()))
            raise ValueError(f"unknown language {language!r}: use an ISO 639-1 code among "
                             f"{sorted(LANGUAGE_SCRIPTS)} or a script name among {scripts}")
        return LANGUAGE_SCRIPTS[code]
    words = script_words(prompt)
    return max(set(words), key=words.count) if words else None


def language_consistency_reward(prompts, completions, completion_ids=None, language=None, **kwargs):
    """DeepSeek-R1's language-consistency reward: the share of chain-of-thought words written in the target
    script, where the target is the `language` column's (ISO 639-1 code or script name) when the dataset has
    one, else the prompt's dominant script. Script detection via unicodedata, so it tells scripts apart,
    not languages that share one (English vs French). The CoT is the text inside <think>...</think> (the
    whole completion when it has no tags). None when the CoT or the prompt has no words to judge.

    String prompts may be rendered chat templates: tags like <|im_start|> are dropped, and the few role words
    left ("user", "assistant") rarely outweigh the question; set `language` where they could.

    >>> language_consistency_reward(["求 x 的值"], ["<think>先算 2+3 then add</think>Answer: 5"])
    [0.5]
    """
    languages = language if language is not None else [None] * len(completions)
    rewards = []
    for prompt, completion, lang in zip(prompts, completions, languages, strict=True):
        cot, answer = _split_think(_text(completion))
        words = script_words(answer if cot is None else cot)
        target = _target_script(_text(prompt), lang)
        rewards.append(words.count(target) / len(words) if words and target else None)
    return rewards


# ---------------------------------------------------------------------------------------------- length

class OverlongPenalty:
    """DAPO's soft overlong punishment on completion length |y| in tokens (max_length = L_max, buffer = L_cache):
    0 for |y| <= L_max - L_cache, then linear down to -1 at |y| = L_max, and -1 beyond.

    >>> OverlongPenalty(max_length=100, buffer=20)(prompts=[""] * 3, completions=[""] * 3,
    ...                                            completion_ids=[[0] * 80, [0] * 90, [0] * 100])
    [0.0, -0.5, -1.0]
    """

    __name__ = "overlong_penalty"

    def __init__(self, max_length: int, buffer: int):
        if not 0 < buffer <= max_length:
            raise ValueError(f"need 0 < buffer <= max_length, got buffer={buffer}, max_length={max_length}")
        self.max_length, self.buffer = max_length, buffer

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        ids = _need("completion_ids", completion_ids, "overlong_penalty")
        free = self.max_length - self.buffer
        return [max(-1.0, min(0.0, (free - len(c)) / self.buffer)) for c in ids]


# ---------------------------------------------------------------------------------------------- reward model

def render_conversation(tokenizer, prompt, completion) -> str:
    """prompt + completion as the text a reward model reads: through the chat template when the tokenizer has
    one (user = prompt, assistant = completion), else concatenated."""
    if tokenizer.chat_template is None:
        return _text(prompt) + _text(completion)
    messages = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]) + \
               (completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}])
    return tokenizer.apply_chat_template(messages, tokenize=False)


class RewardModelReward:
    """The score of a sequence-classification reward model (num_labels=1) on prompt + completion.

    With a `task` column, only rows whose task is not "reasoning" are scored (None elsewhere: rule rewards
    score those). Texts go through the tokenizer's chat template (user = prompt, assistant = completion) when it has one,
    else prompt + completion are concatenated; so prompts should be the raw question, not an already
    rendered template. Scored in batches of `batch_size` sorted by length (less padding), under no_grad.

    >>> rm = RewardModelReward("path/to/reward-model")              # doctest: +SKIP
    >>> rm(prompts=["2+2?"], completions=["4"])                       # doctest: +SKIP
    [0.83]
    """

    __name__ = "reward_model"

    def __init__(self, path_or_model, tokenizer=None, batch_size: int = 16, device=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(path_or_model, (str, Path)):
            model = AutoModelForSequenceClassification.from_pretrained(path_or_model, num_labels=1, use_safetensors=True,
                                                                       trust_remote_code=False)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path_or_model, trust_remote_code=False)
        elif tokenizer is None:
            raise ValueError("RewardModelReward needs a tokenizer when given a model object")
        else:
            model = path_or_model
        if model.config.num_labels != 1:
            raise ValueError(f"a reward model has num_labels=1, this one has {model.config.num_labels}")
        pad_id = model.config.get_text_config().pad_token_id
        if pad_id is None or tokenizer.pad_token_id != pad_id:
            # The classifier scores each row's last token that is not config.pad_token_id: batches pad with it.
            raise ValueError(f"batched scoring needs the tokenizer's pad token id ({tokenizer.pad_token_id}) to "
                             f"equal the model's config.pad_token_id ({pad_id})")
        self.model = model.eval() if device is None else model.to(device).eval()
        self.tokenizer, self.batch_size = tokenizer, batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids=None, task=None, **kwargs):
        if task is not None:  # R1 stage 4: rule rewards score reasoning prompts, the reward model the others
            general = [i for i, t in enumerate(task) if t != "reasoning"]
            scores = [None] * len(completions)
            if general:
                for i, s in zip(general, self([prompts[i] for i in general], [completions[i] for i in general])):
                    scores[i] = s
            return scores
        texts = [render_conversation(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        # The template already placed BOS/EOS where the model expects them (as TRL does).
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, padding=True, padding_side="right",
                                       return_tensors="pt").to(self.model.device)
            logits = self.model(**batch).logits[:, 0].float()  # (b,)
            for i, s in zip(chunk, logits.tolist()):
                scores[i] = s
        return scores


def environment_reward(prompts, completions, environment_reward=None, **kwargs):
    """The reward a multi-turn episode's environment gave it (fastgrpo/tools.py: Step.reward, or a TRL environment's
    get_reward()); None where it gave none or the run has no environment.

    >>> environment_reward(["q", "q"], ["a", "b"], environment_reward=[1.0, None])
    [1.0, None]
    """
    return list(environment_reward) if environment_reward is not None else [None] * len(completions)


# ---------------------------------------------------------------------------------------------- names

BUILTINS = {
    "accuracy": accuracy_reward,
    "arithmetic_steps": arithmetic_step_reward,
    "format": FormatReward,
    "language_consistency": language_consistency_reward,
    "overlong": OverlongPenalty,
    "reward_model": RewardModelReward,
    "process_reward_model": ProcessRewardModelReward,
    "code": CodeReward,
    "environment": environment_reward,
}


def resolve_reward(name: str, **options):
    """A reward function from a config name: a built-in name, or "package.module:function" (or
    "package.module.function") naming any TRL-style reward function. A name that resolves to a class is
    instantiated with `options`; a function takes none.

    >>> resolve_reward("overlong", max_length=1024, buffer=256)(prompts=[""], completions=[""],
    ...                                                         completion_ids=[[0] * 896])
    [-0.5]
    """
    if name in BUILTINS:
        target = BUILTINS[name]
    elif ":" in name or "." in name:
        module, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot resolve reward {name!r}: {_one_line(e)}") from e
    else:
        raise ValueError(f"unknown reward {name!r}: use one of {sorted(BUILTINS)} or 'package.module:function'")
    if isinstance(target, type):
        return target(**options)
    if options:
        raise TypeError(f"reward {name!r} is a function and takes no options, got {sorted(options)}")
    return target


# ---------------------------------------------------------------------------------------------- factory

def build_rewards(cfg: RewardConfig, *, funcs=None, device=None, max_completion_length: int | None = None,
                  overlong_buffer: int = 0, rule_only: bool = False) -> tuple[list, list[float]]:
    """(functions, weights): cfg.funcs with cfg.weights, or the caller's `funcs` (TRL's reward_funcs) with weight 1
    each; then DAPO's overlong penalty (weight 1) when overlong_buffer > 0, for completions of at most
    max_completion_length tokens.

    "reward_model" is the sequence-classification checkpoint cfg.reward_model, scoring on `device` (None: where it
    loads, the CPU); "process_reward_model" the token-classification checkpoint cfg.process_reward_model, likewise.
    rule_only leaves both out, with their weights: the rule rewards alone. "code" runs the completions' code in the
    sandbox cfg.code configures.

    >>> funcs, weights = build_rewards(RewardConfig(funcs=["accuracy"], weights=[2.0]), max_completion_length=64,
    ...                                overlong_buffer=16)
    >>> [reward_name(f) for f in funcs], weights
    (['accuracy_reward', 'overlong_penalty'], [2.0, 1.0])
    """
    if funcs is not None:
        funcs, weights = list(funcs), [1.0] * len(funcs)
    else:
        if len(cfg.funcs) != len(cfg.weights):
            raise ValueError(f"rewards.funcs has {len(cfg.funcs)} entries but rewards.weights has {len(cfg.weights)}")
        learned = ("reward_model", "process_reward_model")
        named = [(n, w) for n, w in zip(cfg.funcs, cfg.weights) if not (rule_only and n in learned)]
        funcs = [RewardModelReward(cfg.reward_model, device=device) if name == "reward_model"
                 else ProcessRewardModelReward(cfg.process_reward_model, device=device)
                 if name == "process_reward_model"
                 else CodeReward(cfg.code) if name == "code" else resolve_reward(name) for name, _ in named]
        weights = [w for _, w in named]
    if overlong_buffer:
        funcs, weights = [*funcs, OverlongPenalty(max_completion_length, overlong_buffer)], [*weights, 1.0]
    return funcs, weights
