"""Data-parallel GRPO steps give the same loss and the same weights on 1 process and on 2 FSDP2 ranks (gloo, CPU).

The step below is fastgrpo.grpo.optimize's loss math, with each rank taking its share of the plan and the
normalizers (completion tokens, sequences) summed over ranks. The 1-process run is plain PyTorch (no process
group, no FSDP): the oracle. This file is also the worker script:

    python tests/test_distributed.py MODEL_DIR OUT.pt
    torchrun --nproc-per-node 2 tests/test_distributed.py MODEL_DIR OUT.pt
"""

from __future__ import annotations

import os
import subprocess
import sys
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
    from fastgrpo.distributed import all_reduce_sum, packed_hidden_states, world
    from fastgrpo.packing import completion_rows, pack, plan_micro_batches
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


def main(model_dir: str, out_path: str):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist
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
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# The test


def _run(args: list[str], tmp_path: Path, name: str) -> dict:
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *args, __file__, str(tmp_path / "model"), str(out)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out)


def test_one_and_two_ranks_give_the_same_loss_and_weights(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from safetensors.torch import load_file

    from fastgrpo.tiny import build_tiny_model

    build_tiny_model(tmp_path / "model", hidden=64, intermediate=128, layers=2)
    single = _run([], tmp_path, "single")
    # --standalone: torchrun picks a free local port itself (choosing one here and passing it on races with
    # anything else that starts listening in between)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    sharded = _run(torchrun, tmp_path, "sharded")
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


if __name__ == "__main__":
    main(*sys.argv[1:])
