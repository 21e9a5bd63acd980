"""Process reward model (DeepSeekMath 4.1.3): a score at the end of every reasoning step, for process supervision.

    python -m fastgrpo.prm configs/prm_tiny.yaml [key=value ...]

A causal LM gets a scalar per-token head (AutoModelForTokenClassification, num_labels=1) and learns binary cross-
entropy on the logit of each step's last token; every other token's logit contributes nothing. Rows hold a
`prompt`, its `steps` (texts) and one label per step (`labels`: 0/1 or a float in [0, 1], null for a step not
trained on): the shape of PRM800K and Math-Shepherd. A row is the prompt encoded as the trainer encodes it
(data.encode_prompt), then each step tokenized on its own and concatenated, so each step ends on a token of its own.

The built-in sources builtin:arithmetic_steps (2 digits) and builtin:arithmetic3_steps label themselves: chains of
thought for the addition task's problems, right or with one column added wrong or one carry dropped, each step
checked by rewards.arithmetic_step_reward (the rule the "arithmetic_steps" process reward uses). With data.policy
set, a policy checkpoint's own samples (vLLM in process) are added, labelled the same way (label_samples) or, with
data.labels=rollouts, as Math-Shepherd does: by the share of the policy's continuations from each step's end that
reach the right answer (rollout_labels). Train and held-out rows come from the task's disjoint splits
(data.split_of); a file's last data.eval_examples rows are held out.

The result, run_dir/final, loads with ProcessRewardModelReward(path) (the built-in reward "process_reward_model",
checkpoint rewards.process_reward_model): at RL time it scores each step of a completion found by
rewards.step_pattern. run_dir/eval.json holds the held-out step accuracy and AUC. Checkpoints, resume and the
finished-run no-op are reward_model.py's: a killed run resumes from its latest checkpoint and ends exactly as an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import LogConfig, ModelConfig, load_cli_config, to_yaml
from .config_doc import help_text
from .data import builtin_dataset, check_prompts, decode, encode_prompt, load_file
from .metrics import MetricsLogger, Timer, peak_memory_mib
from .models import load_model
from .precision import autocast
from .runs import check_model_path, command_line, lock_run_dir, model_summary
from .steps import find_steps, split_steps

# rewards.py imports this module (its "process_reward_model" built-in), so what comes from rewards (and from
# reward_model, evaluate and generation, which import it) is imported where it is used.

STEP_SOURCES = {"arithmetic_steps": "arithmetic", "arithmetic3_steps": "arithmetic3"}  # builtin:<name> -> its task


@dataclass
class PRMDataConfig:
    source: str = "builtin:arithmetic_steps"  # builtin:arithmetic_steps | builtin:arithmetic3_steps | a data file
    prompt_column: str = "prompt"
    steps_column: str = "steps"
    labels_column: str = "labels"
    num_examples: int = 2000  # training chains of a built-in source
    eval_examples: int = 200  # held-out chains: the task's held-out problems, or a file's last rows
    max_length: int = 256  # tokens of prompt + steps; longer rows are skipped and counted
    seed: int = 0
    # a policy checkpoint whose samples on the task's prompts, labelled step by step, are added (built-in sources)
    policy: str | None = None
    policy_prompts: int = 64  # train prompts it samples on
    policy_eval_prompts: int = 16  # held-out prompts it samples on
    samples_per_prompt: int = 4
    # how the samples' steps are labelled: "rule" (arithmetic_step_reward) or "rollouts" (Math-Shepherd: the share of
    # data.rollouts continuations of the policy from the step's end that reach the right answer)
    labels: str = "rule"
    rollouts: int = 4
    temperature: float = 1.0
    max_completion_length: int = 64
    kv_cache_gib: float = 0.25


@dataclass
class PRMTrainConfig:
    steps: int = 200
    chains_per_step: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class PRMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PRMDataConfig = field(default_factory=PRMDataConfig)
    train: PRMTrainConfig = field(default_factory=PRMTrainConfig)
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/prm"))


# ---------------------------------------------------------------------------------------------- labelled steps

def label_samples(prompts, completions, answers, steps=None, pattern: str | None = None) -> list[dict]:
    """{prompt, steps, labels} rows of the built-in addition task's completions, each step labelled by
    rewards.arithmetic_step_reward (1.0 right, 0.0 wrong, None neither a column nor the answer). steps: each
    completion's step texts (steps.find_steps), else the completions are cut by `pattern` (default
    ARITHMETIC_STEP_PATTERN). Completions with no labelled step give no row.

    >>> label_samples(["47+38="], ["<think>7+8=15 4+3=7</think>Answer: 75"], ["85"])[0]["labels"]
    [1.0, 0.0, 0.0]
    """
    from .rewards import ARITHMETIC_STEP_PATTERN, arithmetic_step_reward

    if steps is None:
        steps = [[text for text, _ in split_steps(c, pattern or ARITHMETIC_STEP_PATTERN)] for c in completions]
    labels = arithmetic_step_reward(list(prompts), list(completions), steps=steps, answer=list(answers))
    return [{"prompt": p, "steps": list(s), "labels": l} for p, s, l in zip(prompts, steps, labels, strict=True)
            if any(x is not None for x in l)]


def written_chain(prompt: str, mistake: str, rng: random.Random) -> str:
    """A completion for the addition problem `prompt`, column by column as the task's chain of thought, with one
    mistake ("none", "sum": a column's sum off by 1 or 10, "carry": a carry dropped, or a wrong sum where no carry
    is due) carried on through the later columns and the answer, as a student who made it would.

    >>> written_chain("47+38=", "carry", random.Random(0))
    '<think>7+8=15 4+3=7</think>Answer: 75'
    """
    a, b = re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()
    width = max(len(a), len(b))  # arithmetic_step_reward's columns (the task's chain pads small numbers with 0+0)
    pairs = list(zip(reversed(a.zfill(width)), reversed(b.zfill(width))))
    true_carries = [0]
    for x, y in pairs:
        true_carries.append((int(x) + int(y) + true_carries[-1]) // 10)
    carried = [k for k in range(width) if true_carries[k]]
    if mistake == "carry" and not carried:
        mistake = "sum"
    at = rng.choice(carried) if mistake == "carry" else rng.randrange(width)
    columns, sums, carry = [], [], 0
    for k, (x, y) in enumerate(pairs):
        if mistake == "carry" and k == at:
            carry = 0
        s = int(x) + int(y) + carry
        if mistake == "sum" and k == at:
            s = rng.choice([v for v in (s - 10, s - 1, s + 1, s + 10) if 0 <= v <= 19])
        columns.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        sums.append(s)
        carry = s // 10
    answer = int(("1" if carry else "") + "".join(str(s % 10) for s in reversed(sums)))
    return f"<think>{' '.join(columns)}</think>Answer: {answer}"


def arithmetic_step_rows(name: str, num_examples: int, seed: int, split: str) -> list[dict]:
    """Labelled chains of built-in source `name` (STEP_SOURCES) on problems of `split`: a third right, a third with
    a column's sum wrong, a third with a carry dropped (written_chain), labelled by label_samples."""
    ds = builtin_dataset(STEP_SOURCES[name], num_examples, seed, split)
    rng = random.Random(f"{name}:{split}:{seed}:mistakes")
    completions = [written_chain(p, rng.choice(["none", "sum", "carry"]), rng) for p in ds["prompt"]]
    return label_samples(ds["prompt"], completions, ds["answer"])


def rollout_labels(generator, tokenizer, prompts, answers, completion_ids, sampling, pattern: str) -> list[dict]:
    """Math-Shepherd's automatic labels: {prompt, steps, labels} rows of the completions (token ids), a step's label
    the share of the `sampling.n` continuations (`generator`) from that step's last token whose whole text
    accuracy_reward accepts; None where it judges none. Completions with no step give no row."""
    from .rewards import accuracy_reward

    rows, heads = [], []  # heads: (row, prompt ids + the completion through the step's last token)
    for prompt, ids in zip(prompts, completion_ids, strict=True):
        texts, ends = find_steps(tokenizer, list(ids), pattern)
        prompt_ids = list(encode_prompt(tokenizer, prompt))
        heads += [(len(rows), prompt_ids, list(ids[:end + 1])) for end in ends]
        rows.append({"prompt": prompt, "steps": texts, "labels": []})
    groups = generator.generate([prompt_ids + head for _, prompt_ids, head in heads], sampling)
    for (r, _, head), group in zip(heads, groups):
        texts = [decode(tokenizer, head + c.token_ids) for c in group]
        n = len(texts)
        judged = [x for x in accuracy_reward([prompts[r]] * n, texts, answer=[answers[r]] * n) if x is not None]
        rows[r]["labels"].append(sum(judged) / len(judged) if judged else None)
    return [row for row in rows if row["steps"]]


def policy_rows(generator, tokenizer, cfg: PRMDataConfig, split: str) -> list[dict]:
    """The policy's samples (`generator`, e.g. a VLLMGenerator) on prompts of `split`, labelled as cfg.labels says:
    label_samples, or rollout_labels."""
    from .evaluate import sample
    from .generation import SamplingConfig
    from .rewards import ARITHMETIC_STEP_PATTERN

    if cfg.labels not in ("rule", "rollouts"):
        raise ValueError(f"data.labels must be 'rule' or 'rollouts', got {cfg.labels!r}")
    n = cfg.policy_prompts if split == "train" else cfg.policy_eval_prompts
    ds = builtin_dataset(STEP_SOURCES[cfg.source.removeprefix("builtin:")], n, cfg.seed + 1, split)
    sampling = SamplingConfig(n=cfg.samples_per_prompt, temperature=cfg.temperature,
                              max_tokens=cfg.max_completion_length, seed=cfg.seed)
    groups = sample(generator, tokenizer, ds["prompt"], sampling, desc=f"policy samples ({split})")
    prompts = [p for p, group in zip(ds["prompt"], groups) for _ in group]
    answers = [a for a, group in zip(ds["answer"], groups) for _ in group]
    if cfg.labels == "rollouts":
        return rollout_labels(generator, tokenizer, prompts, answers, [ids for group in groups for _, ids, _ in group],
                              replace(sampling, n=cfg.rollouts), ARITHMETIC_STEP_PATTERN)
    return label_samples(prompts, [text for group in groups for text, _, _ in group], answers)


def check_row(row: dict, i: int, source: str) -> None:
    """A row's steps are non-empty texts with one label each, a number in [0, 1] or null; else an error naming it."""
    steps, labels = row["steps"], row["labels"]
    where = f"dataset {source!r}, row {i}"
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps):
        raise ValueError(f"{where}: steps must be a non-empty list of non-empty texts, got {steps!r}")
    if not isinstance(labels, list) or len(labels) != len(steps):
        n = len(labels) if isinstance(labels, list) else repr(labels)
        raise ValueError(f"{where} has {len(steps)} steps but {n} labels (one per step)")
    bad = [x for x in labels if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))
                                                    or not 0 <= x <= 1)]
    if bad:
        raise ValueError(f"{where}: label {bad[0]!r} is not a number in [0, 1] or null")


def load_rows(cfg: PRMDataConfig, split: str) -> list[dict]:
    """The {prompt, steps, labels} rows of `split` ("train" or "eval") of cfg.source, checked."""
    name = cfg.source.removeprefix("builtin:")
    if cfg.source.startswith("builtin:"):
        if name not in STEP_SOURCES:
            raise ValueError(f"unknown built-in step-labelled source {cfg.source!r}; built-in: "
                             f"{', '.join('builtin:' + s for s in STEP_SOURCES)}")
        return arithmetic_step_rows(name, cfg.eval_examples if split == "eval" else cfg.num_examples, cfg.seed,
                                    split)
    ds = load_file(cfg.source)
    columns = (cfg.prompt_column, cfg.steps_column, cfg.labels_column)
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(f"dataset {cfg.source!r} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    check_prompts(ds, cfg.source, cfg.prompt_column)
    rows = [{"prompt": p, "steps": s, "labels": l} for p, s, l in zip(*(ds[c] for c in columns))]
    for i, row in enumerate(rows):
        check_row(row, i, cfg.source)
    cut = len(rows) - cfg.eval_examples
    if cut <= 0:
        raise ValueError(f"dataset {cfg.source!r} has {len(rows)} rows, all held out by "
                         f"data.eval_examples={cfg.eval_examples}: nothing is left to train on")
    return rows[cut:] if split == "eval" else rows[:cut]


class Chain(NamedTuple):
    """One row as the model reads it."""

    ids: list[int]  # the encoded prompt, then each step's tokens
    ends: list[int]  # index in ids of each step's last token
    labels: list[float]  # one per step; NaN: not trained on


def encode_row(tokenizer, row: dict) -> Chain:
    """The prompt as data.encode_prompt encodes it (as at RL time), then each step tokenized on its own."""
    ids, ends = list(encode_prompt(tokenizer, row["prompt"])), []
    for step in row["steps"]:
        ids += tokenizer(step, add_special_tokens=False)["input_ids"]
        ends.append(len(ids) - 1)
    return Chain(ids, ends, [math.nan if x is None else float(x) for x in row["labels"]])


def encode_rows(rows: list[dict], tokenizer, max_length: int, what: str) -> tuple[list[Chain], int]:
    """(the chains of `rows` of at most max_length tokens, how many were longer)."""
    chains = [encode_row(tokenizer, row) for row in rows]
    fit = [c for c in chains if len(c.ids) <= max_length]
    if not fit:
        raise ValueError(f"no {what} row fits data.max_length={max_length} ({len(rows)} rows)")
    return fit, len(chains) - len(fit)


# ---------------------------------------------------------------------------------------------- model

def collate(chains: list[Chain], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, targets), each (B, T), right-padded; targets are each step's label at its
    last token and NaN at every other token (and at unlabelled steps)."""
    T = max(len(c.ids) for c in chains)
    input_ids = torch.full((len(chains), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(len(chains), T, dtype=torch.long)
    targets = torch.full((len(chains), T), math.nan)
    for b, c in enumerate(chains):
        input_ids[b, :len(c.ids)] = torch.tensor(c.ids)
        attention_mask[b, :len(c.ids)] = 1
        targets[b, c.ends] = torch.tensor(c.labels)
    return input_ids.to(device), attention_mask.to(device), targets.to(device)


def token_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head's logit at every token, (B, T) float32."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[..., 0].float()


def step_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the tokens with a target (each labelled step's last token), averaged over those
    steps; logits and targets (B, T), targets NaN elsewhere. 0 when no step is labelled."""
    mask = ~targets.isnan()
    total = F.binary_cross_entropy_with_logits(logits[mask], targets[mask], reduction="sum")
    return total / mask.sum().clamp(min=1)


def step_logits(model, chains: list[Chain], pad_id: int, batch_size: int = 64) -> list[torch.Tensor]:
    """Each chain's logits at its step ends, (S_i,) float32 on the CPU; batched by length (less padding)."""
    order = sorted(range(len(chains)), key=lambda i: len(chains[i].ids))
    out = [None] * len(chains)
    for start in range(0, len(order), batch_size):
        chunk = [chains[i] for i in order[start:start + batch_size]]
        input_ids, attention_mask, _ = collate(chunk, pad_id, model.device)
        logits = token_logits(model, input_ids, attention_mask).cpu()  # (b, T)
        for i, c, row in zip(order[start:start + batch_size], chunk, logits):
            out[i] = row[c.ends]
    return out


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a positive scores above a negative (ties count half); NaN with no
    positive or no negative. Mann-Whitney from average ranks."""
    P, N = int(positive.sum()), int((~positive).sum())
    if P == 0 or N == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ranks = (counts.cumsum(0) - (counts - 1) / 2).double()[inverse]  # 1-based, ties averaged
    return ((ranks[positive].sum() - P * (P + 1) / 2) / (P * N)).item()


def step_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Over labelled steps, (S,) each: BCE, accuracy at p = 0.5, AUC, the share of right steps (labels >= 0.5) and
    the accuracy of always guessing the commoner label (the baseline to beat)."""
    keep = ~labels.isnan()
    logits, labels = logits[keep].detach().float(), labels[keep]
    positive = labels >= 0.5
    share = positive.float().mean().item()
    return {"loss": F.binary_cross_entropy_with_logits(logits, labels).item(),
            "accuracy": ((logits > 0) == positive).float().mean().item(), "auc": auc(logits, positive),
            "positive_rate": share, "majority_accuracy": max(share, 1 - share), "steps": len(labels)}


def position_prior_auc(train_chains: list[Chain], chains: list[Chain]) -> float:
    """The AUC on `chains` of scoring each step by the share of right training steps at its index alone: what a
    model that learned where mistakes tend to be, and nothing of the steps' content, would reach."""
    by_index: dict[int, list[float]] = {}
    for c in train_chains:
        for k, x in enumerate(c.labels):
            if not math.isnan(x):
                by_index.setdefault(k, []).append(float(x >= 0.5))
    prior = {k: sum(v) / len(v) for k, v in by_index.items()}
    steps = [(prior.get(k, 0.5), x) for c in chains for k, x in enumerate(c.labels) if not math.isnan(x)]
    return auc(torch.tensor([s for s, _ in steps]), torch.tensor([x >= 0.5 for _, x in steps]))


@torch.no_grad()
def evaluate(model, chains: list[Chain], pad_id: int, train_chains: list[Chain] = ()) -> dict:
    """step_metrics over every labelled step of the held-out chains, in eval mode; with the training chains also
    position_prior_auc, the baseline of a model that reads nothing but step positions."""
    model.eval()
    logits = torch.cat(step_logits(model, chains, pad_id))
    labels = torch.tensor([x for c in chains for x in c.labels])
    prior = {"position_prior_auc": position_prior_auc(train_chains, chains)} if train_chains else {}
    return {**step_metrics(logits, labels), **prior, "chains": len(chains)}


def train_step(model, optimizer, chains: list[Chain], pad_id: int, cfg: PRMConfig) -> dict:
    """One update on `chains`; returns its metrics."""
    optimizer.zero_grad(set_to_none=True)
    input_ids, attention_mask, targets = collate(chains, pad_id, model.device)
    with autocast(cfg.model, model.device):
        logits = token_logits(model, input_ids, attention_mask)  # (B, T)
    loss = step_loss(logits, targets)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
    if torch.isfinite(grad_norm):
        optimizer.step()
    mask = ~targets.isnan()
    metrics = step_metrics(logits[mask], targets[mask])
    return {"loss": loss.item(), "accuracy": metrics["accuracy"], "grad_norm": float(grad_norm)}


# ---------------------------------------------------------------------------------------------- training

def load_chains(cfg: PRMConfig, tokenizer) -> tuple[list[Chain], list[Chain], int]:
    """(train chains, held-out chains, train rows skipped as too long): the source's rows plus, with data.policy,
    the policy's labelled samples of each split."""
    train_rows, eval_rows = load_rows(cfg.data, "train"), load_rows(cfg.data, "eval")
    if cfg.data.policy:
        if not cfg.data.source.startswith("builtin:"):
            raise ValueError("data.policy labels samples of a built-in task: set data.source to one of "
                             f"{', '.join('builtin:' + s for s in STEP_SOURCES)}")
        generator, policy_tokenizer = policy_generator(cfg)
        train_rows += policy_rows(generator, policy_tokenizer, cfg.data, "train")
        eval_rows += policy_rows(generator, policy_tokenizer, cfg.data, "eval")
        del generator
    chains, skipped = encode_rows(train_rows, tokenizer, cfg.data.max_length, "train")
    eval_chains, _ = encode_rows(eval_rows, tokenizer, cfg.data.max_length, "eval")
    return chains, eval_chains, skipped


def policy_generator(cfg: PRMConfig):
    """(vLLM in process with the policy's weights, its tokenizer), as rejection sampling samples."""
    from transformers import AutoTokenizer

    from .generation import VLLMGenerator

    check_model_path(cfg.data.policy, "data.policy")
    generator = VLLMGenerator(cfg.data.policy, None, sync="none", seed=cfg.data.seed,
                              kv_cache_gib=cfg.data.kv_cache_gib,
                              max_model_len=cfg.data.max_length + cfg.data.max_completion_length)
    return generator, AutoTokenizer.from_pretrained(cfg.data.policy)


def train(cfg: PRMConfig) -> dict:
    """Train the process reward model and save it to run_dir/final; returns the held-out eval (the saved one if
    final/ already exists)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from .reward_model import save_final

    run_dir = Path(cfg.log.run_dir)
    check_model_path(cfg.model.path, "model.path")
    lock_run_dir(run_dir)
    if (run_dir / "final").is_dir():
        return json.loads((run_dir / "eval.json").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError(f"the tokenizer of {cfg.model.path!r} has no pad token, which batching needs")
    chains, eval_chains, skipped = load_chains(cfg, tokenizer)
    torch.manual_seed(cfg.train.seed)  # the new head's initialization
    model = load_model(cfg.model, trainable=True, device=torch.device("cpu"),
                       auto_class=AutoModelForTokenClassification, num_labels=1, pad_token_id=pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=True)
    checkpoint = latest_checkpoint(run_dir)
    start = load_checkpoint(checkpoint, model, optimizer)["step"] if checkpoint is not None else 0
    logger = MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
                           console_keys=("loss", "accuracy"))
    for step in tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="prm", disable=None):
        # the chains of step k are a function of (seed, k) alone: a resumed run draws what it would have
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
        indices = torch.randint(len(chains), (cfg.train.chains_per_step,), generator=g).tolist()
        timer = Timer()
        with timer("training"):
            metrics = train_step(model, optimizer, [chains[i] for i in indices], pad_id, cfg)
        logger.log(step, {**metrics, **timer.as_dict(), "peak_memory_mib": peak_memory_mib(),
                          "skipped_long_rows": skipped})
        if (step + 1) % cfg.log.save_every == 0 or step + 1 == cfg.train.steps:
            save_checkpoint(run_dir, step + 1, model, tokenizer, optimizer, state={"step": step + 1},
                            keep_last=cfg.log.keep_last)
    logger.close()
    with autocast(cfg.model, model.device):
        eval_metrics = evaluate(model, eval_chains, pad_id, chains)
    save_final(run_dir, model, tokenizer, eval_metrics)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # final/ holds what they held
    return eval_metrics


# ---------------------------------------------------------------------------------------------- reward

class ProcessRewardModelReward:
    """A process reward model's score of every step: sigmoid of its logit at each step's last token (`step_ends`,
    found by rewards.step_pattern), one list of step rewards per completion. The model reads the prompt encoded as
    the trainer encodes it (data.encode_prompt) followed by the completion's own token ids, so it scores exactly
    the tokens the policy sampled. Batched by length under no_grad, on `device` (None: where it loads, the CPU).

    >>> prm = ProcessRewardModelReward("runs/tiny/prm/final")                            # doctest: +SKIP
    >>> prm(prompts=["47+38="], completions=["-"], completion_ids=[ids], step_ends=[[13, 26, 36]])  # doctest: +SKIP
    [[0.97, 0.12, 0.08]]
    """

    __name__ = "process_reward_model"

    def __init__(self, path_or_model, tokenizer=None, batch_size: int = 16, device=None):
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        if path_or_model is None:
            raise ValueError("the process_reward_model reward needs a checkpoint: set rewards.process_reward_model")
        if isinstance(path_or_model, (str, Path)):
            check_model_path(str(path_or_model), "rewards.process_reward_model")
            model = AutoModelForTokenClassification.from_pretrained(path_or_model, num_labels=1, use_safetensors=True,
                                                                    trust_remote_code=False)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path_or_model, trust_remote_code=False)
        elif tokenizer is None:
            raise ValueError("ProcessRewardModelReward needs a tokenizer when given a model object")
        else:
            model = path_or_model
        if model.config.num_labels != 1:
            raise ValueError(f"a process reward model has num_labels=1, this one has {model.config.num_labels}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the process reward model's tokenizer has no pad token, which batched scoring needs")
        self.model = model.eval() if device is None else model.to(device).eval()
        self.tokenizer, self.batch_size = tokenizer, batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids=None, step_ends=None, **kwargs):
        if completion_ids is None or step_ends is None:
            raise ValueError("process_reward_model scores steps: it needs completion_ids and step_ends "
                             "(set rewards.step_pattern)")
        chains = []
        for prompt, ids, ends in zip(prompts, completion_ids, step_ends, strict=True):
            prompt_ids = list(encode_prompt(self.tokenizer, prompt))
            chains.append(Chain(prompt_ids + list(ids), [len(prompt_ids) + e for e in ends], [math.nan] * len(ends)))
        scored = [c for c in chains if c.ends]
        logits = iter(step_logits(self.model, scored, self.tokenizer.pad_token_id, self.batch_size))
        return [torch.sigmoid(next(logits)).tolist() if c.ends else [] for c in chains]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(__doc__, PRMConfig))
        return
    cfg = load_cli_config(PRMConfig, argv)
    result = train(cfg)
    print(model_summary("prm", cfg.log.run_dir, result,
                        {"accuracy": "held-out step accuracy", "majority_accuracy": "always the commoner label",
                         "auc": "AUC", "position_prior_auc": "AUC from step positions alone",
                         "steps": "held-out steps", "chains": "held-out chains"},
                        use_as="rewards.process_reward_model"), flush=True)


if __name__ == "__main__":
    command_line(main)
