"""GRPO: the reasoning-RL (R1 stage 2) and helpfulness-RL (stage 4) trainer, driven by one config.

    python -m fastgrpo.grpo configs/grpo_tiny.yaml [key=value ...]
    torchrun --nproc-per-node 8 -m fastgrpo.grpo configs/grpo_tiny.yaml [key=value ...]   # docs/SCALING.md

One step: B prompts -> G completions each from the in-process generator -> rewards -> group-normalized
advantages -> packed micro-batches -> fused GRPO loss -> optimizer step -> the generator sees the new weights
(shared storage: nothing to copy, and on CPU vLLM's packed copies are rebuilt; otherwise an in-place reload).

On several ranks (FSDP2, fastgrpo.distributed) each rank generates and scores its share of the B prompts with its
own generator (or each group of generation.tensor_parallel_size ranks shares one tensor-parallel vLLM), every rank
then holds the whole rollout (token ids only), and each trains on its share of the micro-batches with losses
normalized by the step's global counts: a step computes what it computes in one process.
"""

from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from fastgrpo_kernels import fused_linear_grpo_loss, fused_linear_logprobs, group_advantages, process_advantages
from fastgrpo_kernels.grpo_loss import rollout_is_weights, truncated_is_weights

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import GRPOConfig, LossConfig, TrainConfig, load_cli_config, write_run_config
from .config_doc import help_text
from .data import PromptSampler, decode, load_prompts
from .distributed import (all_gather_objects, all_reduce_sum, clip_grad_norm_, end_worker, init_distributed,
                          reshard, world)
from .episodes import EpisodeRunner, episode_runner, sampled_ids
from .generation import HFGenerator, SamplingConfig, VLLMGenerator
from .iterative import RewardModelLearner, learn_from_rollout, make_learner
from .lora import reference_precision
from .metrics import MetricsLogger, Timer, peak_memory_mib
from .models import load_model
from .packing import (PackedBatch, PackingStats, completion_rows, completion_values, pack, packed_backward,
                      packed_hidden_states, plan_micro_batches)
from .precision import autocast, make_optimizer, reference_config
from .rewards import Scores, build_rewards, compute_rewards, reward_name
from .runs import RunError, check_model_path, command_line, lock_run_dir
from .steps import compile_pattern, find_steps
from .vllm_bridge import kv_cache_gib_for

try:
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = None

# ----------------------------------------------------------------------------------------------------------
# Init

# What a resumed run may change (applied from its next step); a change of any other key is refused: the
# checkpoint's weights, optimizer state, prompt position and history were made under the saved values.
MAY_CHANGE = ("train.steps", "train.lr", "train.weight_decay", "train.warmup_steps", "train.max_grad_norm",
              "train.max_bad_steps", "train.micro_batch_tokens", "generation.sync", "generation.kv_cache_gib",
              "generation.gpu_memory_utilization", "generation.tensor_parallel_size", "model.gradient_checkpointing",
              "log.")


def make_generator(cfg: GRPOConfig, model, tokenizer):
    g = cfg.generation
    world_size = world()[1]
    if g.tensor_parallel_size < 1 or world_size % g.tensor_parallel_size:
        raise ValueError(f"generation.tensor_parallel_size={g.tensor_parallel_size} must divide the number of ranks "
                         f"({world_size})")
    if g.backend == "hf":
        if g.tensor_parallel_size > 1:
            raise ValueError("generation.tensor_parallel_size > 1 needs generation.backend=vllm")
        return HFGenerator(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           autocast=lambda: autocast(cfg.model, next(model.parameters()).device))
    max_model_len = cfg.data.max_prompt_length + g.max_completion_length
    kv_cache_gib = g.kv_cache_gib
    if kv_cache_gib is None:  # one engine's share of the step's B*G sequences, all at once
        engines = world_size // g.tensor_parallel_size
        sequences = -(-cfg.train.prompts_per_step // engines) * g.num_generations
        kv_cache_gib = kv_cache_gib_for(model.config, sequences, max_model_len, getattr(torch, cfg.model.dtype))
    return VLLMGenerator(cfg.model.path, model, sync=g.sync, dtype=cfg.model.dtype, max_model_len=max_model_len,
                         kv_cache_gib=kv_cache_gib, gpu_memory_utilization=g.gpu_memory_utilization,
                         seed=cfg.train.seed, tensor_parallel_size=g.tensor_parallel_size, world_size=world_size)


def make_rewards(cfg: GRPOConfig, reward_funcs=None, device=None):
    """(functions, weights): those given by the caller, else the config's; plus DAPO's overlong penalty.

    A reward model runs on `device` (the trainer's).
    """
    return build_rewards(cfg.rewards, funcs=reward_funcs, device=device,
                         max_completion_length=cfg.generation.max_completion_length,
                         overlong_buffer=cfg.loss.overlong_buffer)


# ----------------------------------------------------------------------------------------------------------
# Rollout and rewards


def constant_groups(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """(B,) True where a group's valid rewards are all equal (or all NaN): zero advantage, nothing to learn."""
    grouped = rewards.view(-1, G)
    return ~(grouped.nan_to_num(-float("inf")).amax(1) > grouped.nan_to_num(float("inf")).amin(1))


def dynamic_sampling_column(cfg: GRPOConfig, reward_names: list[str]) -> int | None:
    """The column of per_func whose constant groups dynamic sampling refills; None: the total reward."""
    name = cfg.train.dynamic_sampling_reward
    if name is None:
        return reward_names.index("accuracy_reward") if "accuracy_reward" in reward_names else None
    if name == "total":
        return None
    if name not in reward_names:
        raise ValueError(f"train.dynamic_sampling_reward={name!r} names none of the run's rewards "
                         f"({', '.join(reward_names)}; or 'total')")
    return reward_names.index(name)


def informative_groups(rewards: torch.Tensor, per_func: torch.Tensor, column: int | None, G: int) -> torch.Tensor:
    """(B,) True where a group's rewards differ, judged by per_func[:, column] (S, F); by the total `rewards` (S,)
    where column is None and for groups that reward does not apply to (all None: general prompts and accuracy)."""
    judged = rewards if column is None else per_func[:, column]  # (S,)
    unscored = judged.view(-1, G).isnan().all(1).repeat_interleave(G)  # (S,)
    return ~constant_groups(torch.where(unscored, rewards, judged), G)


@dataclass
class Rollout:
    """One step's S = B*G sequences, group by group (the G completions of a prompt adjacent)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampling_logp: list[list[float]]
    truncated: torch.Tensor  # (S,) bool: stopped by max_completion_length
    rewards: torch.Tensor  # (S,) weighted sum; NaN where no function applied
    per_func: torch.Tensor  # (S, F)
    refills: int = 0
    # process supervision: per completion its weighted (token index, reward) steps (rewards.Scores.step_rewards);
    # None: outcome rewards alone
    step_rewards: list[list[tuple[int, float]]] | None = None
    rows: list[dict] | None = None  # (S,) each sequence's dataset row (its prompt, answer and other columns)
    # multi-turn episodes: per completion token 1 where sampled, 0 in an observation (no loss, KL, entropy); and per
    # episode its turns, tool_calls and tool_errors. None: single-turn completions, every token sampled
    loss_mask: list[list[int]] | None = None
    episodes: list[dict] | None = None


def collect_rollout(generator, sampler, tokenizer, reward_funcs, weights, cfg: GRPOConfig, step: int,
                    judge: int | None = None, episodes: EpisodeRunner | None = None) -> Rollout:
    """The step's B groups of G completions, with rewards; on several ranks every rank returns the whole rollout.

    A round draws the prompts still missing, each rank generates and scores its share of them, and, with dynamic
    sampling, drops the groups that teach nothing (judged by per_func[:, judge]; the total reward where judge is
    None); rounds repeat in lockstep on the global count of kept groups. Then every rank gathers every rank's groups.
    With `episodes` each completion is a multi-turn episode (fastgrpo/episodes.py).
    """
    B, G = cfg.train.prompts_per_step, cfg.generation.num_generations
    parts, refills, kept = [], 0, 0
    while kept < B:
        # every rank draws the same prompts: one sampler state whatever the number of ranks, so a run resumes on any
        batch = [sampler.next() for _ in range(B - kept)]
        mine, completions = generate_share(generator, batch, cfg, step * (cfg.train.max_refills + 1) + refills,
                                           episodes)
        keep = torch.zeros(0, dtype=torch.bool)
        if mine:
            rewards, per_func, steps = score_share(mine, completions, tokenizer, reward_funcs, weights, cfg)
            keep = torch.ones(len(mine), dtype=torch.bool)
            if cfg.train.dynamic_sampling and refills < cfg.train.max_refills:
                keep = informative_groups(rewards, per_func, judge, G)  # DAPO: refill groups that teach nothing
            for i in keep.nonzero().squeeze(1).tolist():
                rows = slice(i * G, (i + 1) * G)
                parts.append(([mine[i][0]] * G, completions[rows], rewards[rows], per_func[rows],
                              None if steps is None else steps[rows], [mine[i][1]] * G))
        kept += int(all_reduce_sum(float(keep.sum())))
        refills += 1
    return gather_rollout(parts, refills - 1)


def generate_share(generator, batch: list, cfg: GRPOConfig, round_index: int,
                   episodes: EpisodeRunner | None = None) -> tuple[list, list]:
    """(this rank's contiguous share of a round's prompts `batch`, their completions: G per prompt, flat).

    Every sample of the run gets its own seed (prompt i of a round: seed + i * G + j), the same on any number of ranks
    and after a resume. Groups never straddle ranks. With generation.tensor_parallel_size = k > 1 each group of k
    consecutive ranks is one vLLM: every rank of it generates the group's share (its ranks' shares together) with
    the same seeds, then keeps its own slice, so that each completion is scored, and gathered, once.
    """
    B, G, g = cfg.train.prompts_per_step, cfg.generation.num_generations, cfg.generation
    rank, world_size = world()
    bounds = [len(batch) * r // world_size for r in range(world_size + 1)]  # rank r: batch[bounds[r]:bounds[r+1]]
    lo, hi = bounds[rank], bounds[rank + 1]
    first = rank - rank % g.tensor_parallel_size  # the first rank of this rank's tensor-parallel group
    group_lo, group_hi = bounds[first], bounds[first + g.tensor_parallel_size]
    seed = cfg.train.seed * 2**40 + round_index * B * G
    sampling = SamplingConfig(n=G, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                              max_tokens=g.max_completion_length, ignore_eos=g.ignore_eos, seed=seed + group_lo * G)
    # A rank with no prompt in a refill round still generates (a stand-in, dropped): with the hf backend under
    # FSDP each forward is a collective that every rank must join.
    share = batch[group_lo:group_hi] or batch[:1]
    if episodes is None:
        outputs = generator.generate([ids for ids, _ in share], sampling)
    else:
        outputs = episodes.generate(generator, [ids for ids, _ in share], [row for _, row in share], sampling)
    return batch[lo:hi], [c for group in outputs[lo - group_lo: hi - group_lo] for c in group]


def score_share(mine: list, completions: list, tokenizer, reward_funcs, weights, cfg: GRPOConfig) -> Scores:
    """compute_rewards on this rank's prompts (each repeated G times) and their completions, with their steps where
    rewards.step_pattern is set. A multi-turn episode's completion is what the model wrote (its turns' tokens): a
    number a tool answered is not the model's answer; the `episode` column holds the whole text, tool answers too."""
    G = cfg.generation.num_generations
    prompts = [ex[cfg.data.prompt_column] for _, ex in mine for _ in range(G)]
    columns = {k: [ex[k] for _, ex in mine for _ in range(G)] for k in mine[0][1]}
    columns.pop(cfg.data.prompt_column)
    texts = [decode(tokenizer, sampled_ids(c)) for c in completions]
    if "mask" in completions[0].extra:  # multi-turn: what the environments scored, and the whole episodes' text
        columns["environment_reward"] = [c.extra["reward"] for c in completions]
        columns["episode"] = [decode(tokenizer, c.token_ids) for c in completions]
    pattern = cfg.rewards.step_pattern
    steps = None if pattern is None else [find_steps(tokenizer, c.token_ids, pattern) for c in completions]
    return compute_rewards(reward_funcs, weights, prompts, texts, [sampled_ids(c) for c in completions], columns,
                           steps=steps)


def gather_rollout(parts: list, refills: int) -> Rollout:
    """Every rank's kept groups (parts: (prompt ids, completions, rewards, per_func, step rewards or None, dataset
    rows) per group), rank by rank."""
    parts = [part for rank_parts in all_gather_objects(parts) for part in rank_parts]
    prompt_ids = [p for part in parts for p in part[0]]
    completions = [c for part in parts for c in part[1]]
    step_rewards = None if parts[0][4] is None else [s for part in parts for s in part[4]]
    multi_turn = "mask" in completions[0].extra
    return Rollout(prompt_ids, [c.token_ids for c in completions], [c.logprobs for c in completions],
                   torch.tensor([c.finish_reason == "length" for c in completions]),
                   torch.cat([part[2] for part in parts]), torch.cat([part[3] for part in parts]), refills,
                   step_rewards, [p for part in parts for p in part[5]],
                   [c.extra["mask"] for c in completions] if multi_turn else None,
                   [{k: c.extra[k] for k in ("turns", "tool_calls", "tool_errors")} for c in completions]
                   if multi_turn else None)


# ----------------------------------------------------------------------------------------------------------
# Loss over packed micro-batches


def score(model, micro_batches, temperature, precision) -> list[torch.Tensor]:
    """Per-token log-probs (n,) on each micro-batch's completion rows (those the loss reads); no gradient.

    micro_batches: pack_step's (packed, rows, cu_seqlens, real); precision: the trainer's autocast context.
    """
    out = []
    with torch.no_grad(), precision:
        for packed, rows, _, _ in micro_batches:
            hidden = packed_hidden_states(model, packed)  # (N, H)
            head = model.get_output_embeddings().weight  # after the forward: under FSDP the gathered head
            out.append(fused_linear_logprobs(hidden[rows], head, packed.targets[rows], temperature))
    reshard(model)
    return out


def rollout_advantages(rollout: Rollout, cfg: GRPOConfig) -> torch.Tensor | list[torch.Tensor]:
    """Group-normalized advantages: one per completion (S,), or with step rewards (process supervision) one per
    completion token, a (L_s,) tensor for each completion."""
    G, scale = cfg.generation.num_generations, cfg.loss.advantage_scale
    if rollout.step_rewards is None:
        return group_advantages(rollout.rewards, G, scale)
    steps = rollout.step_rewards
    lengths = [len(c) for c in rollout.completion_ids]
    per_token = process_advantages(torch.tensor([r for s in steps for _, r in s], dtype=torch.float32),
                                   torch.tensor([e for s in steps for e, _ in s], dtype=torch.long),
                                   torch.tensor([len(s) for s in steps]), torch.tensor(lengths), G, scale)
    return list(per_token.split(lengths))


@dataclass
class MicroBatch:
    """One of this rank's packed micro-batches with everything its updates read, on its n completion-token rows:
    the sequences' advantages (k,) or, with process supervision, per-token ones (n,) (the other None), and the loss
    mask, old / reference log-probs and IS weights (n,) (None where the step has none)."""

    packed: PackedBatch
    rows: torch.Tensor
    cu_seqlens: torch.Tensor
    real: bool  # False: a stand-in (sequence 0, weight 0), since every rank runs as many forwards as the others
    advantages: torch.Tensor | None
    token_advantages: torch.Tensor | None
    mask: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    is_weights: torch.Tensor | None


def pack_step(rollout: Rollout, cfg: GRPOConfig, device) -> tuple[list, int, dict]:
    """This rank's share of the step's micro-batches, planned over all ranks (tokens balanced, the same count on
    each): (packed, rows, cu_seqlens, real) each; the number of real micro-batches over all ranks; packing stats."""
    rank, world_size = world()
    sequences = [p + c for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]
    prompt_lengths = [len(p) for p in rollout.prompt_ids]
    lengths = [len(s) for s in sequences]
    plans = plan_micro_batches(lengths, cfg.train.micro_batch_tokens, num_ranks=world_size)
    micro_batches = []
    for indices in plans[rank]:
        # An empty micro-batch (S < ranks x micro-batches) runs sequence 0 with weight 0: FSDP's gathers and
        # reductions are collectives, so every rank runs the same number of forwards and backwards.
        packed = pack(sequences, indices or [0], prompt_lengths).to(device)
        micro_batches.append((packed, *completion_rows(packed), bool(indices)))
    num_batches = sum(1 for rank_plan in plans for indices in rank_plan if indices)
    return micro_batches, num_batches, PackingStats.from_plan(lengths, plans).as_dict()


def prepare(model, ref_model, rollout: Rollout, advantages, cfg: GRPOConfig) -> tuple[list[MicroBatch], dict, dict]:
    """(this rank's micro-batches, the loss's normalizers, packing stats).

    The normalizers are the step's global counts, for the loss op: num_items trainable tokens (dapo), num_sequences
    (grpo, dr_grpo), num_batches real micro-batches (bnpo); with them the micro-batch losses of all ranks add up to
    the step's loss. The old / reference / IS passes run here, once per step; with no trainable token (every
    completion truncated under loss.mask_truncated) they are skipped and the list is empty.
    """
    L, T = cfg.loss, cfg.generation.temperature
    device = next(model.parameters()).device
    packed, num_batches, stats = pack_step(rollout, cfg, device)
    S = len(rollout.completion_ids)
    keep_seq = ~rollout.truncated if L.mask_truncated else torch.ones(S, dtype=torch.bool)
    sampled = rollout.loss_mask or [[1] * len(c) for c in rollout.completion_ids]  # observations are not trained
    num_items = float(sum(sum(m) for m, k in zip(sampled, keep_seq) if k))
    norms = {"num_items": num_items, "num_sequences": float(S), "num_batches": num_batches}
    if num_items == 0:
        return [], norms, stats
    keep_seq = keep_seq.to(device)
    per_token = isinstance(advantages, list)
    needs_old = cfg.train.num_iterations > 1 or L.tis_cap is not None or L.is_mode is not None
    old = score(model, packed, T, autocast(cfg.model, device)) if needs_old else [None] * len(packed)
    ref_precision = autocast(reference_config(cfg.model), device)  # LoRA: model.dtype (no reference_dtype)
    ref = (score(ref_model or model, packed, T, reference_precision(model, ref_model, ref_precision))
           if L.beta else [None] * len(packed))
    micro_batches = []
    for (p, rows, cu_seqlens, real), old_logp, ref_logp in zip(packed, old, ref):
        mask = keep_seq[p.seq_of_token[rows]].float()
        if rollout.loss_mask is not None:
            mask = mask * completion_values(p, rollout.loss_mask)
        is_weights = rollout_correction(L, old_logp, p, cu_seqlens, rollout.sampling_logp, mask)
        adv = (None, completion_values(p, advantages)) if per_token else (advantages.to(device)[p.seq_indices], None)
        micro_batches.append(MicroBatch(p, rows, cu_seqlens, real, *adv, mask, old_logp, ref_logp, is_weights))
    return micro_batches, norms, stats


def rollout_correction(L: LossConfig, old_logp, packed: PackedBatch, cu_seqlens, sampling_logp,
                       mask: torch.Tensor) -> torch.Tensor | None:
    """IS weights (n,) on a micro-batch's completion rows against the generator's log-probs (loss.tis_cap, or TRL's
    loss.is_mode); None with neither. cu_seqlens (k+1,) delimits the rows' k sequences, so that a sequence mode
    takes each sequence's own product of ratios and not the packed row's. Where `mask` is 0 (observations of
    multi-turn episodes: no generator log-prob) the ratio is 1, so a sequence's product is over its sampled tokens."""
    if L.tis_cap is None and L.is_mode is None:
        return None
    sampled = torch.where(mask > 0, completion_values(packed, sampling_logp), old_logp)  # (n,)
    if L.tis_cap is not None:
        return truncated_is_weights(old_logp, sampled, cap=L.tis_cap)
    return rollout_is_weights(old_logp, sampled, mode=L.is_mode, clip_min=L.is_clip_min, clip_max=L.is_clip_max,
                              cu_seqlens=cu_seqlens)


def update(model, optimizer, micro_batches: list[MicroBatch], loss_config, norms: dict, cfg: GRPOConfig) -> dict:
    """num_iterations optimizer updates over the micro-batches; returns the step's loss metrics.

    norms: the step's normalizers (prepare), passed to the loss op as they are; gradients are summed over ranks,
    metrics are token-weighted over all ranks.
    """
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    totals, tokens, bad = {}, 0.0, 0
    for _ in range(cfg.train.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for mb in micro_batches:
            with autocast(cfg.model, device):
                hidden = packed_hidden_states(model, mb.packed)  # (N, H)
                loss, metrics = fused_linear_grpo_loss(
                    hidden[mb.rows], head.weight, mb.packed.targets[mb.rows], mb.advantages, mb.mask, mb.old_logp,
                    mb.ref_logp, loss_config, is_weights=mb.is_weights, cu_seqlens=mb.cu_seqlens,
                    token_advantages=mb.token_advantages, **norms)
            if not mb.real:
                loss = loss * 0.0
            packed_backward(model, loss)
            n = float(metrics["tokens"]) if mb.real else 0.0
            for k, v in metrics.items():
                if k != "tokens":
                    totals[k] = totals.get(k, 0.0) + float(v) * n
            tokens += n
        grad_norm = clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)  # skip: the weights (and the generator's) stay as they were
            bad += 1
            continue
        optimizer.step()
    # Gradients are not needed until the next update: freed now, they are not held (a model's size) through the
    # next rollout and reference pass.
    optimizer.zero_grad(set_to_none=True)
    names = list(totals)  # the same order on every rank: the loss's own
    summed = all_reduce_sum(torch.tensor([totals[k] for k in names] + [tokens], dtype=torch.float64)).tolist()
    return {**{f"loss/{k}": v / max(summed[-1], 1.0) for k, v in zip(names, summed)}, "grad_norm": float(grad_norm),
            "bad_updates": bad}


def release_freed_memory() -> None:
    """Hand the heap pages that freed tensors left behind back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc raises its mmap threshold as large blocks are freed, so later temporaries of a few MiB come from the heap,
    and the heap keeps their pages once they are freed: 393 MiB at 180M parameters (bench/MEMORY.md), on which the
    next phase's peak stacks. Called between phases: returning 1.2 GB took 0.18 s here.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_memory_before_embedding_grad(model) -> None:
    """In each training backward, release_freed_memory() just before the input embedding's gradient is computed.

    That gradient (V x H, as large as the head's) is the backward's last allocation, and by then every decoder
    layer's activations have been freed: handed back first, their pages do not sit under it (bench/MEMORY.md).
    """

    def on_forward(module, inputs, output):
        if output.requires_grad:  # a training forward (not the reference pass, not generation, not LoRA's frozen one)
            output.register_hook(lambda grad: release_freed_memory())

    model.get_input_embeddings().register_forward_hook(on_forward)


def optimize(model, ref_model, optimizer, rollout: Rollout, advantages, loss_config, cfg: GRPOConfig) -> dict:
    """One step's training on its rollout: prepare, then num_iterations updates; returns the step's loss metrics.

    `rollout` and `advantages` are the whole step's; loss_config is the loss op's (LossConfig.to_kernel). On several
    ranks each rank trains on its share of the micro-batches.
    """
    micro_batches, norms, stats = prepare(model, ref_model, rollout, advantages, cfg)
    if norms["num_items"] == 0:  # nothing to train: no loss, no update
        return {"nothing_to_train": 1.0, "bad_updates": 0, **stats}
    release_freed_memory()  # the rollout's and the reference pass's temporaries, before the step's peak
    return {**update(model, optimizer, micro_batches, loss_config, norms, cfg), "nothing_to_train": 0.0, **stats}


# ----------------------------------------------------------------------------------------------------------
# The loop


def learning_rate(train: TrainConfig, step: int) -> float:
    """Step `step`'s learning rate, used by each of its num_iterations updates: linear warmup over the first
    train.warmup_steps steps (GRPO steps, not updates), then constant."""
    return train.lr * min(1.0, (step + 1) / max(train.warmup_steps, 1))


def make_sampler(cfg: GRPOConfig, tokenizer, episodes: EpisodeRunner | None = None) -> PromptSampler:
    """The prompts in an order drawn from data.seed and train.seed, so that runs over seeds (the pipeline's seed
    goes into train.seed) see the prompts in different orders; data.seed alone picks a built-in task's examples.
    With `episodes` the prompts describe its tools."""
    order = replace(cfg.data, seed=cfg.data.seed + cfg.train.seed)
    return PromptSampler(load_prompts(cfg.data), tokenizer, order, tools=episodes.schemas if episodes else None)


def check_trained(history: list[dict], bad_steps: int, cfg: GRPOConfig, run_dir: Path) -> None:
    """Raise RunError (one line, exit code 2 on the command line) unless the run ends on a good, saved step and some
    step of it updated the weights."""
    if bad_steps:
        raise RunError(f"the run's last {bad_steps} step(s) had non-finite gradients, so its final state was not "
                           f"saved; the last good checkpoint is {latest_checkpoint(run_dir)}")
    updated = [h for h in history if not h["nothing_to_train"] and h["bad_updates"] < cfg.train.num_iterations]
    if history and not updated:
        raise RunError(f"no step of the run in {run_dir} updated the weights: every step had non-finite gradients "
                           f"or no trainable token")


def rollout_metrics(rollout: Rollout, advantages, reward_names, G: int) -> dict:
    """The step's reward, advantage (per completion, or per token under process supervision), length and step
    statistics."""
    lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
    valid = rollout.rewards[~rollout.rewards.isnan()]
    if isinstance(advantages, list):
        advantages = torch.cat(advantages)
    metrics = {
        "reward/mean": float(rollout.rewards.nanmean()),
        "reward/std": float(valid.std()) if valid.numel() > 1 else 0.0,
        "reward/zero_std_groups": float(constant_groups(rollout.rewards, G).float().mean()),
        "advantage/abs_mean": float(advantages.abs().mean()),
        "advantage/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "completion/length_mean": float(lengths.mean()),
        "completion/length_max": float(lengths.max()),
        "completion/truncated": float(rollout.truncated.float().mean()),
        "rollout/refills": rollout.refills,
    }
    for i, name in enumerate(reward_names):
        metrics[f"reward/{name}"] = float(rollout.per_func[:, i].nanmean())
    if rollout.episodes is not None:
        metrics.update(episode_metrics(rollout))
    if rollout.step_rewards is not None:
        step_rewards = torch.tensor([r for s in rollout.step_rewards for _, r in s if r == r])
        metrics.update({
            "steps/per_completion_mean": sum(map(len, rollout.step_rewards)) / len(rollout.step_rewards),
            "steps/reward_mean": float(step_rewards.mean()) if step_rewards.numel() else float("nan"),
            "steps/reward_std": float(step_rewards.std()) if step_rewards.numel() > 1 else 0.0})
    return metrics


def episode_metrics(rollout: Rollout) -> dict:
    """Multi-turn episodes: turns, tool use and sampled / observation tokens, per episode."""
    episodes, S = rollout.episodes, len(rollout.episodes)
    calls = sum(e["tool_calls"] for e in episodes)
    sampled = sum(map(sum, rollout.loss_mask))
    return {"episode/turns_mean": sum(e["turns"] for e in episodes) / S,
            "episode/sampled_tokens_mean": sampled / S,
            "episode/observation_tokens_mean": (sum(map(len, rollout.loss_mask)) - sampled) / S,
            "tools/calls_per_episode": calls / S,
            "tools/call_share": sum(e["tool_calls"] > 0 for e in episodes) / S,
            "tools/error_rate": sum(e["tool_errors"] for e in episodes) / max(calls, 1)}


@dataclass
class Run:
    """What a GRPO run holds from its start to its end."""

    cfg: GRPOConfig
    run_dir: Path
    tokenizer: object
    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    sampler: PromptSampler
    generator: object
    funcs: list
    weights: list
    reward_names: list[str]
    judge: int | None  # the reward column dynamic sampling judges groups by
    loss_config: object  # the loss op's (LossConfig.to_kernel)
    logger: MetricsLogger | None  # rank 0's
    learner: RewardModelLearner | None  # iterative RL: the reward model that keeps training
    episodes: EpisodeRunner | None = None  # multi-turn rollouts with tools or an environment


def check_inputs(cfg: GRPOConfig, world_size: int) -> None:
    """Refuse, in one line each, what would fail later: the step's prompts not dividing over the ranks, a model
    path that does not exist."""
    if cfg.train.prompts_per_step % world_size:
        raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} must be a multiple of the number "
                         f"of ranks ({world_size})")
    check_model_path(cfg.model.path, "model.path")
    if cfg.rewards.step_pattern is not None:
        compile_pattern(cfg.rewards.step_pattern)
    if "reward_model" in cfg.rewards.funcs and cfg.rewards.reward_model:
        check_model_path(cfg.rewards.reward_model, "rewards.reward_model")


def start_run(cfg: GRPOConfig, reward_funcs=None) -> tuple[Run, dict]:
    """The run's models, optimizer, prompts, rewards and generator, and its state: {"step", "bad_steps", "history"}
    from the last checkpoint of log.run_dir, or a fresh start."""
    from transformers import AutoTokenizer

    device = init_distributed()
    rank, world_size = world()
    check_inputs(cfg, world_size)
    run_dir = Path(cfg.log.run_dir)
    if rank == 0:
        lock_run_dir(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    write_run_config(run_dir, cfg, checkpoint is not None, MAY_CHANGE, write=rank == 0)
    torch.manual_seed(cfg.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(cfg.model, trainable=True, device=device)
    release_memory_before_embedding_grad(model)
    # LoRA: the reference is the policy with its adapters disabled (fastgrpo/lora.py), no second model
    ref_model = (load_model(reference_config(cfg.model), trainable=False, device=device)
                 if cfg.loss.beta and not cfg.model.lora else None)
    funcs, weights = make_rewards(cfg, reward_funcs, device)
    reward_names = [reward_name(f) for f in funcs]
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train)  # LoRA: the adapters
    episodes = episode_runner(cfg, tokenizer)
    sampler = make_sampler(cfg, tokenizer, episodes)
    learner = make_learner(cfg, funcs, weights, reward_names)
    state = {"step": 0, "bad_steps": 0, "history": []}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        sampler.load_state(state["sampler"])
        if learner is not None:
            learner.load_state(state["reward_model_learner"])
    generator = make_generator(cfg, model, tokenizer)
    if checkpoint is not None:
        generator.sync_weights()  # a resumed model differs from the files vLLM loaded
    logger = (MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project)
              if rank == 0 else None)
    loss_config = cfg.loss.to_kernel(cfg.generation.temperature, cfg.generation.max_completion_length)
    return Run(cfg, run_dir, tokenizer, model, ref_model, optimizer, sampler, generator, funcs, weights,
               reward_names, dynamic_sampling_column(cfg, reward_names), loss_config, logger, learner,
               episodes), state


def grpo_step(run: Run, step: int) -> dict:
    """One step: rollout -> advantages -> prepare -> update -> the generator sees the new weights; its metrics."""
    cfg, G = run.cfg, run.cfg.generation.num_generations
    timer = Timer()
    with timer("generation"):
        run.generator.wake()
        rollout = collect_rollout(run.generator, run.sampler, run.tokenizer, run.funcs, run.weights, cfg, step,
                                  run.judge, run.episodes)
        run.generator.sleep()
    advantages = rollout_advantages(rollout, cfg)
    lr = learning_rate(cfg.train, step)
    for group in run.optimizer.param_groups:  # the config's values, also after a resume that changed them
        group.update(lr=lr, weight_decay=cfg.train.weight_decay)
    with timer("training"):
        loss_metrics = optimize(run.model, run.ref_model, run.optimizer, rollout, advantages, run.loss_config, cfg)
    release_freed_memory()  # the loss's and the optimizer step's temporaries, before the packed copies are rebuilt
    with timer("weight_sync"):
        run.generator.sync_weights()
    if run.learner is not None:
        with timer("reward_model"):
            loss_metrics.update(learn_from_rollout(run.learner, cfg, run.tokenizer, rollout, step))
    # multi-turn: the sampled tokens, not the observations
    completion_tokens = sum(map(sum, rollout.loss_mask or [[1] * len(c) for c in rollout.completion_ids]))
    return {**rollout_metrics(rollout, advantages, run.reward_names, G), **loss_metrics, **timer.as_dict(),
            "tokens_per_s": completion_tokens / max(sum(timer.as_dict().values()), 1e-9),
            "peak_memory_mib": peak_memory_mib(), "data/skipped_long_prompts": run.sampler.skipped_long, "lr": lr}


def end_step(run: Run, step: int, state: dict) -> None:
    """Save a checkpoint when one is due, unless the step went non-finite (the last good one stays); stop the run
    after train.max_bad_steps such steps in a row."""
    cfg, bad_steps = run.cfg, state["bad_steps"]
    due = step + 1 == cfg.train.steps or (step + 1) % cfg.log.save_every == 0
    if due and not bad_steps:
        saved = {"step": step + 1, "bad_steps": 0, "history": state["history"], "sampler": run.sampler.state()}
        if run.learner is not None:
            saved["reward_model_learner"] = run.learner.state()
        save_checkpoint(run.run_dir, step + 1, run.model, run.tokenizer, run.optimizer, state=saved,
                        keep_last=cfg.log.keep_last)
    if bad_steps >= cfg.train.max_bad_steps:
        raise RunError(f"stopping: {bad_steps} consecutive steps with non-finite gradients; the last good "
                       f"checkpoint is {latest_checkpoint(run.run_dir)}")


def train(cfg: GRPOConfig, reward_funcs=None) -> list[dict]:
    """Run (or resume) the GRPO stage described by cfg; returns the per-step metrics (on every rank).

    Under torchrun every rank runs this; rank 0 alone logs and writes the files outside a checkpoint's shards.
    """
    run, state = start_run(cfg, reward_funcs)
    try:
        for step in tqdm(range(state["step"], cfg.train.steps), initial=state["step"], total=cfg.train.steps,
                         desc="grpo", disable=None if world()[0] == 0 else True):
            metrics = grpo_step(run, step)
            if not metrics["nothing_to_train"]:  # such a step neither ends nor extends a run of bad steps
                failed = metrics["bad_updates"] == cfg.train.num_iterations
                state["bad_steps"] = state["bad_steps"] + 1 if failed else 0
            if run.logger is not None:
                run.logger.log(step, metrics)
            state["history"].append({"step": step, **metrics})
            end_step(run, step, state)
    finally:
        if run.logger is not None:
            run.logger.close()
        if run.episodes is not None:
            run.episodes.close()
    check_trained(state["history"], state["bad_steps"], cfg, run.run_dir)
    return state["history"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(__doc__, GRPOConfig))
        return
    from .runs import training_summary

    cfg = load_cli_config(GRPOConfig, argv)
    t0 = time.time()
    history = train(cfg)
    rank, world_size = world()
    if rank == 0:
        keys = ["reward/*", "completion/length_mean", "loss/kl", "tokens_per_s"]
        print(training_summary("grpo", "fastgrpo.grpo", cfg.log.run_dir, history, keys, time.time() - t0,
                               world_size, eval_args=[f"data.source={cfg.data.source}"]), flush=True)
    end_worker()


if __name__ == "__main__":
    command_line(main)
