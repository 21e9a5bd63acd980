"""Reward-model training on preference pairs, for R1's stage 4 (helpfulness and harmlessness RL).

    python -m fastgrpo.reward_model configs/reward_model_tiny.yaml [key=value ...]

A causal LM gets a new scalar head (AutoModelForSequenceClassification, num_labels=1) and learns the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected). Each side of a pair is rendered with
rewards.render_conversation and tokenized exactly as RewardModelReward does at RL time, so the model is trained
on the text it will score. The result, run_dir/final, loads with RewardModelReward(path); run_dir/eval.json holds
its held-out pairwise accuracy. A run whose final/ exists is finished: train() returns its saved eval.

Every log.save_every steps the run is checkpointed (fastgrpo.checkpoint: weights, optimizer, RNG states) to
run_dir/checkpoints; a killed run resumes from its latest checkpoint and ends exactly as an uninterrupted one (the
pairs of step k are a function of (seed, k) alone). Once final/ is in place the checkpoints are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import fsync, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import LogConfig, ModelConfig, load_cli_config, to_yaml
from .config_doc import help_text
from .data import builtin_dataset, check_prompts, load_file
from .metrics import MetricsLogger, Timer, peak_memory_mib
from .models import load_model
from .precision import autocast
from .rewards import render_conversation
from .runs import check_model_path, command_line, lock_run_dir, model_summary

@dataclass
class RewardDataConfig:
    source: str = "builtin:assist"  # builtin:<task> with chosen/rejected columns, or a .jsonl file
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    num_examples: int = 2000  # training pairs of a built-in task
    eval_examples: int = 200  # held-out pairs: a built-in task's held-out split, or a file's last rows
    max_length: int = 512  # tokens of the longer side; longer pairs are skipped and counted
    seed: int = 0


@dataclass
class RewardTrainConfig:
    steps: int = 200
    pairs_per_step: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class RewardModelConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/reward_model"))


def load_pairs(cfg: RewardDataConfig, tokenizer, split: str) -> tuple[list[tuple[list[int], list[int]]], int]:
    """([(chosen ids, rejected ids)] of `split` ("train" or "eval"), pairs skipped as too long)."""
    if cfg.source.startswith("builtin:"):
        held_out = split == "eval"  # the task's held-out problems (data.split_of), as evaluation's
        ds = builtin_dataset(cfg.source.removeprefix("builtin:"), cfg.eval_examples if held_out else cfg.num_examples,
                             cfg.seed, split)
    else:
        ds = load_file(cfg.source)
    columns = (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(f"dataset {cfg.source!r} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    check_prompts(ds, cfg.source, cfg.prompt_column)
    rows = list(zip(*(ds[c] for c in columns)))
    if not cfg.source.startswith("builtin:"):
        cut = max(len(rows) - cfg.eval_examples, 0)
        rows = rows[cut:] if split == "eval" else rows[:cut]

    def encode(prompt, completion) -> list[int]:
        # The template already placed BOS/EOS, as at scoring time.
        return tokenizer(render_conversation(tokenizer, prompt, completion), add_special_tokens=False)["input_ids"]

    pairs, skipped = [], 0
    for prompt, chosen, rejected in rows:
        pair = (encode(prompt, chosen), encode(prompt, rejected))
        if max(map(len, pair)) > cfg.max_length:
            skipped += 1
            continue
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"no {split} pair of {cfg.source!r} fits data.max_length={cfg.max_length} "
                         f"({len(rows)} rows, data.eval_examples={cfg.eval_examples})")
    return pairs, skipped


def score(model, tokenizer, sequences: list[list[int]]) -> torch.Tensor:
    """One scalar reward per sequence, (len(sequences),). Right-padded with the pad token: the classifier reads
    each row's last token that is not config.pad_token_id."""
    batch = tokenizer.pad({"input_ids": sequences}, padding=True, padding_side="right", return_tensors="pt")
    return model(**batch.to(model.device)).logits[:, 0].float()


def margins(model, tokenizer, pairs) -> torch.Tensor:
    """r_chosen - r_rejected per pair, (P,); both sides go through the model in one batch."""
    P = len(pairs)
    rewards = score(model, tokenizer, [c for c, _ in pairs] + [r for _, r in pairs])  # (2P,)
    return rewards[:P] - rewards[P:]


def pairwise_metrics(margin: torch.Tensor) -> dict:
    """Pairwise accuracy (chosen scored above rejected) and mean margin."""
    margin = margin.detach()
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


@torch.no_grad()
def evaluate(model, tokenizer, pairs, batch_pairs: int = 64) -> dict:
    """pairwise_metrics over all held-out pairs, in batches of `batch_pairs`, in eval mode."""
    model.eval()
    margin = torch.cat([margins(model, tokenizer, pairs[i:i + batch_pairs]) for i in range(0, len(pairs), batch_pairs)])
    return {**pairwise_metrics(margin), "pairs": len(pairs)}


def save_final(run_dir: Path, model, tokenizer, eval_metrics: dict) -> Path:
    """eval.json, then final/ written under a temporary name, fsynced and renamed into place: final/ only ever
    appears whole, and a run with final/ always has its eval.json, also after a power loss."""
    tmp, final, eval_tmp = run_dir / ".tmp-final", run_dir / "final", run_dir / ".tmp-eval.json"
    shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    eval_tmp.write_text(json.dumps(eval_metrics, indent=2) + "\n")
    for file in (eval_tmp, *tmp.iterdir(), tmp):
        fsync(file)
    os.replace(eval_tmp, run_dir / "eval.json")
    os.replace(tmp, final)
    fsync(run_dir)
    return final


def train_step(model, optimizer, tokenizer, pairs, cfg: RewardModelConfig) -> dict:
    """One Bradley-Terry update on `pairs`; returns its metrics."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(cfg.model, model.device):
        margin = margins(model, tokenizer, pairs)  # (pairs_per_step,)
    loss = -F.logsigmoid(margin).mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
    if torch.isfinite(grad_norm):
        optimizer.step()
    return {"loss": loss.item(), **pairwise_metrics(margin), "grad_norm": float(grad_norm)}


def train(cfg: RewardModelConfig) -> dict:
    """Train the reward model and save it to run_dir/final; returns the held-out eval (the saved one if final/
    already exists)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = Path(cfg.log.run_dir)
    check_model_path(cfg.model.path, "model.path")
    lock_run_dir(run_dir)
    if (run_dir / "final").is_dir():
        return json.loads((run_dir / "eval.json").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(cfg.train.seed)  # the new score head's initialization
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {cfg.model.path!r} has no pad token, which batched scoring needs")
    model = load_model(cfg.model, trainable=True, device=torch.device("cpu"),
                       auto_class=AutoModelForSequenceClassification, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=True)
    pairs, skipped = load_pairs(cfg.data, tokenizer, "train")
    eval_pairs, _ = load_pairs(cfg.data, tokenizer, "eval")
    checkpoint = latest_checkpoint(run_dir)
    start = load_checkpoint(checkpoint, model, optimizer)["step"] if checkpoint is not None else 0
    logger = MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
                           console_keys=("loss", "accuracy"))
    for step in tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="reward_model",
                     disable=None):
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
        indices = torch.randint(len(pairs), (cfg.train.pairs_per_step,), generator=g).tolist()
        timer = Timer()
        with timer("training"):
            metrics = train_step(model, optimizer, tokenizer, [pairs[i] for i in indices], cfg)
        logger.log(step, {**metrics, **timer.as_dict(), "peak_memory_mib": peak_memory_mib(),
                          "skipped_long_pairs": skipped})
        if (step + 1) % cfg.log.save_every == 0 or step + 1 == cfg.train.steps:
            save_checkpoint(run_dir, step + 1, model, tokenizer, optimizer, state={"step": step + 1},
                            keep_last=cfg.log.keep_last)
    logger.close()
    with autocast(cfg.model, model.device):
        eval_metrics = evaluate(model, tokenizer, eval_pairs)
    save_final(run_dir, model, tokenizer, eval_metrics)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # final/ holds what they held
    return eval_metrics


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(__doc__, RewardModelConfig))
        return
    cfg = load_cli_config(RewardModelConfig, argv)
    result = train(cfg)
    print(model_summary("reward_model", cfg.log.run_dir, result,
                        {"accuracy": "held-out pairwise accuracy", "margin": "held-out mean margin",
                         "pairs": "held-out pairs"}, use_as="rewards.reward_model"), flush=True)


if __name__ == "__main__":
    command_line(main)
