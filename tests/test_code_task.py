import doctest

import torch

from fastgrpo import code_task
from fastgrpo.config import DataConfig, RewardConfig
from fastgrpo.data import builtin_dataset, load_prompts, split_of
from fastgrpo.rewards import build_rewards


def test_doctests():
    assert doctest.testmod(code_task).failed == 0


def _all_problems():
    return [p for split in ("train", "eval") for kind in code_task.problems(split).values() for p in kind]


def test_the_splits_are_disjoint_and_each_dataset_draws_from_its_own():
    train = {p["prompt"] for kind in code_task.problems("train").values() for p in kind}
    held_out = {p["prompt"] for kind in code_task.problems("eval").values() for p in kind}
    assert train and held_out and not train & held_out
    for split in ("train", "eval"):
        ds = builtin_dataset("code", 200, seed=3, split=split)
        assert {split_of(p) for p in ds["prompt"]} == {split}
    assert builtin_dataset("code", 50, 0, "train")["prompt"] != builtin_dataset("code", 50, 1, "train")["prompt"]


def test_the_tests_tell_every_problem_apart():
    """Distinct prompts have distinct tests, so a solution to one problem cannot pass another's."""
    problems = _all_problems()
    assert len({tuple(p["tests"]) for p in problems}) == len({p["prompt"] for p in problems}) == len(problems)


def test_reference_solutions_pass_in_the_sandbox_and_wrong_ones_do_not():
    ds = load_prompts(DataConfig(source="builtin:code", num_examples=12, seed=0))
    funcs, _ = build_rewards(RewardConfig(funcs=["code"], weights=[1.0]))
    try:
        right = list(ds["answer"])
        wrong = right[1:] + right[:1]  # each row given another row's solution
        texts = right + [w.replace("return x", "return -x") for w in right] + wrong
        rewards = torch.tensor(funcs[0](prompts=["p"] * len(texts), completions=texts, tests=list(ds["tests"]) * 3))
    finally:
        funcs[0].close()
    n = len(right)
    assert rewards[:n].tolist() == [1.0] * n
    assert (rewards[n:2 * n] < 1).all()
    differs = [a != b for a, b in zip(ds["tests"], ds["tests"][1:] + ds["tests"][:1])]
    assert all(r < 1 for r, d in zip(rewards[2 * n:].tolist(), differs) if d)
