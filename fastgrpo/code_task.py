"""The built-in code task: write a one-line Python function f(x) for an integer operation described in words.

Small enough for the tiny model (a prompt of ~40 characters, a solution of ~25), checked by running the completion's
code against assert statements (the "code" reward, sandbox.py). Problems are split into train and held-out by the
hash of their prompt (data.split_of), like every built-in task. Each example has `prompt`, `answer` (a reference
solution as a fenced block, the shape a completion should take), `tests` (assert statements on fixed inputs, negative
ones included) and `task` "reasoning" (a rule reward scores it).

    >>> one_line_function(random.Random(0), "train")["prompt"]
    'Python f(x): divide x by 14, rounding down.'
"""

from __future__ import annotations

import functools
import random

from .data import split_of

INPUTS = (-30, -7, 0, 1, 6, 45, 1000)  # 1000 tells floor divisions and remainders by close constants apart
CONSTANTS = range(1, 20)

# kind -> (what f returns, in words; its expression; its value), with constants a and b
KINDS = {
    "add": ("add {a} to x", "x + {a}", lambda x, a, b: x + a),
    "subtract": ("subtract {a} from x", "x - {a}", lambda x, a, b: x - a),
    "multiply": ("multiply x by {a}", "x * {a}", lambda x, a, b: x * a),
    "multiply_add": ("multiply x by {a}, then add {b}", "x * {a} + {b}", lambda x, a, b: x * a + b),
    "square_add": ("square x, then add {a}", "x * x + {a}", lambda x, a, b: x * x + a),
    "remainder": ("x modulo {a}", "x % {a}", lambda x, a, b: x % a),
    "floor_divide": ("divide x by {a}, rounding down", "x // {a}", lambda x, a, b: x // a),
}
ONE_IS_TRIVIAL = {"multiply", "multiply_add", "remainder", "floor_divide"}  # by 1 (or mod 1): not a distinct problem


def _problem(kind: str, a: int, b: int) -> dict:
    described, expression, value = KINDS[kind]
    described, expression = described.format(a=a, b=b), expression.format(a=a, b=b)
    return {"prompt": f"Python f(x): {described}.", "answer": f"```python\ndef f(x): return {expression}\n```",
            "tests": [f"assert f({x}) == {value(x, a, b)}" for x in INPUTS], "task": "reasoning"}


@functools.cache
def problems(split: str) -> dict[str, list[dict]]:
    """Every problem of `split` ("train" or "eval"), by kind."""
    out = {}
    for kind, (described, _, _) in KINDS.items():
        seconds = CONSTANTS if "{b}" in described else [0]
        firsts = [a for a in CONSTANTS if a > 1 or kind not in ONE_IS_TRIVIAL]
        pool = [_problem(kind, a, b) for a in firsts for b in seconds]
        out[kind] = [p for p in pool if split_of(p["prompt"]) == split]
    return out


def one_line_function(rng: random.Random, split: str) -> dict:
    """One problem of `split`: a kind drawn uniformly (so each split asks every kind equally often, however many
    constants it has), then one of that kind's problems."""
    by_kind = problems(split)
    kind = rng.choice([k for k in KINDS if by_kind[k]])
    return dict(rng.choice(by_kind[kind]))
