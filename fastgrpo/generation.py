"""Rollouts: G completions per prompt, with per-token sampling log-probs and a finish reason.

Two backends with one interface:
- VLLMGenerator: vllm.LLM in this process. By default it shares weight storage with the trainer's model
  (zero-copy, nothing to sync after an optimizer step); sync="reload" copies weights in place instead.
- HFGenerator: transformers `generate` with a KV cache, for machines without vLLM and as a cross-check.

Log-probs are those of the distribution actually sampled from: log_softmax(logits / temperature), after top-k /
top-p when those are on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
from torch.distributed.tensor import DTensor
from transformers import (GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from . import vllm_bridge


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 8  # completions per prompt (G)
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS
    # completion j of prompt i samples with seed + i * n + j (vLLM seeds a request's j-th sample seed + j): every
    # sample of a call has its own seed
    seed: int | None = None
    ignore_eos: bool = False  # never stop early: every completion gets max_tokens (benchmarks)

    def __post_init__(self):
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"n and max_tokens must be >= 1, got n={self.n}, max_tokens={self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature}, "
                             f"{self.top_p}, {self.top_k}")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # one per token in token_ids
    finish_reason: str  # "stop" (a stop token, included in token_ids) or "length" (max_tokens reached)
    prompt_index: int = 0
    extra: dict = field(default_factory=dict)


class VLLMGenerator:
    """vLLM in process. `model` is the trainer's transformers model loaded from the same `model_path`.

    sync="zero_copy" shares storage with `model`: no copy of the weights, nothing to copy after an optimizer step
    (on CPU, vLLM's oneDNN-packed copies of its linear layers are rebuilt from the shared weights instead, ~0.5 s per
    step on a 180M-parameter model: at decode shapes they run up to ~3x faster than a plain linear). "reload" keeps
    vLLM's own weights and copies the trainer's into them in place on `sync_weights()` (1.3-1.9 s on that model).
    "copy" keeps vLLM's own weights in its dtype and casts the trainer's into them in place, tensor by tensor
    (mixed precision: fp32 master weights, bf16 sampling; fastgrpo/precision.py); on CPU the packed layers keep no
    plain weight and are repacked from casts of the trainer's.
    "auto" (the default) is zero_copy where the weights can be shared (same dtype and device, not FSDP shards),
    else copy where only the dtype differs, else reload (bench/GENERATION.md); on several ranks (world_size > 1)
    every mode is reload. vllm_bridge.choose_sync decides; `weights` is the strategy, `weights.reason` says why.
    sync="none" (no trainer model): vLLM samples from the checkpoint's weights, for evaluation and rejection
    sampling.
    """

    def __init__(self, model_path, model=None, sync="auto", dtype="auto", max_model_len=2048,
                 kv_cache_gib=1.0, gpu_memory_utilization=0.3, seed=0, tensor_parallel_size=1, world_size=1):
        vllm_bridge.check_sync_mode(sync, model)
        self.llm = vllm_bridge.create_llm(model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                                          kv_cache_gib=kv_cache_gib, gpu_memory_utilization=gpu_memory_utilization,
                                          enable_sleep_mode=torch.cuda.is_available(),
                                          tensor_parallel_size=tensor_parallel_size)
        self.eos_token_id = self.llm.get_tokenizer().eos_token_id
        self.weights = vllm_bridge.make_weight_sync(sync, self.llm, model, world_size=world_size,
                                                    dtype=None if dtype == "auto" else getattr(torch, dtype))

    @property
    def sync(self) -> str:
        """The strategy chosen: "zero_copy", "copy", "reload" or "none"."""
        return self.weights.name

    @property
    def repack(self) -> bool:
        """Whether vLLM's CPU packed copies are rebuilt after each step (zero_copy, copy on CPU)."""
        return self.weights.repack

    def sync_weights(self) -> float:
        """Make vLLM see the trainer's current weights; returns seconds spent (0 when all are shared).

        vLLM's prefix cache (on by default) holds the KV of whole blocks of prompts seen before, computed by the
        weights of that time: it is emptied too, or a recurring prompt (a shared system prompt) would be sampled
        from the old weights' KV, off-policy, with log-probs that are not the trainer's.
        """
        seconds = self.weights.sync()
        self.llm.reset_prefix_cache()
        return seconds

    def sleep(self):
        """Free what only sampling needs while the trainer runs: the KV cache (CUDA), the packed copies (CPU)."""
        self.weights.sleep()

    def wake(self):
        self.weights.wake()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        seeds = [None if sampling.seed is None else sampling.seed + i * sampling.n for i in range(len(prompts))]
        return self._generate(prompts, sampling, seeds, [sampling.max_tokens] * len(prompts))

    def generate_each(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int],
                      max_tokens: list[int]) -> list[Completion]:
        """One completion per prompt, prompt i sampled with seed seeds[i] and at most max_tokens[i] tokens (the turns
        of multi-turn episodes: each continues its own token ids; sampling.n and .seed are not used)."""
        return [out[0] for out in self._generate(prompts, replace(sampling, n=1), seeds, max_tokens)]

    def _generate(self, prompts, sampling: SamplingConfig, seeds: list, max_tokens: list[int]) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        self.weights.ready()  # asleep on CPU (no wake since): the packed copies are rebuilt first
        params = [
            SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                           top_k=sampling.top_k or -1, max_tokens=budget,
                           stop_token_ids=list(sampling.stop_token_ids), logprobs=0,
                           detokenize=False,  # callers decode the token ids themselves; vLLM's text goes unused
                           min_tokens=budget if sampling.ignore_eos else 0, seed=seed)
            for seed, budget in zip(seeds, max_tokens)
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [
            [Completion(list(o.token_ids), [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)],
                        "length" if o.finish_reason == "length" else "stop", prompt_index=i)
             for o in out.outputs]
            for i, out in enumerate(outputs)
        ]


class _SampledLogprobs:
    """A last logits processor that records the log-prob of each sampled token under the scores it was drawn from.

    Called at step t with the sequences so far (ending in the token drawn at step t-1) and step t's final scores:
    it reads step t-1's token from the former. One step's scores are held at a time, never (B, steps, V) as
    output_scores would: 5 GB for 16 sequences x 512 tokens of a 151,936-token vocabulary.
    """

    def __init__(self):
        self.scores, self.logprobs = None, []

    def _take(self, tokens: torch.Tensor):
        s = self.scores.float()
        self.logprobs.append(s.gather(-1, tokens[:, None]).squeeze(-1) - s.logsumexp(-1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.scores is not None:
            self._take(input_ids[:, -1])
        self.scores = scores
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._take(last_tokens)
        return torch.stack(self.logprobs, 1)


class _SeededSampler:
    """The last logits processor when sampling: draws each row's next token by inverting its CDF at a uniform from
    the row's own generator, seeded as vLLM seeds a request's samples (row j of prompt i: seed + i * n + j), and
    leaves only that token possible, so that generate's greedy pick takes it. A row's draws depend on its seed alone,
    not on which prompts share the batch: a prompt gets the same samples on any number of ranks, and after a resume.
    """

    def __init__(self, seeds: list[int], steps: int, device):
        self.uniforms = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(seed))
                                     for seed in seeds]).to(device)  # (rows, steps)
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = scores.float().softmax(-1).cumsum(-1)  # (rows, V)
        total = cdf[:, -1:]
        # strictly below the total, so that the first entry of the CDF above it is a token of non-zero probability
        x = torch.minimum(self.uniforms[:, self.step, None] * total, total.nextafter(torch.zeros_like(total)))
        self.step += 1
        tokens = torch.searchsorted(cdf, x, right=True)  # (rows, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def _processors(sampling: SamplingConfig, recorder: _SampledLogprobs, seeds: list[int], device) -> LogitsProcessorList:
    """The sampling transforms, then the recorder (so that it sees the scores each token is drawn from), then, unless
    greedy, the seeded draw. transformers' own sampling stays off: it would warp after the recorder, and it draws
    from one generator for the whole batch."""
    if sampling.temperature == 0:
        return LogitsProcessorList([recorder])
    return LogitsProcessorList([
        TemperatureLogitsWarper(sampling.temperature),
        *([TopKLogitsWarper(sampling.top_k)] if sampling.top_k else []),
        *([TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1.0 else []),
        recorder,
        _SeededSampler(seeds, sampling.max_tokens, device),
    ])


class HFGenerator:
    """transformers `generate` on the trainer's own model (always in sync).

    Samples with exactly the SamplingConfig's settings: the model's generation_config (a repetition_penalty, bad
    words...) is set aside while generating, since sampling from another distribution than the one the log-probs
    describe would make the rollout off-policy.

    autocast: a function returning the context generation runs in (the trainer's mixed precision, if any).
    """

    def __init__(self, model, eos_token_id: int, pad_token_id: int, autocast=contextlib.nullcontext):
        self.model, self.eos_token_id, self.pad_token_id = model, eos_token_id, pad_token_id
        self.autocast = autocast

    def sync_weights(self) -> float:
        return 0.0

    def sleep(self):
        pass

    def wake(self):
        pass

    def _no_grad(self):
        """inference_mode where it is safe: no version counters or view tracking on the decode loop's small ops (8%
        of a tiny model's rollout, measured against no_grad); what leaves is Python lists. Not on FSDP shards: the
        gathered weights would be inference tensors that the next training step cannot update."""
        sharded = any(isinstance(p, DTensor) for p in self.model.parameters())
        return torch.no_grad() if sharded else torch.inference_mode()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        seed = int(torch.randint(2**62, ())) if sampling.seed is None else sampling.seed
        with self._no_grad():
            return self._generate(prompts, sampling, [seed + row for row in range(len(prompts) * sampling.n)])

    def generate_each(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int],
                      max_tokens: list[int]) -> list[Completion]:
        """As VLLMGenerator.generate_each. Rows sample up to the largest budget together and each is cut at its own:
        a row's tokens depend on its seed alone, so the cut row is what a run to its budget samples."""
        with self._no_grad():
            outputs = self._generate(prompts, replace(sampling, n=1, max_tokens=max(max_tokens)), seeds)
        completions = []
        for (c,), budget in zip(outputs, max_tokens):
            if len(c.token_ids) > budget:
                c = Completion(c.token_ids[:budget], c.logprobs[:budget], "length", c.prompt_index)
            completions.append(c)
        return completions

    def _generate(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> list[list[Completion]]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: generation continues from the right edge
            ids[i, width - len(p):] = torch.tensor(p)
            attention[i, width - len(p):] = 1
        stops = [self.eos_token_id, *sampling.stop_token_ids]
        recorder = _SampledLogprobs()
        processors = _processors(sampling, recorder, seeds, device)
        config = GenerationConfig(do_sample=False, max_new_tokens=sampling.max_tokens, eos_token_id=stops,
                                  pad_token_id=self.pad_token_id,
                                  min_new_tokens=sampling.max_tokens if sampling.ignore_eos else None)
        # generate fills what `config` leaves unset from the model's generation_config: none of it may apply
        training, model_config = self.model.training, self.model.generation_config
        self.model.eval()  # sampling never runs dropout (and transformers' eval-mode forward is faster)
        self.model.generation_config = GenerationConfig()
        try:
            with self.autocast():
                # each prompt's n rows side by side (row i * n + j), as num_return_sequences would lay them out
                sequences = self.model.generate(input_ids=ids.repeat_interleave(sampling.n, 0).to(device),
                                                attention_mask=attention.repeat_interleave(sampling.n, 0).to(device),
                                                generation_config=config, logits_processor=processors)
        finally:
            self.model.train(training)
            self.model.generation_config = model_config
        new = sequences[:, width:]  # (B*n, steps)
        token_logprobs = recorder.finish(new[:, -1]).cpu()  # (B*n, steps)
        new = new.cpu()
        is_stop = torch.isin(new, torch.tensor(stops))
        results = [[] for _ in prompts]
        for row in range(new.shape[0]):
            stop_at = is_stop[row].nonzero()
            end = int(stop_at[0]) + 1 if len(stop_at) else new.shape[1]
            reason = "stop" if len(stop_at) else "length"
            results[row // sampling.n].append(Completion(new[row, :end].tolist(), token_logprobs[row, :end].tolist(),
                                                         reason, prompt_index=row // sampling.n))
        return results
