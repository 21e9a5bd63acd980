"""Score a checkpoint on held-out prompts, with the verifiers the RL rewards use.

    python -m fastgrpo.evaluate CHECKPOINT [key=value ...]     # e.g. k=8 data.source=builtin:arithmetic
    python -m fastgrpo.evaluate CONFIG.yaml [key=value ...]    # an EvalConfig with model=CHECKPOINT

Reasoning prompts (data.source, held-out split): k samples per prompt; pass@1 is the share of correct samples
averaged over prompts (R1's "pass@1 over k samples"), maj@k the share of prompts whose most frequent final
answer is correct; plus the format rate, the mean rule reward (rewards.funcs / weights) and completion length.
General prompts (data.general_source, when set): the reward model's mean score ("helpfulness") and, for the
built-in general task, the share of answers equal to the preferred one (a check on the reward model that
cannot be gamed).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .config import DataConfig, RewardConfig, ToolsConfig, load_cli_config
from .config_doc import help_text
from .data import decode, encode_prompt, load_general, load_prompts
from .episodes import EpisodeRunner, sampled_ids, tools_enabled
from .generation import HFGenerator, SamplingConfig, VLLMGenerator
from .rewards import FormatReward, accuracy_reward, build_rewards, compute_rewards, extract_answer
from .runs import check_model_path, command_line, evaluation_summary, write_atomic

# vLLM's default scheduler runs at most 256 sequences at once on a GPU (max_num_seqs): chunks of that size keep it
# as busy as one call with every prompt would, but for each chunk's tail
SEQUENCES_PER_CHUNK = 256


@dataclass
class EvalConfig:
    model: str = "???"  # an HF checkpoint folder
    data: DataConfig = field(default_factory=lambda: DataConfig(max_prompt_length=256))
    rewards: RewardConfig = field(default_factory=RewardConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)  # multi-turn episodes with these tools (as in training)
    backend: str = "vllm"  # vllm | hf
    k: int = 4  # samples per prompt
    temperature: float = 0.6  # R1 reports pass@1 at temperature 0.6, top-p 0.95
    top_p: float = 0.95
    max_completion_length: int = 64
    kv_cache_gib: float = 0.25
    dtype: str = "auto"  # vLLM's: auto (the checkpoint's) | float32 | bfloat16 (fp32 mixed-precision checkpoints)
    seed: int = 0
    out: str | None = None  # also write the results here as JSON


def make_sampler_llm(cfg: EvalConfig):
    """A generator with the checkpoint's weights: vLLM in process (nothing to sync), or transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if cfg.backend == "hf":
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, use_safetensors=True).eval()
        return HFGenerator(model, tokenizer.eos_token_id, tokenizer.pad_token_id), tokenizer
    if cfg.backend != "vllm":
        raise ValueError(f"backend must be 'vllm' or 'hf', got {cfg.backend!r}")
    generator = VLLMGenerator(cfg.model, None, sync="none", max_model_len=cfg.data.max_prompt_length +
                              cfg.max_completion_length, kv_cache_gib=cfg.kv_cache_gib, seed=cfg.seed,
                              dtype=cfg.dtype)
    return generator, tokenizer


def sample(generator, tokenizer, prompts: list, sampling: SamplingConfig, desc: str = "sampling",
           episodes: EpisodeRunner | None = None, rows: list[dict] | None = None,
           episode_stats: list | None = None) -> list[list]:
    """k completions per prompt: (text, token ids, finish reason), the text with special tokens but no EOS; with
    `episodes`, multi-turn episodes from the prompts' dataset `rows`, each one's turns and tool calls appended to
    `episode_stats`.

    In chunks of about SEQUENCES_PER_CHUNK sequences, for a progress bar with ETA (off when stderr is no terminal).
    Sample j of prompt i keeps its seed, sampling.seed + i * n + j, whatever the chunk (each chunk's seed starts
    where its first prompt's does), so the samples are those of one call with every prompt.
    """
    ids = [encode_prompt(tokenizer, p, episodes.schemas if episodes else None) for p in prompts]
    per_chunk = max(1, SEQUENCES_PER_CHUNK // sampling.n)
    groups = []
    with tqdm(total=len(ids), desc=desc, unit="prompt", disable=None) as bar:
        for start in range(0, len(ids), per_chunk):
            seed = None if sampling.seed is None else sampling.seed + start * sampling.n
            chunk, chunk_sampling = ids[start:start + per_chunk], replace(sampling, seed=seed)
            outputs = (generator.generate(chunk, chunk_sampling) if episodes is None else
                       episodes.generate(generator, chunk, rows[start:start + per_chunk], chunk_sampling))
            # an episode is scored on what the model wrote, not on what its tools answered
            groups += [[(decode(tokenizer, sampled_ids(c)), c.token_ids, c.finish_reason) for c in group]
                       for group in outputs]
            if episode_stats is not None:
                episode_stats += [c.extra for group in outputs for c in group]
            bar.update(len(outputs))
    return groups


def held_out(source: str) -> str | None:
    """The split to score: a built-in task's held-out examples, else the configured data.split (e.g. test)."""
    return "eval" if source.startswith("builtin:") else None


def majority_correct(answers: list[str | None], correct: list[float]) -> float:
    """1.0 if the most frequent extracted answer (ties: the first seen) is a correct one; None answers abstain."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = votes.most_common(1)[0][0]
    return correct[answers.index(top)]


def evaluate_reasoning(generator, tokenizer, cfg: EvalConfig) -> dict:
    ds = load_prompts(replace(cfg.data, general_source=None), split=held_out(cfg.data.source))
    k = cfg.k
    sampling = SamplingConfig(n=k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_completion_length,
                              seed=cfg.seed)
    episodes = None
    if tools_enabled(cfg.tools):
        episodes = EpisodeRunner(cfg.tools, tokenizer, tokenizer.eos_token_id, cfg.max_completion_length,
                                 cfg.data.prompt_column, cfg.rewards.code)
    stats = []
    groups = sample(generator, tokenizer, ds[cfg.data.prompt_column], sampling, desc="eval reasoning",
                    episodes=episodes, rows=list(ds), episode_stats=stats)
    texts = [t for g in groups for t, _, _ in g]
    ids = [i for g in groups for _, i, _ in g]
    columns = {c: [v for v in ds[c] for _ in range(k)] for c in ds.column_names if c != cfg.data.prompt_column}
    prompts = [p for p in ds[cfg.data.prompt_column] for _ in range(k)]
    correct = accuracy_reward(prompts, texts, ids, answer=columns[cfg.data.answer_column])
    correct = [0.0 if c is None else c for c in correct]
    funcs, weights = build_rewards(cfg.rewards, rule_only=True)  # the reward model scores general prompts alone
    rewards = compute_rewards(funcs, weights, prompts, texts, ids, columns).rewards
    answers = [extract_answer(t) for t in texts]
    maj = [majority_correct(answers[i * k:(i + 1) * k], correct[i * k:(i + 1) * k]) for i in range(len(groups))]
    results = {
        "prompts": len(groups),
        "pass@1": sum(correct) / len(correct),
        f"maj@{k}": sum(maj) / len(maj),
        "format": sum(FormatReward()(prompts, texts)) / len(texts),
        "reward": float(rewards.nanmean()),
        "length": sum(len(i) for i in ids) / len(ids),
        "truncated": sum(r == "length" for g in groups for _, _, r in g) / len(texts),
    }
    if episodes is not None:
        episodes.close()
        results.update({"tool_call_share": sum(e["tool_calls"] > 0 for e in stats) / len(stats),
                        "turns": sum(e["turns"] for e in stats) / len(stats)})
    return results


def evaluate_general(generator, tokenizer, cfg: EvalConfig, device=None) -> dict:
    """General prompts: completion length, the reward model's mean score (on `device`) and the preferred-answer
    rate."""
    ds = load_general(cfg.data, split=held_out(cfg.data.general_source))
    sampling = SamplingConfig(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_tokens=cfg.max_completion_length, seed=cfg.seed + 1)
    groups = sample(generator, tokenizer, ds[cfg.data.prompt_column], sampling, desc="eval general")
    prompts = [p for p in ds[cfg.data.prompt_column] for _ in range(cfg.k)]
    texts = [t for g in groups for t, _, _ in g]
    out = {"general_prompts": len(groups), "general_length": sum(len(i) for g in groups for _, i, _ in g) / len(texts)}
    if cfg.rewards.reward_model:
        only = RewardConfig(funcs=["reward_model"], weights=[1.0], reward_model=cfg.rewards.reward_model)
        [reward_model], _ = build_rewards(only, device=device)
        scores = reward_model(prompts=prompts, completions=texts)
        out["helpfulness"] = sum(scores) / len(scores)
    if "chosen" in ds.column_names:
        chosen = [c for c in ds["chosen"] for _ in range(cfg.k)]
        out["preferred"] = sum(t.strip() == c for t, c in zip(texts, chosen)) / len(texts)
    return out


def evaluate(cfg: EvalConfig) -> dict:
    if not Path(cfg.model).is_dir():
        raise ValueError(f"model={cfg.model!r} is not a checkpoint folder")
    if cfg.data.general_source and cfg.rewards.reward_model:
        check_model_path(cfg.rewards.reward_model, "rewards.reward_model")
    generator, tokenizer = make_sampler_llm(cfg)
    results = {"model": cfg.model, **evaluate_reasoning(generator, tokenizer, cfg)}
    if cfg.data.general_source:
        # the reward model on the GPU when there is one (loaded without a device, it would score on the CPU)
        device = torch.device("cuda") if torch.cuda.is_available() else None
        results.update(evaluate_general(generator, tokenizer, cfg, device))
    if cfg.out:
        write_atomic(cfg.out, json.dumps(results, indent=1))
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(__doc__, EvalConfig))
        return
    if Path(argv[0]).is_dir():
        argv = [f"model={argv[0]}", *argv[1:]]
    cfg = load_cli_config(EvalConfig, argv)
    results = evaluate(cfg)
    print(evaluation_summary(results, argv, cfg.out), flush=True)


if __name__ == "__main__":
    command_line(main)
