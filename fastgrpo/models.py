"""Loading the models a run holds: the trainable policy, its frozen reference, the reward model being trained.

    model = load_model(cfg.model, trainable=True, device=device)        # the policy: train mode, fp32 weights
    ref_model = load_model(cfg.model, trainable=False, device=device)   # the reference: eval mode, model.dtype
    reward_model = load_model(cfg.model, trainable=True, device=torch.device("cpu"), num_labels=1,
                              auto_class=AutoModelForSequenceClassification, pad_token_id=tokenizer.pad_token_id)

Each is `from_pretrained` of cfg.path in the dtype fastgrpo/precision.py gives it (`weights_dtype`: param_dtype for
what trains, dtype for what is frozen), made ready to train or frozen, and sharded over the ranks where there are
several (FSDP2, `distributed.shard_model`, computing in model.dtype).

On several ranks every rank loads the checkpoint in its own dtype ("auto"): transformers then memory-maps the
safetensors files rather than copying them, so sharding copies only this rank's slice (the file's pages are shared
by the ranks of a node), and the cast to the weights' dtype comes after sharding, on the slice. Loading in that dtype
would give every rank a full converted copy first: with the usual bf16 checkpoint and fp32 weights, 8 ranks of a 7B
model would hold 8 x 28 GB of host memory (bench/LOAD.md measures it). Buffers keep their dtype (the rotary
frequencies stay fp32).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from .config import ModelConfig
from .distributed import shard_model, world
from .lora import apply_lora, check_quantize, quantization_kwargs
from .precision import DTYPES, weights_dtype


def load_model(cfg: ModelConfig, trainable: bool, device: torch.device, auto_class=AutoModelForCausalLM,
               **kwargs) -> torch.nn.Module:
    """The `auto_class` model at cfg.path, sharded over the ranks, on `device`.

    trainable: weights in model.param_dtype, train mode, gradient checkpointing as configured, and with model.lora
    wrapped by peft (only the adapters require gradients); frozen: weights in model.dtype, eval mode, no gradients.
    kwargs go to from_pretrained (e.g. num_labels=1 for a reward model).
    """
    param_dtype = weights_dtype(cfg, trainable)
    if trainable and cfg.lora is not None:
        check_quantize(cfg.lora, device)
        kwargs.update(quantization_kwargs(cfg, device))  # QLoRA: the base loads in 4 bits
    if world()[1] == 1:
        return _from_pretrained(auto_class, cfg, trainable, param_dtype, **kwargs).to(device)
    model = shard_model(_from_pretrained(auto_class, cfg, trainable, "auto", **kwargs), DTYPES[cfg.dtype], param_dtype)
    # Parameters only: nn.Module._apply hands fn the Parameter objects, and the buffers as plain tensors.
    model._apply(lambda t: t.to(param_dtype) if isinstance(t, torch.nn.Parameter) else t)
    return model.to(device)


def _from_pretrained(auto_class, cfg: ModelConfig, trainable: bool, dtype: torch.dtype | str, **kwargs):
    """auto_class.from_pretrained in `dtype` ("auto": the checkpoint's own), ready to train or frozen."""
    # safetensors only: a received folder holding only pytorch_model.bin would be unpickled (torch.load)
    model = auto_class.from_pretrained(cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                       use_safetensors=True, **kwargs)
    if not trainable:
        return model.eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora is not None:  # the adapters train, the base is frozen (fastgrpo/lora.py)
        model = apply_lora(model, cfg.lora)
    return model.train()
