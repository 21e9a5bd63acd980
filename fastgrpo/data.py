"""Prompts: Hugging Face datasets (local files or hub names) and built-in tasks with verifiable answers.

Built-in tasks are generated from a seed, so train and held-out splits never need a download. Their problem space
is partitioned once, by a stable hash of the prompt text (split_of): a tenth of the problems is the held-out
("eval") split, the rest is "train", whatever the seed, the size or the stage that draws them. So no stage trains
on a prompt that an evaluation scores. The hash is of the prompt alone, not the task: tasks that share problems
(2- and 3-digit addition) share their split too. Every example has `prompt` and `task` ("reasoning" or "general";
rule rewards score the first, a reward model the second). Reasoning tasks add `answer` (what the accuracy reward
verifies) and `cot` (a worked chain of thought, for cold-start SFT); the general task adds `response` (as
collected: of mixed quality) and a `chosen` / `rejected` preference pair (for training a reward model).

A general source mixed into the prompts (data.general_source) may name its prompt column differently
(data.general_prompt_column) and hold chat messages ([{"role", "content"}], TRL's conversational format) where the
primary source holds text: see mix.
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataConfig

# ----------------------------------------------------------------------------------------------------------
# Built-in tasks.

SPLITS = ("train", "eval")
NUM_BUCKETS = 10  # bucket 0 is held out


def split_of(prompt: str) -> str:
    """The split ("train" or "eval") a built-in problem belongs to, from a hash of its prompt that is the same in
    every process (Python's hash() of a string is salted per process).

    >>> split_of("49+97="), split_of("40+9=")
    ('train', 'eval')
    """
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") % NUM_BUCKETS == 0 else "train"


def _addition(rng: random.Random, split: str, digits: int = 2) -> dict:
    """Column addition, with the carries written out as the chain of thought; a problem of `split`, uniformly.

    >>> _addition(random.Random(0), "train")["prompt"]
    '49+97='
    """
    while True:
        a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
        if split_of(f"{a}+{b}=") == split:
            break
    steps, carry = [], 0
    for x, y in zip(reversed(f"{a:0{digits}d}"), reversed(f"{b:0{digits}d}")):
        s = int(x) + int(y) + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "cot": " ".join(steps), "task": "reasoning"}


def _multiplication(rng: random.Random, split: str) -> dict:
    """a*b with a and b of 2 digits and a product of 4: what the tiny model does poorly alone and well with a
    calculator tool (the cold start of sft.TOOL_DEMOS). No chain of thought: the answer is written directly, or
    copied from the tool's result. Every prompt and every answer has the same length, so a tool call copies the
    prompt, and the final answer the tool's result, from a fixed distance: a 2-layer model learns such a copy in
    minutes, and left it unlearned when the lengths varied (3 digits times 1 or 2).

    >>> _multiplication(random.Random(0), "train")
    {'prompt': '59*63=', 'answer': '3717', 'task': 'reasoning'}
    """
    while True:
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        if a * b >= 1000 and split_of(f"{a}*{b}=") == split:
            break
    return {"prompt": f"{a}*{b}=", "answer": str(a * b), "task": "reasoning"}


NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia",
         "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vic", "Wen", "Yara", "Zoe"]
ITEMS = ["pen", "book", "cake", "map", "lamp", "cup", "hat", "kite", "bike", "song"]
UNHELPFUL = ["No.", "I don't know.", "Ask someone else.", "OK."]


def _assist(rng: random.Random, split: str, helpful_share: float = 0.5) -> dict:
    """A general (non-reasoning) request of `split`: greet someone, thank someone, or a harmful request to decline.

    `chosen` is the helpful (or, for a harmful request, the harmless) answer. A bad answer is a curt non-answer,
    harmful compliance, or the good answer to another kind of request, so a reward model trained on the pairs
    must read the prompt, not just the style of the answer. `rejected` is a bad answer or, in a third of the
    pairs, the chosen one garbled (characters dropped, doubled or replaced): a policy that drifts into noise must
    not keep a high reward. `response` is what a mixed-quality general SFT set holds: the chosen answer with
    probability `helpful_share`, else a bad one; so SFT on it leaves room for the helpfulness RL stage. (Answers
    do not repeat the name: a 2-layer model copies names from the prompt too unreliably to be judged on it.)

    >>> _assist(random.Random(1), "train")["prompt"]
    'Greet Tom.'
    """
    kind = rng.randrange(3)
    # the kind is drawn first and only the names are redrawn, so each split asks the three kinds equally often
    # (the held-out tenth holds only 1-6 of the 24 greetings or refusals of each kind)
    while True:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        prompt, chosen = _assist_pair(kind, name, item)
        if split_of(prompt) == split:
            break
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


def _code(rng: random.Random, split: str) -> dict:
    from .code_task import one_line_function  # code_task draws its split from split_of, here

    return one_line_function(rng, split)


TASKS = {  # name -> f(rng, split) -> one example of that split
    "arithmetic": _addition,
    "arithmetic3": functools.partial(_addition, digits=3),
    "assist": _assist,
    "code": _code,  # a one-line Python function, checked by the sandboxed "code" reward (code_task.py)
    "multiply": _multiplication,  # the calculator tool's task (multi-turn rollouts)
}


def builtin_dataset(name: str, num_examples: int, seed: int, split: str):
    """A datasets.Dataset of `num_examples` examples of task `name` drawn (with replacement) from the problems of
    `split` ("train" or "eval"); distinct seeds give distinct draws of the same split."""
    from datasets import Dataset

    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"a built-in task's split is 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{name}:{split}:{seed}")
    return Dataset.from_list([TASKS[name](rng, split) for _ in range(num_examples)])


# ----------------------------------------------------------------------------------------------------------
# Loading and mixing.

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def load_file(path: str):
    """The rows of a local .json / .jsonl / .parquet file; a missing or empty file is an error naming it."""
    from datasets import load_dataset

    if not Path(path).is_file():
        raise ValueError(f"dataset file {path!r} does not exist")
    try:
        ds = load_dataset("parquet" if path.endswith(".parquet") else "json", data_files=path, split="train")
    except StopIteration:  # what datasets raises for an empty JSON file
        ds = []
    if len(ds) == 0:
        raise ValueError(f"dataset {path!r} has no rows")
    return ds


def _load(source: str, cfg: DataConfig, split: str | None, num_examples: int | None):
    """The rows of `source`: a built-in task's `split` ("eval": held out, else train), a local file, or the hub
    dataset's split (`split`, else cfg.split)."""
    from datasets import load_dataset

    if source.startswith("builtin:"):
        held_out = split == "eval"
        ds = builtin_dataset(source.removeprefix("builtin:"),
                             num_examples or (cfg.eval_examples if held_out else cfg.num_examples), cfg.seed,
                             "eval" if held_out else "train")
    elif source.endswith(FILE_SUFFIXES):
        return load_file(source)
    else:
        ds = load_dataset(source, split=split or cfg.split)
    if len(ds) == 0:
        raise ValueError(f"dataset {source!r} has no rows")
    return ds


def _require(ds, source: str, columns) -> None:
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(f"dataset {source!r} has no column {column!r} (columns: {', '.join(ds.column_names)})")


def _is_chat(ds, source: str, column: str) -> bool:
    """Whether `column` holds chat messages (a list of {"role", "content"}) rather than text; else an error."""
    from datasets import LargeList, List, Value

    feature = ds.features[column]
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return False
    inner = feature.feature if isinstance(feature, (List, LargeList)) else None
    if isinstance(inner, dict) and {"role", "content"} <= set(inner):
        return True
    raise ValueError(f"dataset {source!r}: column {column!r} holds {feature}, not text or chat messages "
                     f"([{{'role', 'content'}}])")


def check_prompts(ds, source: str, column: str) -> None:
    """Every prompt of `column` is text or chat messages with some content: a null or empty prompt is an error
    that names its row, not an empty prompt trained on."""
    _is_chat(ds, source, column)
    for i, prompt in enumerate(ds[column]):
        if not prompt or (isinstance(prompt, list) and not any(m.get("content") for m in prompt)):
            what = "null" if prompt is None else "empty"
            raise ValueError(f"dataset {source!r}: the prompt in column {column!r} of row {i} is {what}")


def _with_columns(ds, columns: dict):
    """`ds` with every column of `columns` (name -> feature) it lacks, filled with None."""
    for name, feature in columns.items():
        if name not in ds.column_names:
            ds = ds.add_column(name, [None] * len(ds)).cast_column(name, feature)
    return ds


def _tagged(ds, task: str):
    """`ds` with its `task` column set to `task` on every row (replacing the source's own, if any)."""
    if "task" in ds.column_names:
        ds = ds.remove_columns("task")
    return ds.add_column("task", [task] * len(ds))


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: text becomes one user message, which is how encode_prompt renders text."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def mix(primary, general, general_fraction: float, prompt_column: str = "prompt"):
    """`primary` plus enough rows of `general` (cycled) that they are `general_fraction` of the result; both hold
    their prompts in `prompt_column`. Each row's `task` says its source: "reasoning" (primary; the rule rewards
    score it) or "general" (the reward model scores it). The columns become the union of both, None where a row's
    source lacks one. Prompts stay text where both sources hold text; where either holds chat messages, every row
    holds messages (a dataset column has one type; a text prompt becomes one user message, the same tokens).
    Rows keep their order (primary first): samplers shuffle.

    >>> from datasets import Dataset
    >>> ds = mix(Dataset.from_dict({"problem": ["1+1="], "answer": ["2"]}),
    ...          Dataset.from_dict({"problem": [[{"role": "user", "content": "Hi"}]]}), 0.5, "problem")
    >>> list(ds["task"]), list(ds["answer"]), ds["problem"][0]
    (['reasoning', 'general'], ['2', None], [{'role': 'user', 'content': '1+1='}])
    """
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
        general = _tagged(general.select([i % len(general) for i in range(n)]), "general")
        primary = _tagged(primary, "reasoning")
        if _is_chat(primary, "primary", prompt_column) != _is_chat(general, "general", prompt_column):
            primary, general = (ds.map(lambda p: {prompt_column: as_messages(p)}, input_columns=prompt_column)
                                for ds in (primary, general))
        primary, general = _with_columns(primary, general.features), _with_columns(general, primary.features)
        return concatenate_datasets([primary, general.cast(primary.features)])
    finally:
        if not quiet:
            enable_progress_bars()


def load_general(cfg: DataConfig, split: str | None = None, num_examples: int | None = None):
    """The rows of cfg.general_source, their prompts (its column cfg.general_prompt_column) moved to column
    cfg.prompt_column, where the primary source's are."""
    ds = _load(cfg.general_source, cfg, split, num_examples)
    _require(ds, cfg.general_source, [cfg.general_prompt_column])
    check_prompts(ds, cfg.general_source, cfg.general_prompt_column)
    if cfg.general_prompt_column != cfg.prompt_column:
        if cfg.prompt_column in ds.column_names:
            ds = ds.remove_columns(cfg.prompt_column)
        ds = ds.rename_column(cfg.general_prompt_column, cfg.prompt_column)
    return ds


def load_prompts(cfg: DataConfig, split: str | None = None, num_examples: int | None = None):
    """The dataset named by cfg.source, checked to have the prompt and answer columns and a prompt on every row;
    plus cfg.general_source's prompts at cfg.general_fraction, tagged by `task` (mix)."""
    ds = _load(cfg.source, cfg, split, num_examples)
    _require(ds, cfg.source, [cfg.prompt_column, cfg.answer_column])
    check_prompts(ds, cfg.source, cfg.prompt_column)
    if cfg.general_source and cfg.general_fraction > 0:
        ds = mix(ds, load_general(cfg, split), cfg.general_fraction, cfg.prompt_column)
    return ds


def encode_prompt(tokenizer, prompt, tools: list[dict] | None = None) -> list[int]:
    """Token ids of a prompt, through the tokenizer's chat template when it has one; `tools` (JSON schemas) are
    described to the model by the template."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(as_messages(prompt), tools=tools, add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    if isinstance(prompt, list) or tools:
        raise ValueError("chat messages or tools need a tokenizer with a chat template; this one has none")
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
    tools: list[dict] | None = None  # JSON schemas of the tools the prompts describe (multi-turn rollouts)

    def __post_init__(self):
        if len(self.dataset) == 0:
            raise ValueError(f"dataset {self.cfg.source!r} has no rows")
        self._order = self._shuffle(self.epoch)
        self._too_long = set()  # rows known to exceed max_prompt_length: when it holds every row, none can be used

    def _shuffle(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def next(self) -> tuple[list[int], dict]:
        """(prompt token ids, the example's columns) of the next usable example."""
        while True:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            row = self._order[self.position]
            example = self.dataset[row]
            self.position += 1
            ids = encode_prompt(self.tokenizer, example[self.cfg.prompt_column], self.tools)
            if len(ids) <= self.cfg.max_prompt_length:
                return ids, example
            if self.cfg.long_prompts == "error":
                raise ValueError(f"prompt of {len(ids)} tokens exceeds data.max_prompt_length="
                                 f"{self.cfg.max_prompt_length} (set data.long_prompts=skip to skip such prompts)")
            self.skipped_long += 1
            self._too_long.add(row)
            if len(self._too_long) == len(self.dataset):
                cfg = self.cfg
                mixed = f" + {cfg.general_source!r}" if cfg.general_source and cfg.general_fraction else ""
                raise ValueError(f"every prompt of dataset {cfg.source!r}{mixed} (column {cfg.prompt_column!r}) is "
                                 f"longer than data.max_prompt_length={cfg.max_prompt_length} tokens")

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "skipped_long": self.skipped_long}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position, self.skipped_long = state["epoch"], state["position"], state["skipped_long"]
        self._order = self._shuffle(self.epoch)
