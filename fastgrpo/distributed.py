"""Data-parallel training with FSDP2: process group, sharding, global sums, and gathering full weights.

    torchrun --nproc-per-node 8 -m fastgrpo.grpo CONFIG      # docs/SCALING.md: several nodes, what it costs

fastgrpo.grpo and fastgrpo.sft run on any number of ranks with these; tests/test_distributed.py checks that 1 and 2
ranks (torchrun, gloo) give the same losses and weights, and that checkpoints resume across world sizes.

Every rank holds a shard of each parameter (`fully_shard` per decoder layer, then the root for embeddings, final
norm and LM head) and trains on its own share of the step's sequences (`plan_micro_batches(..., num_ranks)[rank]`).
Losses are normalized by *global* counts (completion tokens, sequences) summed over ranks with `all_reduce_sum`,
and gradients are *summed* over ranks (not averaged, FSDP's default): each rank's loss is its share of the global
loss, so the sum of the ranks' gradients is the gradient of the global loss, whatever the number of ranks.

A single process (no torchrun) needs nothing: `init_distributed` and `shard_model` are no-ops, `all_reduce_sum`
returns its input, `all_gather_objects` wraps it in a list and `full_state_dict` yields the plain tensors.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def init_distributed() -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); returns this rank's device.

    nccl on CUDA (one GPU per rank, LOCAL_RANK), gloo on CPU. Without torchrun's environment: a no-op.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device


def end_worker() -> None:
    """End a torchrun worker whose run has finished: leave the process group together, then exit at once.

    Every rank waits for the others (a barrier), destroys the process group, flushes its output and leaves with
    os._exit(0), skipping the interpreter's teardown. Call it last, with every file closed. Why: after
    destroy_process_group, torch 2.13's gloo group is still referenced from C++ (its threads keep running) and is
    only freed in that teardown, where about once in 100 runs on a loaded 2-core machine it aborts the process
    ("terminate called without an active exception", no Python frame left); torchrun then reports a finished run
    as failed.

    A no-op outside torchrun, and where vLLM was imported: its cleanup needs the teardown (its engine destroys
    the process group when collected, and on CPU a C++ destructor unlinks tensor parallelism's shared-memory
    files in /dev/shm, which the next run would otherwise fail to create).
    """
    if "WORLD_SIZE" not in os.environ or "vllm" in sys.modules:
        return
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) in a single process."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard_model(model: torch.nn.Module, dtype: torch.dtype | None = None,
                param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Apply FSDP2 to a transformers *ForCausalLM in place: each decoder layer, then the root. Returns the model.

    dtype: what the forward and backward compute in. Narrower than the parameters (bf16 from fp32 weights, see
    fastgrpo/precision.py), FSDP gathers the weights in it and reduces the gradients in fp32; None, or the
    parameters' own dtype, computes in theirs. param_dtype: what the parameters will hold once cast after sharding
    (`models.load_model`); by default, what they hold now. A no-op on a single rank (an in-process vLLM engine sets up a
    one-rank process group of its own: that is not data parallelism).

    The root (embeddings, final norm, LM head) keeps its parameters gathered from its forward to the end of the
    backward, so `model.get_output_embeddings().weight` is the full head while the fused loss uses it, provided
    the hidden states come from the root's forward (`packing.packed_hidden_states`), not from `model.base_model`.
    """
    if world()[1] == 1:
        return model
    param_dtype = param_dtype or next(model.parameters()).dtype  # what the weights are, or will be once cast
    mixed = dtype is not None and dtype != param_dtype
    mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: the transformers one
    for layer in inner.base_model.layers:  # a LoRA layer's base weights and adapters are sharded together
        fully_shard(layer, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    # FSDP averages gradients over ranks (reduce-scatter with AVG). Our per-rank losses are already shares of the
    # global loss (normalized by global token / sequence counts), so the ranks' gradients must be summed instead.
    # Divide factor 1 says so, rather than multiplying every loss by world size; force_sum makes it a plain SUM
    # reduce-scatter (otherwise a factor is applied as PREMUL_SUM, which NCCL has and gloo does not). The setters
    # act on one FSDP module's own parameter group, hence the loop.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # transformers' generate() reads this flag: it then keeps every rank stepping until all ranks' sequences are done
    # (synced_gpus), since each forward of a sharded model is a collective.
    model._is_fsdp_managed_module = True
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters a no-grad forward left behind. A no-op outside FSDP.

    FSDP2 keeps the root's parameters (embeddings, final norm, LM head) gathered after its forward, for the backward;
    after a forward without one nothing frees them: a reference model would hold a full copy for good, and an
    optimizer step would update the shards under a stale gathered copy.
    """
    if isinstance(model, FSDPModule):
        model.reshard()


def all_reduce_sum(x: float | torch.Tensor) -> float | torch.Tensor:
    """Sum over ranks: a float comes back as a float (summed in fp64), a tensor as a new summed tensor."""
    if world()[1] == 1:
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if isinstance(x, torch.Tensor):
        out = x.detach().to(device, copy=True)
        dist.all_reduce(out)
        return out.to(x.device)
    out = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(out)
    return float(out)


def all_gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] (pickled; for small things such as a rollout's token ids)."""
    if world()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ that returns the global norm as a plain tensor, sharded or not."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP: a replicated DTensor, already global


def full_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every state-dict entry, gathered one at a time (peak: one full tensor extra).

    Every rank must iterate to the end (each gather is a collective); all ranks get the full tensors. For an
    in-place vLLM reload, pass these to `reload_weights`, which buckets them. `dtype` casts each shard before
    gathering: fp32 master weights gathered as bf16 move half the bytes.
    """
    for name, tensor in model.state_dict().items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
