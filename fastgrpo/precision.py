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
a reward model that only scores) are stored in `model.dtype`: nothing updates them (`weights_dtype` says which;
fastgrpo/models.py loads each model in it). vLLM samples in `model.dtype` from weights of its own, into which each
step casts the trainer's (generation.sync=auto picks copy): fp32 storage cannot be shared with a bf16 engine.

Two memory options on top (bench/MEMORY.md measures each at 180M parameters):

    model: {reference_dtype: bfloat16}    the frozen reference in bf16 (weights and its forward) while training fp32
    train: {optimizer: adamw_8bit}        bitsandbytes' AdamW8bit: both moments in 8 bits, block-wise scaled

Both store less; neither lowers a CPU peak by what it saves. An fp32 reference loaded from an fp32 checkpoint is
memory-mapped, so only the embedding rows it looks up are resident, while a bf16 one is a full copy (at 180M: -132
MiB of peak for 343 MiB less stored). bitsandbytes' CPU update (0.50.2) dequantizes a parameter's moments into fp32
temporaries, which at 180M (a 151,936 x 512 embedding and head) raise the optimizer step above the fp32 AdamW peak.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .config import ConfigError, ModelConfig, TrainConfig, check_precision
from .distributed import world

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def weights_dtype(cfg: ModelConfig, trainable: bool) -> torch.dtype:
    """What a model's weights are stored in: param_dtype (trainable) or dtype (frozen)."""
    check_precision(cfg)
    return DTYPES[cfg.param_dtype if trainable else cfg.dtype]


def autocast(cfg: ModelConfig, device: torch.device) -> torch.autocast:
    """torch.autocast to model.dtype when the weights are wider and no FSDP casts them; otherwise disabled."""
    enabled = cfg.dtype != cfg.param_dtype and world()[1] == 1
    return torch.autocast(device.type, dtype=DTYPES[cfg.dtype], enabled=enabled)


def reference_config(cfg: ModelConfig) -> ModelConfig:
    """The model config the frozen reference loads with: model.reference_dtype (None: model.dtype) for its weights
    and its forward. A reference in bf16 under fp32 training costs half the memory; its log-probs enter only the KL
    term, at bf16's precision."""
    if cfg.reference_dtype is None:
        return cfg
    return replace(cfg, dtype=cfg.reference_dtype, param_dtype=cfg.reference_dtype)  # frozen: nothing is wider


def make_optimizer(params: list, train: TrainConfig) -> torch.optim.Optimizer:
    """train.optimizer over `params`: torch's fused AdamW (state in the parameters' dtype), or bitsandbytes'
    AdamW8bit (tensors under 4096 elements keep 32-bit state, as bitsandbytes decides)."""
    if train.optimizer == "adamw_8bit":
        if world()[1] > 1:
            raise ConfigError("train.optimizer=adamw_8bit runs in one process: bitsandbytes' optimizer does not "
                              "update FSDP's sharded parameters")
        try:
            from bitsandbytes.optim import AdamW8bit
        except ImportError:
            raise ConfigError("train.optimizer=adamw_8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return AdamW8bit(params, lr=train.lr, weight_decay=train.weight_decay)
    # fused: one kernel over all parameters, no parameter-sized temporaries (the default foreach path needs ~0.9x
    # the model's size on top, and is 10x slower on CPU: measured on a 180M-parameter model, 1.3 s vs 0.12 s)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=True)
