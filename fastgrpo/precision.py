"""Mixed precision: weights, gradients and optimizer state in `model.param_dtype`, compute in `model.dtype`.

bf16 weights cannot take the small steps RL fine-tuning makes. A weight of 0.02 has bf16 neighbours 1.2e-4
apart, so an AdamW update of lr 1e-6 rounds back to the same weight: trained in bf16 at that rate, most weights
never move (tests/test_precision.py measures it). The default therefore keeps the trainable weights in fp32 and
runs the matmuls in `model.dtype`:

    model: {dtype: bfloat16}                          bf16 compute, fp32 weights / gradients / AdamW state
    model: {dtype: bfloat16, param_dtype: bfloat16}   everything bf16: half the memory, small updates lost
    model: {dtype: float32}                           everything fp32 (the default; what CPU runs use)

Under FSDP the cast is FSDP's (`distributed.shard_model`'s MixedPrecisionPolicy); in a single process it is
torch.autocast (`autocast`), which the fused-linear ops of fastgrpo_kernels follow. Frozen models (the reference,
a reward model that only scores) are loaded in `model.dtype`: nothing updates them. vLLM samples in
`model.dtype` from weights of its own, into which each step casts the trainer's (generation.sync=auto picks copy):
fp32 storage cannot be shared with a bf16 engine.
"""

from __future__ import annotations

import torch

from .config import ModelConfig, check_precision
from .distributed import load_sharded, world

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def weights_dtype(cfg: ModelConfig, trainable: bool) -> torch.dtype:
    """What a model's weights are stored in: param_dtype (trainable) or dtype (frozen)."""
    check_precision(cfg)
    return DTYPES[cfg.param_dtype if trainable else cfg.dtype]


def load_pretrained(auto_class, path, cfg: ModelConfig, trainable: bool, dtype: torch.dtype | str | None = None,
                    **kwargs):
    """`auto_class.from_pretrained` in `weights_dtype` (or `dtype`; "auto": the checkpoint's own, which
    memory-maps safetensors instead of copying them)."""
    dtype = dtype or weights_dtype(cfg, trainable)
    return auto_class.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs)


def load_causal_lm(cfg: ModelConfig, trainable: bool, device: torch.device) -> torch.nn.Module:
    """The *ForCausalLM at cfg.path, sharded over the ranks, on `device`: trainable (train mode, gradient
    checkpointing as configured) or frozen (eval mode, no gradients)."""
    from transformers import AutoModelForCausalLM

    def load(dtype):
        model = load_pretrained(AutoModelForCausalLM, cfg.path, cfg, trainable, dtype=dtype)
        if not trainable:
            return model.eval().requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model.train()

    return load_sharded(load, device, weights_dtype(cfg, trainable), DTYPES[cfg.dtype])


def autocast(cfg: ModelConfig, device: torch.device) -> torch.autocast:
    """torch.autocast to model.dtype when the weights are wider and no FSDP casts them; otherwise disabled."""
    enabled = cfg.dtype != cfg.param_dtype and world()[1] == 1
    return torch.autocast(device.type, dtype=DTYPES[cfg.dtype], enabled=enabled)
