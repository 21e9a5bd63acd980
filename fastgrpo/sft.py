"""Supervised fine-tuning on prompt -> completion pairs: R1's cold start (stage 1) and its stage-3 SFT.

    python -m fastgrpo.sft configs/sft_tiny.yaml [key=value ...]
    torchrun --nproc-per-node 8 -m fastgrpo.sft configs/sft_tiny.yaml [key=value ...]   # docs/SCALING.md

Loss on completion tokens only, over packed micro-batches, with the fused-linear cross-entropy (the [N, V]
logits are never materialized). A step is `sequences_per_step` examples; its micro-batches' losses are summed
and divided by the step's completion-token count, so the gradient does not depend on how they were packed, nor,
on several ranks (FSDP2: each rank takes its share of the step's micro-batches, gradients summed), on how many.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fastgrpo_kernels import fused_linear_cross_entropy

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import LogConfig, ModelConfig, load_cli_config, write_run_config
from .config_doc import help_text
from .data import as_messages, builtin_dataset, check_prompts, encode_prompt, load_file
from .distributed import all_reduce_sum, clip_grad_norm_, end_worker, init_distributed, world
from .metrics import MetricsLogger, Timer, peak_memory_mib
from .models import load_model
from .packing import PackingStats, completion_rows, pack, packed_backward, packed_hidden_states, plan_micro_batches
from .precision import autocast
from .runs import RunError, check_model_path, command_line, lock_run_dir


# What a resumed run may change (applied from its next step); a change of any other key is refused: the
# checkpoint's weights, optimizer state and history were made under the saved values.
MAY_CHANGE = ("train.steps", "train.lr", "train.weight_decay", "train.max_grad_norm", "train.micro_batch_tokens",
              "model.gradient_checkpointing", "log.")


@dataclass
class SFTDataConfig:
    # builtin:<task> (completions from its chain of thought; builtin:multiply_tools: calculator episodes) or a .jsonl
    source: str = "builtin:arithmetic"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    num_examples: int = 2000
    max_length: int = 512  # prompt + completion tokens; longer examples are skipped and counted
    seed: int = 0


@dataclass
class SFTTrainConfig:
    steps: int = 100
    sequences_per_step: int = 32
    micro_batch_tokens: int = 8192
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/sft"))


def cot_completion(example: dict, eos: str) -> str:
    """The R1 cold-start format: reasoning in <think> tags, then the answer; a task without a chain of thought
    (builtin:code, whose answer is the solution itself) is the answer alone."""
    if "cot" not in example:
        return f"{example['answer']}{eos}"
    return f"<think>{example['cot']}</think>Answer: {example['answer']}{eos}"


# SFT source -> the built-in task whose train prompts it demonstrates the calculator tool on
TOOL_DEMOS = {"builtin:multiply_tools": "multiply"}
TOOL_PROMPT_SHARE = 0.5  # of the demonstrations, those whose prompt describes the tool (GRPO without it has none)
# Of those, the ones that call it: RL decides whether calling pays, so SFT leaves both open. Calls are the larger
# share since the tiny model learns to copy the expression and the result only from many of them.
TOOL_CALL_SHARE = 0.75


def tool_episode(tokenizer, example: dict, tools: list[dict] | None, call: bool) -> tuple[list[int], int]:
    """(token ids, prompt length) of one episode as a multi-turn rollout produces it: the prompt (with `tools`
    described), then, if `call`, a calculator call on the problem and its result as the chat template renders a
    tool message, then the final turn "Answer: N</s>". The whole conversation is rendered at once, so the ids are
    the rollout's (prompt, sampled turns and observations appended) only if the template is prefix-consistent."""
    turns = []
    if call:
        arguments = {"expression": example["prompt"].removesuffix("=")}
        turns += [{"role": "assistant", "content": "",
                   "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": arguments}}]},
                  {"role": "tool", "content": example["answer"]}]
    messages = as_messages(example["prompt"]) + turns + [{"role": "assistant", "content": f"Answer: {example['answer']}"}]
    prompt_ids = encode_prompt(tokenizer, example["prompt"], tools)
    ids = list(tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the tokenizer's chat template renders a prompt differently inside a longer conversation: "
                         "multi-turn episodes need a prefix-consistent template")
    return ids, len(prompt_ids)


def tool_demonstrations(cfg: SFTDataConfig, tokenizer) -> list[tuple[list[int], int]]:
    """(ids, prompt length) of cfg.num_examples episodes on TOOL_DEMOS[cfg.source]'s train prompts: a
    TOOL_PROMPT_SHARE of the prompts describe the calculator, and a TOOL_CALL_SHARE of those call it; every other
    episode answers directly."""
    from .tools import calculator, tool_schema

    tools = [tool_schema(calculator)]
    rng = random.Random(f"{cfg.source}:{cfg.seed}")
    episodes = []
    for ex in builtin_dataset(TOOL_DEMOS[cfg.source], cfg.num_examples, cfg.seed, "train"):
        described = rng.random() < TOOL_PROMPT_SHARE
        episodes.append(tool_episode(tokenizer, ex, tools if described else None,
                                     described and rng.random() < TOOL_CALL_SHARE))
    return episodes


def load_examples(cfg: SFTDataConfig, tokenizer) -> tuple[list[list[int]], list[int], int]:
    """(token ids of prompt + completion, prompt lengths, examples skipped as too long).

    Tool demonstrations (TOOL_DEMOS) train on the tool's observations too: they are the problem's answer in a
    fixed frame, which the model is taught to write in any case."""
    if cfg.source in TOOL_DEMOS:
        encoded = tool_demonstrations(cfg, tokenizer)
    else:
        encoded = [_encode(tokenizer, prompt, completion) for prompt, completion in _text_pairs(cfg, tokenizer)]
    sequences, prompt_lengths, skipped = [], [], 0
    for ids, prompt_length in encoded:
        if len(ids) > cfg.max_length:
            skipped += 1
            continue
        sequences.append(ids)
        prompt_lengths.append(prompt_length)
    if not sequences:
        raise ValueError(f"no example of {cfg.source!r} fits data.max_length={cfg.max_length}")
    return sequences, prompt_lengths, skipped


def _text_pairs(cfg: SFTDataConfig, tokenizer) -> list[tuple]:
    """(prompt, completion text) of every example of cfg.source: a built-in task's train split, or a file's rows."""
    if cfg.source.startswith("builtin:"):
        ds = builtin_dataset(cfg.source.removeprefix("builtin:"), cfg.num_examples, cfg.seed, "train")
        return [(ex["prompt"], cot_completion(ex, tokenizer.eos_token)) for ex in ds]
    ds = load_file(cfg.source)
    for column in (cfg.prompt_column, cfg.completion_column):
        if column not in ds.column_names:
            raise ValueError(f"dataset {cfg.source!r} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    check_prompts(ds, cfg.source, cfg.prompt_column)
    return list(zip(ds[cfg.prompt_column], ds[cfg.completion_column]))


def _encode(tokenizer, prompt, completion: str) -> tuple[list[int], int]:
    prompt_ids = encode_prompt(tokenizer, prompt)
    return prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"], len(prompt_ids)


def sft_step(model, optimizer, sequences, prompt_lengths, indices, cfg: SFTConfig) -> dict:
    """One optimizer step on the examples `indices` (the whole step's, on every rank); returns its metrics.

    On several ranks each rank trains on its share of the micro-batches, planned over all ranks (tokens balanced,
    the same count on each, so FSDP's collectives line up); the loss is divided by the step's token count.
    """
    rank, world_size = world()
    device = next(model.parameters()).device
    lengths = [len(sequences[i]) for i in indices]
    plans = plan_micro_batches(lengths, cfg.train.micro_batch_tokens, num_ranks=world_size)  # positions in `indices`
    total = sum(len(sequences[i]) - prompt_lengths[i] for i in indices)  # completion tokens of the step
    loss_sum = 0.0
    optimizer.zero_grad(set_to_none=True)
    for micro in plans[rank]:
        # An empty micro-batch (fewer examples than ranks x micro-batches) runs example 0 with weight 0: every rank
        # must run the same forwards and backwards.
        packed = pack(sequences, [indices[j] for j in micro or [0]], prompt_lengths).to(device)
        rows, _ = completion_rows(packed)
        with autocast(cfg.model, device):
            hidden = packed_hidden_states(model, packed)  # (N, H)
            head = model.get_output_embeddings().weight  # after the forward: under FSDP the gathered head
            loss = fused_linear_cross_entropy(hidden[rows], head, packed.targets[rows], reduction="sum") / total
        if not micro:
            loss = loss * 0.0
        packed_backward(model, loss)
        loss_sum += float(loss)
    grad_norm = clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
    if torch.isfinite(grad_norm):
        optimizer.step()
    stats = PackingStats.from_plan(lengths, plans).as_dict()
    return {"loss": all_reduce_sum(loss_sum), "grad_norm": float(grad_norm), "tokens": total,
            "lr": optimizer.param_groups[0]["lr"],
            "skipped_update": float(not torch.isfinite(grad_norm)), **stats}


def train(cfg: SFTConfig) -> list[dict]:
    """Run (or resume) SFT; returns the per-step metrics. The final model is the run's latest checkpoint.

    Under torchrun every rank runs this; rank 0 alone logs and writes the files outside a checkpoint's shards.
    """
    from transformers import AutoTokenizer

    device = init_distributed()
    rank = world()[0]
    run_dir = Path(cfg.log.run_dir)
    check_model_path(cfg.model.path, "model.path")
    if rank == 0:
        lock_run_dir(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    write_run_config(run_dir, cfg, checkpoint is not None, MAY_CHANGE, write=rank == 0)
    torch.manual_seed(cfg.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(cfg.model, trainable=True, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay, fused=True)  # model.lora: the adapters alone
    sequences, prompt_lengths, skipped = load_examples(cfg.data, tokenizer)
    start, history = 0, []
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        start, history = state["step"], state["history"]
        for group in optimizer.param_groups:  # the optimizer state holds the saved ones; a resume may change them
            group.update(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    logger = (MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project)
              if rank == 0 else None)
    B = cfg.train.sequences_per_step
    for step in tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="sft",
                     disable=None if rank == 0 else True):
        # the examples of step k are a function of (seed, k) alone, so a resumed run sees what the original would
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
        indices = torch.randint(len(sequences), (B,), generator=g).tolist()
        timer = Timer()
        with timer("training"):
            metrics = sft_step(model, optimizer, sequences, prompt_lengths, indices, cfg)
        metrics.update(timer.as_dict(), peak_memory_mib=peak_memory_mib(), skipped_long_examples=skipped)
        if logger is not None:
            logger.log(step, metrics)
        history.append({"step": step, **metrics})
        if step + 1 == cfg.train.steps or (step + 1) % cfg.log.save_every == 0:
            save_checkpoint(run_dir, step + 1, model, tokenizer, optimizer,
                            state={"step": step + 1, "history": history}, keep_last=cfg.log.keep_last)
    if logger is not None:
        logger.close()
    if history and all(h["skipped_update"] for h in history):
        raise RunError(f"no step of the run in {run_dir} updated the weights: every step had non-finite gradients")
    return history


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(__doc__, SFTConfig))
        return
    import time

    from .runs import training_summary

    cfg = load_cli_config(SFTConfig, argv)
    t0 = time.time()
    history = train(cfg)
    rank, world_size = world()
    if rank == 0:
        print(training_summary("sft", "fastgrpo.sft", cfg.log.run_dir, history, ["loss", "grad_norm"],
                               time.time() - t0, world_size), flush=True)
    end_worker()


if __name__ == "__main__":
    command_line(main)
