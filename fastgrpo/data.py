"""Prompts: Hugging Face datasets (local files or hub names) and built-in tasks with verifiable answers.

Built-in tasks are generated from a seed, so train and held-out splits never need a download. Each example has
`prompt`, `answer` (what the accuracy reward verifies) and `cot` (a worked chain of thought, for cold-start
SFT).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .config import DataConfig

# ----------------------------------------------------------------------------------------------------------
# Built-in tasks.


def _addition(rng: random.Random, digits: int = 2) -> dict:
    """Column addition, with the carries written out as the chain of thought.

    >>> _addition(random.Random(0))["prompt"]
    '49+97='
    """
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    steps, carry = [], 0
    for x, y in zip(reversed(f"{a:0{digits}d}"), reversed(f"{b:0{digits}d}")):
        s = int(x) + int(y) + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "cot": " ".join(steps)}


TASKS = {"arithmetic": _addition}


def builtin_dataset(name: str, num_examples: int, seed: int):
    """A datasets.Dataset of `num_examples` examples of task `name`; distinct seeds give distinct splits."""
    from datasets import Dataset

    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{name}:{seed}")
    return Dataset.from_list([TASKS[name](rng) for _ in range(num_examples)])


def load_prompts(cfg: DataConfig, split: str | None = None, num_examples: int | None = None):
    """The dataset named by cfg.source, checked to have the prompt and answer columns."""
    from datasets import load_dataset

    source = cfg.source
    if source.startswith("builtin:"):
        held_out = split == "eval"
        ds = builtin_dataset(source.removeprefix("builtin:"),
                             num_examples or (cfg.eval_examples if held_out else cfg.num_examples),
                             cfg.seed + (1_000_003 if held_out else 0))
    elif source.endswith((".json", ".jsonl", ".parquet")):
        kind = "parquet" if source.endswith(".parquet") else "json"
        ds = load_dataset(kind, data_files=source, split="train")
    else:
        ds = load_dataset(source, split=split or cfg.split)
    for column in (cfg.prompt_column, cfg.answer_column):
        if column not in ds.column_names:
            raise ValueError(f"dataset {source!r} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    return ds


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt, through the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


@dataclass
class PromptSampler:
    """Prompts in a seeded, reshuffled-per-epoch order; (epoch, position) is all a resume needs."""

    dataset: object
    tokenizer: object
    cfg: DataConfig
    epoch: int = 0
    position: int = 0
    skipped_long: int = 0

    def __post_init__(self):
        self._order = self._shuffle(self.epoch)

    def _shuffle(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def next(self) -> tuple[list[int], dict]:
        """(prompt token ids, the example's columns) of the next usable example."""
        while True:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            example = self.dataset[self._order[self.position]]
            self.position += 1
            ids = encode_prompt(self.tokenizer, example[self.cfg.prompt_column])
            if len(ids) <= self.cfg.max_prompt_length:
                return ids, example
            if self.cfg.long_prompts == "error":
                raise ValueError(f"prompt of {len(ids)} tokens exceeds data.max_prompt_length="
                                 f"{self.cfg.max_prompt_length} (set data.long_prompts=skip to skip such prompts)")
            self.skipped_long += 1

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "skipped_long": self.skipped_long}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position, self.skipped_long = state["epoch"], state["position"], state["skipped_long"]
        self._order = self._shuffle(self.epoch)
