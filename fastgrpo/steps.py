r"""Reasoning steps: where a completion's steps end, and the per-step rewards of process supervision.

With rewards.step_pattern set (a regular expression), a decoded completion is cut after every match: a step is the
text up to and including a match, and whatever follows the last match is the last step. Each step ends at the
token holding its last character, found by decoding prefixes of the completion's own token ids (never by
re-tokenizing the text, which need not give the same tokens). Reward functions receive the steps as `steps` (their
texts) and `step_ends` (those token indices), and a process reward function returns, for each completion, one
reward per step (a number, or None for a step it does not score); or, for steps of its own, a list of
(token index, reward) pairs. A number (or None) for a completion is an outcome reward: one step at its last token.

    >>> split_steps("<think>1+2=3 4+5=9</think>Answer: 93", r"(?<=\d) (?=\d)|</think>")
    [('<think>1+2=3 ', 13), ('4+5=9</think>', 26), ('Answer: 93', 36)]
"""

from __future__ import annotations

import bisect
import math
import re

from .data import decode


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"rewards.step_pattern={pattern!r} is not a regular expression: {e}") from e
    if compiled.match(""):
        raise ValueError(f"rewards.step_pattern={pattern!r} matches the empty string: every step would be empty")
    return compiled


def split_steps(text: str, pattern: str | re.Pattern) -> list[tuple[str, int]]:
    """(step text, end offset in `text`, exclusive) for each step of `text`; an empty text has no step."""
    steps, start = [], 0
    for match in re.finditer(pattern, text):
        if match.end() > start:
            steps.append((text[start:match.end()], match.end()))
            start = match.end()
    if start < len(text):
        steps.append((text[start:], len(text)))
    return steps


class _PrefixLengths:
    """len(decode(ids[:k])) for the k a bisection asks about, each decoded once."""

    def __init__(self, tokenizer, ids: list[int]):
        self.tokenizer, self.ids, self.cache = tokenizer, ids, {}

    def __len__(self):
        return len(self.ids) + 1

    def __getitem__(self, k: int) -> int:
        if k not in self.cache:
            self.cache[k] = len(decode(self.tokenizer, self.ids[:k]))
        return self.cache[k]


def find_steps(tokenizer, ids: list[int], pattern: str | re.Pattern) -> tuple[list[str], list[int]]:
    """A completion's steps: their texts and, for each, the index in `ids` of the token holding its last character.

    Token k holds the characters that decoding ids[:k+1] adds to ids[:k]; a step ending at offset e ends at the
    first k whose prefix ids[:k+1] decodes to at least e characters (about log2(len(ids)) decodes per step).
    """
    texts, ends = [], []
    prefix = _PrefixLengths(tokenizer, ids)
    for text, end in split_steps(decode(tokenizer, ids), pattern):
        texts.append(text)
        ends.append(min(bisect.bisect_left(prefix, end, lo=1) - 1, len(ids) - 1))
    return texts, ends


class StepError(ValueError):
    """A reward function's step rewards do not fit its completion; the message goes on after the function's name."""


def step_list(out, num_tokens: int, step_ends: list[int] | None) -> list[tuple[int, float]] | None:
    """One completion's reward from a reward function as (token index, reward) steps; None for an outcome reward.

    out: a number or None (an outcome reward: returns None, the caller keeps the number); a list with one number (or
    None) per step of `step_ends`; or a list of (token index, number or None) pairs. None rewards become NaN.
    """
    if out is None or not isinstance(out, (list, tuple)):
        return None
    if all(isinstance(x, (list, tuple)) and len(x) == 2 for x in out) and out:
        steps = [(int(end), _number(r)) for end, r in out]
        if any(not 0 <= end < num_tokens for end, _ in steps):
            raise StepError(f"returned a step ending outside its completion of {num_tokens} tokens")
        return steps
    if step_ends is None:
        raise StepError("returned step rewards, but the run finds no steps: set rewards.step_pattern, or return "
                        "(token index, reward) pairs")
    if len(out) != len(step_ends):
        raise StepError(f"returned {len(out)} step rewards for a completion of {len(step_ends)} steps")
    return [(end, _number(r)) for end, r in zip(step_ends, out)]


def _number(r) -> float:
    return math.nan if r is None else float(r)


def merge(per_func: list[list[tuple[int, float]]], weights: list[float]) -> list[tuple[int, float]]:
    """The weighted steps of every function on one completion, as one list: the rewards of steps ending on the
    same token added (NaN where none of them applies), in token order."""
    at: dict[int, float] = {}
    for steps, w in zip(per_func, weights):
        for end, r in steps:
            if math.isnan(r):
                at.setdefault(end, math.nan)
            else:
                at[end] = (0.0 if math.isnan(at.get(end, math.nan)) else at[end]) + w * r
    return sorted(at.items())
