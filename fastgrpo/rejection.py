"""Rejection sampling (R1 stage 3): sample from the RL model, keep what the verifiers accept, mix in general data.

    python -m fastgrpo.rejection [CONFIG] [key=value ...]

k completions per prompt from the in-process vLLM generator; a completion is kept when it is correct
(accuracy), well formed (format), written in the prompt's language (language consistency, where it applies)
and not repetitive; exact duplicates are dropped and at most `max_per_prompt` are kept per prompt. General
(non-reasoning) prompt/response pairs are added so they make up `general_fraction` of the rows. The dataset is
written as JSON lines (`prompt`, `completion`, `source` and the provenance of each row: the sampling settings
and rewards of a sampled row, the source dataset of a general one), atomically, ready for `fastgrpo.sft`.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .config import DataConfig, RewardConfig, load_cli_config
from .config_doc import help_text
from .data import as_messages, load_general, load_prompts
from .evaluate import sample
from .generation import SamplingConfig, VLLMGenerator
from .rewards import build_rewards
from .runs import check_model_path, command_line, dataset_summary, write_atomic


@dataclass
class RejectionConfig:
    model: str = "???"  # the model to sample from (the stage-2 checkpoint)
    data: DataConfig = field(default_factory=DataConfig)  # reasoning prompts (train split)
    k: int = 8  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 256
    max_per_prompt: int = 2  # distinct accepted completions kept per prompt
    min_language_consistency: float = 0.95
    max_ngram_repeats: int = 4  # reject a completion in which some 8-gram of tokens occurs more often
    general_source: str | None = "builtin:assist"  # prompt/response pairs of general data
    general_prompt_column: str = "prompt"  # text, or chat messages
    general_response_column: str = "response"
    general_fraction: float = 0.3  # share of the written rows that are general data
    out: str = "runs/rejection/dataset.jsonl"
    kv_cache_gib: float = 0.25
    dtype: str = "auto"  # vLLM's: auto (the checkpoint's) | float32 | bfloat16 (fp32 mixed-precision checkpoints)
    seed: int = 0


# what a kept completion must pass (see rejection_reason); the weights go unused
VERIFIERS = RewardConfig(funcs=["accuracy", "format", "language_consistency"], weights=[1.0, 1.0, 1.0])


def repetitive(token_ids: list[int], n: int = 8, max_repeats: int = 4) -> bool:
    """True when some n-gram occurs more than `max_repeats` times (a degenerate loop).

    >>> repetitive([1, 2] * 20, n=2, max_repeats=4), repetitive(list(range(40)), n=2, max_repeats=4)
    (True, False)
    """
    grams = Counter(tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1))
    return bool(grams) and max(grams.values()) > max_repeats


def rejection_reason(text, ids, finish, accuracy, form, language, seen: set, cfg: RejectionConfig) -> str | None:
    """Why a sample is not kept (the first failed check), or None to keep it; `seen` holds the prompt's kept texts."""
    if accuracy != 1.0:
        return "incorrect"
    if form != 1.0:
        return "format"
    if finish == "length":
        return "truncated"
    if language is not None and language < cfg.min_language_consistency:
        return "language"
    if repetitive(ids, max_repeats=cfg.max_ngram_repeats):
        return "repetitive"
    if text in seen:
        return "duplicate"
    if len(seen) >= cfg.max_per_prompt:
        return "enough"
    return None


def accepted_samples(generator, tokenizer, cfg: RejectionConfig) -> tuple[list[dict], dict]:
    """(rows of accepted completions, counts of why the others were rejected)."""
    ds = load_prompts(replace(cfg.data, general_source=None))
    sampling = SamplingConfig(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_tokens=cfg.max_completion_length, seed=cfg.seed)
    prompts = ds[cfg.data.prompt_column]
    groups = sample(generator, tokenizer, prompts, sampling, desc="rejection sampling")
    accuracy, fmt, language_consistency = build_rewards(VERIFIERS)[0]
    rows, counts = [], Counter()
    for prompt, answer, group in zip(prompts, ds[cfg.data.answer_column], groups):
        texts = [t for t, _, _ in group]
        correct = accuracy([prompt] * len(texts), texts, answer=[answer] * len(texts))
        formed = fmt([prompt] * len(texts), texts)
        language = language_consistency([prompt] * len(texts), texts)
        seen = set()
        for (text, ids, finish), acc, form, lang in zip(group, correct, formed, language):
            counts["sampled"] += 1
            reason = rejection_reason(text, ids, finish, acc, form, lang, seen, cfg)
            counts[reason or "kept"] += 1
            if reason is None:
                seen.add(text)
                rows.append({"prompt": prompt, "completion": text + tokenizer.eos_token, "source": "rejection_sampling",
                             "provenance": {"model": cfg.model, "answer": answer, "temperature": cfg.temperature,
                                            "top_p": cfg.top_p, "k": cfg.k, "seed": cfg.seed,
                                            "rewards": {"accuracy": acc, "format": form, "language": lang}}})
    return rows, dict(counts)


def general_rows(cfg: RejectionConfig, num_reasoning: int, eos: str) -> list[dict]:
    """General prompt/response rows, as many as make them `general_fraction` of the dataset."""
    if not cfg.general_source or cfg.general_fraction <= 0:
        return []
    if not 0 < cfg.general_fraction < 1:
        raise ValueError(f"general_fraction must be in [0, 1), got {cfg.general_fraction}")
    n = round(num_reasoning * cfg.general_fraction / (1 - cfg.general_fraction))
    data = replace(cfg.data, general_source=cfg.general_source, general_prompt_column=cfg.general_prompt_column)
    ds = load_general(data, num_examples=max(n, 1))  # its prompts in column data.prompt_column
    if cfg.general_response_column not in ds.column_names:
        raise ValueError(f"dataset {cfg.general_source!r} has no column {cfg.general_response_column!r} "
                         f"(columns: {', '.join(ds.column_names)})")
    rows = []
    for i in range(n):  # a dataset smaller than n is cycled
        ex = ds[i % len(ds)]
        rows.append({"prompt": ex[cfg.data.prompt_column], "completion": ex[cfg.general_response_column] + eos,
                     "source": "general", "provenance": {"dataset": cfg.general_source, "row": i % len(ds)}})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    """All rows or nothing: written to a temporary file, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run(cfg: RejectionConfig) -> dict:
    """Build the dataset at cfg.out (skipped when it already exists); returns its summary."""
    from transformers import AutoTokenizer

    out = Path(cfg.out)
    summary_path = out.with_suffix(".summary.json")
    if out.exists() and summary_path.exists():
        return json.loads(summary_path.read_text())
    check_model_path(cfg.model, "model")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    generator = VLLMGenerator(cfg.model, None, sync="none", seed=cfg.seed, kv_cache_gib=cfg.kv_cache_gib,
                              max_model_len=cfg.data.max_prompt_length + cfg.max_completion_length, dtype=cfg.dtype)
    rows, counts = accepted_samples(generator, tokenizer, cfg)
    if not rows:
        raise RuntimeError(f"rejection sampling kept no completion of {counts.get('sampled', 0)} ({counts})")
    general = general_rows(cfg, len(rows), tokenizer.eos_token)
    if len({isinstance(r["prompt"], list) for r in rows + general}) > 1:  # a JSON column holds one type (data.mix)
        for r in rows + general:
            r["prompt"] = as_messages(r["prompt"])
    summary = {"rows": len(rows) + len(general), "reasoning_rows": len(rows), "general_rows": len(general),
               "prompts": len({json.dumps(r["prompt"]) for r in rows}), "counts": counts, "config": asdict(cfg)}
    write_jsonl(rows + general, out)
    write_atomic(summary_path, json.dumps(summary, indent=1))
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(__doc__, RejectionConfig))
        return
    cfg = load_cli_config(RejectionConfig, argv)
    print(dataset_summary(run(cfg), cfg), flush=True)


if __name__ == "__main__":
    command_line(main)
