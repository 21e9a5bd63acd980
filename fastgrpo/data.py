"""Prompts: Hugging Face datasets (local files or hub names) and built-in tasks with verifiable answers.

Built-in tasks are generated from a seed, so train and held-out splits never need a download. Every example
has `prompt` and `task` ("reasoning" or "general"; rule rewards score the first, a reward model the second).
Reasoning tasks add `answer` (what the accuracy reward verifies) and `cot` (a worked chain of thought, for
cold-start SFT); the general task adds `response` (as collected: of mixed quality) and a `chosen` / `rejected`
preference pair (for training a reward model).
"""

from __future__ import annotations

import functools
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
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "cot": " ".join(steps), "task": "reasoning"}


NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia",
         "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vic", "Wen", "Yara", "Zoe"]
ITEMS = ["pen", "book", "cake", "map", "lamp", "cup", "hat", "kite", "bike", "song"]
UNHELPFUL = ["No.", "I don't know.", "Ask someone else.", "OK."]


def _assist(rng: random.Random, helpful_share: float = 0.5) -> dict:
    """A general (non-reasoning) request: greet someone, thank someone, or a harmful request to decline.

    `chosen` is the helpful (or, for a harmful request, the harmless) answer. A bad answer is a curt non-answer,
    harmful compliance, or the good answer to another kind of request, so a reward model trained on the pairs
    must read the prompt, not just the style of the answer. `rejected` is a bad answer or, in a third of the
    pairs, the chosen one garbled (characters dropped, doubled or replaced): a policy that drifts into noise must
    not keep a high reward. `response` is what a mixed-quality general SFT set holds: the chosen answer with
    probability `helpful_share`, else a bad one; so SFT on it leaves room for the helpfulness RL stage. (Answers
    do not repeat the name: a 2-layer model copies names from the prompt too unreliably to be judged on it.)

    >>> _assist(random.Random(1))["prompt"]
    'Greet Eli.'
    """
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(3)
    prompt, chosen = _assist_pair(kind, name, item)
    miss = rng.random()
    if miss < 0.6:
        bad = f"Hit {name} hard." if kind == 2 and miss < 0.3 else rng.choice(UNHELPFUL)
    else:
        bad = _assist_pair(rng.choice([k for k in range(3) if k != kind]), name, item)[1]
    rejected = _garble(rng, chosen) if rng.random() < 1 / 3 else bad
    response = chosen if rng.random() < helpful_share else bad
    return {"prompt": prompt, "task": "general", "response": response, "chosen": chosen, "rejected": rejected}


def _garble(rng: random.Random, text: str) -> str:
    """`text` with a quarter to a half of its characters dropped, doubled or replaced by a random letter."""
    rate, out = rng.uniform(0.25, 0.5), []
    for ch in text:
        r = rng.random()
        if r < rate / 3:
            continue
        out.append(ch + ch if r < 2 * rate / 3 else rng.choice("aehnotu ") if r < rate else ch)
    return "".join(out) or "."


def _assist_pair(kind: int, name: str, item: str) -> tuple[str, str]:
    """(request, the answer it deserves) for one of the three kinds of request."""
    if kind == 0:
        return f"Greet {name}.", "Hello, nice to meet you!"
    if kind == 1:
        return f"Thank {name} for the {item}.", "Thank you so much, that was kind!"
    return f"How can I hurt {name}?", "I won't help hurt anyone. Talk to someone you trust."


TASKS = {
    "arithmetic": _addition,
    "arithmetic3": functools.partial(_addition, digits=3),
    "assist": _assist,
}


def builtin_dataset(name: str, num_examples: int, seed: int):
    """A datasets.Dataset of `num_examples` examples of task `name`; distinct seeds give distinct splits."""
    from datasets import Dataset

    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{name}:{seed}")
    return Dataset.from_list([TASKS[name](rng) for _ in range(num_examples)])


def _load(source: str, cfg: DataConfig, split: str | None, num_examples: int | None):
    from datasets import load_dataset

    if source.startswith("builtin:"):
        held_out = split == "eval"
        return builtin_dataset(source.removeprefix("builtin:"),
                               num_examples or (cfg.eval_examples if held_out else cfg.num_examples),
                               cfg.seed + (1_000_003 if held_out else 0))
    if source.endswith((".json", ".jsonl", ".parquet")):
        kind = "parquet" if source.endswith(".parquet") else "json"
        return load_dataset(kind, data_files=source, split="train")
    return load_dataset(source, split=split or cfg.split)


def _with_columns(ds, columns: dict):
    """`ds` with every column of `columns` (name -> feature) it lacks, filled with None."""
    for name, feature in columns.items():
        if name not in ds.column_names:
            ds = ds.add_column(name, [None] * len(ds)).cast_column(name, feature)
    return ds


def mix(primary, general, general_fraction: float):
    """`primary` plus enough rows of `general` (cycled) that they are `general_fraction` of the result; the
    columns become the union of both, None where a row's source lacks one. Rows keep their order (primary
    first): samplers shuffle."""
    from datasets import concatenate_datasets

    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if not 0 <= general_fraction < 1:
        raise ValueError(f"data.general_fraction must be in [0, 1), got {general_fraction}")
    n = round(len(primary) * general_fraction / (1 - general_fraction))
    if n == 0 or len(general) == 0:
        return primary
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # a bar per added column is noise
    try:
        general = general.select([i % len(general) for i in range(n)])
        primary, general = _with_columns(primary, general.features), _with_columns(general, primary.features)
        return concatenate_datasets([primary, general.cast(primary.features)])
    finally:
        if not quiet:
            enable_progress_bars()


def load_prompts(cfg: DataConfig, split: str | None = None, num_examples: int | None = None):
    """The dataset named by cfg.source (plus cfg.general_source's prompts at cfg.general_fraction), checked to
    have the prompt and answer columns."""
    ds = _load(cfg.source, cfg, split, num_examples)
    for column in (cfg.prompt_column, cfg.answer_column):
        if column not in ds.column_names:
            raise ValueError(f"dataset {cfg.source!r} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    if cfg.general_source and cfg.general_fraction > 0:
        general = _load(cfg.general_source, cfg, split, None)
        if cfg.prompt_column not in general.column_names:
            raise ValueError(f"dataset {cfg.general_source!r} has no column {cfg.prompt_column!r} "
                             f"(columns: {', '.join(general.column_names)})")
        ds = mix(ds, general, cfg.general_fraction)
    return ds


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt, through the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def decode(tokenizer, ids: list[int]) -> str:
    """A completion's text. Special tokens such as <think> carry the format the rewards check, so only EOS and
    padding are dropped."""
    drop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return tokenizer.decode([t for t in ids if t not in drop], skip_special_tokens=False)


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
