"""Checkpoints: the model in Hugging Face format plus everything needed to resume training exactly.

    run_dir/checkpoints/
        latest                  # one line: the name of the newest complete checkpoint, e.g. "step-00000200"
        step-00000100/          # config.json, model.safetensors, tokenizer files: transformers and vLLM load it as is
            trainer/            # what only resuming reads: state.json and tensors.safetensors (optimizer, scheduler,
        step-00000200/              the caller's state, RNG states); under torchrun also sharded/ (optimizer slices)
        .tmp-step-00000300/     # a save in progress (or one that crashed): never read, removed by the next save

Trust model: loading a checkpoint, also one someone sent you, runs no code, because nothing in it is pickled.
load_checkpoint reads JSON (trainer/state.json, with json.loads) and safetensors files (a JSON header and raw tensor
bytes, parsed by the safetensors library: model.safetensors, trainer/tensors.safetensors, trainer/sharded/*); the
caller's AutoTokenizer reads the tokenizer files. state.json holds the plain values (the optimizer's param_groups, the
scheduler's state, the caller's `state`, the Python and NumPy RNG states); each tensor among them (optimizer moments
and step counts, the torch and CUDA RNG states) is stored in tensors.safetensors under its path, e.g.
"optimizer['state'][0]['exp_avg']", and referenced from the JSON by it. JSON has no tuples, non-string keys (an
optimizer's state is keyed by parameter position) or tensors: such values are one-key objects tagged __tuple__,
__items__, __tensor__, so a state loads back with its types. The decoder (_decode) can build only dicts, lists,
tuples, strings, numbers, booleans, None and those tensors. Why not torch.load(weights_only=True), the format before
(trainer_state.pt): it is a restricted unpickler, still pickle's machinery run on a received file, and it has had
code-execution holes of its own (CVE-2025-32434, torch < 2.6; CVE-2026-24747, torch < 2.10). A checkpoint that
holds a pickle (trainer_state.pt, or sharded/.metadata, which torch.distributed.checkpoint's default FileSystemReader
unpickles) is refused with one line naming the file, before anything is read; one you trust (your own run's) is
rewritten in this format, in place, by `python -m fastgrpo.checkpoint upgrade CHECKPOINT`, which does unpickle.
vLLM loads every top-level *.safetensors file as weights: hence the trainer/ directory. Outside this module,
from_pretrained(step directory) runs code from the folder only under trust_remote_code, and would fall back to
torch.load(weights_only=True) on a pytorch_model.bin if a received folder held one instead of model.safetensors.

Under torchrun (several ranks, FSDP2) the optimizer state is saved sharded: each rank writes its slices of the
optimizer tensors to trainer/sharded/ with torch.distributed.checkpoint (DCP) and its HuggingFaceStorageWriter, one
safetensors file per rank whose header records each slice's offsets; HuggingFaceStorageReader reassembles and
reshards them for any loading world size (one process included) from those headers alone, never reading DCP's
pickled .metadata. The model weights always come from the consolidated model.safetensors (rank 0 writes it from the
gathered tensors; each rank copies its own slice as it loads), and a single-process checkpoint's optimizer state is
sharded as it loads. Every rank must see the checkpoint directory (several nodes: a shared filesystem).

A LoRA run (fastgrpo/lora.py) saves its adapter in peft's format in place of the model weights (adapter_config.json,
adapter_model.safetensors: `PeftModel.from_pretrained(base, step_dir)` loads it) and the adapters' optimizer state;
`python -m fastgrpo.lora merge STEP_DIR OUT` writes the base with the adapter merged, a Hugging Face folder.

A checkpoint directory only ever appears whole: it is written under a temporary name, fsynced, and renamed into place
(a rename within one filesystem is atomic), and only then does `latest` move. So a crash at any point leaves the
previous checkpoint and pointer intact, and any `step-*` directory is complete; a failed write (a full disk) removes
the temporary directory and raises one CheckpointError naming the checkpoint. A missing, empty, garbled or dangling
`latest` falls back to the highest step.

Every rank calls save_checkpoint and load_checkpoint (under torchrun they are collectives); rank 0 alone writes the
files outside trainer/sharded/.

    path = save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, state={"step": step}, keep_last=3)
    state = load_checkpoint(latest_checkpoint(run_dir), model, optimizer, scheduler)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor
# DTensor's own helper (DCP uses it too): which slice of the full tensor this rank holds
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .distributed import world
from .lora import adapter_state, is_lora

FORMAT = 2  # trainer/state.json's "format"; 1 was trainer_state.pt (pickle)
TRAINER = "trainer"  # the checkpoint's subdirectory of what only resuming reads
TRAINER_STATE = f"{TRAINER}/state.json"
TRAINER_TENSORS = f"{TRAINER}/tensors.safetensors"
SHARDED = f"{TRAINER}/sharded"  # written by several ranks: their optimizer slices (DCP, safetensors)
OLD_STATE, OLD_SHARDED = "trainer_state.pt", "sharded"  # format 1: pickles, refused unread (upgrade converts)
PICKLED = (OLD_STATE, f"{OLD_SHARDED}/.metadata")
LATEST = "latest"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"step-(\d+)")
# JSON has no tuples, no non-string keys and no tensors: such values are one-key objects tagged with these.
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"
PLAIN = (str, int, float, bool, type(None))


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or does not match what it is loaded into; or a save that
    failed (the previous checkpoint is kept)."""


def save_checkpoint(run_dir, step: int, model, tokenizer, optimizer=None, scheduler=None, state: dict | None = None,
                    keep_last: int | None = None) -> Path:
    """Write run_dir/checkpoints/step-{step:08d}/ atomically, point `latest` at it, keep the newest `keep_last`.

    `state` is the caller's own resume data (step, data position, metrics history...): dicts, lists, tuples, str,
    int, float, bool, None and tensors; anything else is refused here, before a file is written. Returns the
    checkpoint's path.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
    tensors = {}
    trainer_state = {"format": FORMAT, "state": _encode(dict(state or {}), tensors, "state"),
                     "scheduler": None if scheduler is None else _encode(scheduler.state_dict(), tensors, "scheduler"),
                     "rng": _encode(_get_rng_state(), tensors, "rng"), "optimizer": None}
    rank, world_size = world()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / (TMP_PREFIX + final.name)
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            # Leftovers of a save that crashed; removing them first also frees the disk space a retry may need.
            for stale in root.glob(TMP_PREFIX + "*"):
                shutil.rmtree(stale)
            (tmp / TRAINER).mkdir(parents=True)  # the sharded save writes into it
        if world_size == 1:
            model.save_pretrained(tmp)
            if optimizer is not None:
                trainer_state["optimizer"] = {"sharded": False,
                                              "state_dict": _encode(optimizer.state_dict(), tensors, "optimizer")}
        else:
            dist.barrier()  # tmp exists before any rank writes its shards into it
            trainer_state["optimizer"] = _save_sharded(tmp, model, optimizer, tensors)
        if rank == 0:
            tokenizer.save_pretrained(tmp)
            _write_trainer_state(tmp, trainer_state, tensors)
            _publish(root, tmp, final, keep_last)
    except (OSError, SafetensorError, CheckpointException) as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # no partial step; frees what it held
        cause = _cause(e)
        where = f" ({cause.filename})" if getattr(cause, "filename", None) else ""
        raise CheckpointError(f"could not write checkpoint {final}: {_first_line(cause)}{where}; "
                              f"{root / LATEST} and the checkpoints before it are unchanged") from e
    if world_size > 1:
        dist.barrier()  # no rank goes on (and may read `latest`) before the checkpoint is in place
    return final


def _save_sharded(tmp: Path, model, optimizer, tensors: dict) -> dict | None:
    """Every rank: its optimizer slices into tmp/trainer/sharded (DCP, safetensors); rank 0: the consolidated HF
    weights. Returns the optimizer's non-tensor part, encoded (its tensors go to `tensors`), for state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    encoded = None
    if optimizer is not None:
        flat, rest = _split_optimizer_state(get_optimizer_state_dict(model, optimizer))
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(tmp / SHARDED, save_distributed=True))
        encoded = {"sharded": True, "state_dict": _encode(rest, tensors, "optimizer")}
    # Gathered into rank 0's CPU memory (the other ranks get nothing): one full copy of the weights, once per save.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        model.save_pretrained(tmp, state_dict=full)
    return encoded


def _write_trainer_state(path: Path, trainer_state: dict, tensors: dict) -> None:
    save_file(_unshared(tensors), path / TRAINER_TENSORS)
    (path / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")


def _unshared(tensors: dict) -> dict:
    """`tensors` with each one that shares memory with an earlier one copied: safetensors refuses shared memory, and
    bitsandbytes' 8-bit optimizers hold one quantization map (qmap1, qmap2) for all parameters."""
    seen, out = set(), {}
    for name, t in tensors.items():
        address = t.untyped_storage().data_ptr()
        out[name] = t.clone() if address in seen else t
        seen.add(address)
    return out


def _split_optimizer_state(optimizer_state: dict) -> tuple[dict, dict]:
    """A name-keyed optimizer state dict as ({"name/key": tensor} for DCP, everything else: param_groups and any
    non-tensor per-parameter values)."""
    flat = {f"{name}/{key}": value for name, values in optimizer_state["state"].items()
            for key, value in values.items() if isinstance(value, torch.Tensor)}
    rest = {"param_groups": optimizer_state["param_groups"],
            "state": {name: {key: value for key, value in values.items() if not isinstance(value, torch.Tensor)}
                      for name, values in optimizer_state["state"].items()}}
    return flat, rest


def _publish(root: Path, tmp: Path, final: Path, keep_last: int | None) -> None:
    """Flush tmp, rename it to final, point `latest` at it, prune to keep_last (one process: rank 0)."""
    for file in tmp.rglob("*"):
        if file.is_file():
            fsync(file)
    fsync(tmp)

    _rename_dir(tmp, final)
    pointer_tmp = root / (TMP_PREFIX + LATEST)
    pointer_tmp.write_text(final.name + "\n")
    fsync(pointer_tmp)
    os.replace(pointer_tmp, root / LATEST)
    fsync(root)

    if keep_last is not None:
        # The new checkpoint always stays, even when older runs of this directory left higher step numbers.
        others = [d for d in _step_dirs(root) if d != final]
        for old in others[:max(len(others) - (keep_last - 1), 0)]:
            _remove_dir(old)


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint `latest` names; the highest step if the pointer is missing, empty, garbled or dangling; None
    if there is no checkpoint."""
    root = Path(run_dir) / "checkpoints"
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if STEP_DIR.fullmatch(name) and (root / name).is_dir():
        return root / name
    # A crash between renaming a checkpoint in and writing the pointer, or while replacing a re-saved step.
    steps = _step_dirs(root)
    return steps[-1] if steps else None


def load_checkpoint(path, model=None, optimizer=None, scheduler=None) -> dict:
    """Restore what was saved into the given objects (model weights in place) and the RNG states; return `state`.

    Any checkpoint loads on any number of ranks, into a plain or an FSDP2-sharded model (the optimizer together with
    its model). Nothing is unpickled (see the module docstring). To build a fresh model instead, use
    AutoModelForCausalLM.from_pretrained(path).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    saved = _read_trainer_state(path)

    # Check before changing anything, so that a refused load leaves the caller's objects as they were.
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and saved[name] is None:
            raise CheckpointError(f"checkpoint {path} has no {name} state (it was saved without a {name})")
    sharded = optimizer is not None and saved["optimizer"]["sharded"]
    if optimizer is not None and model is None and (sharded or world()[1] > 1):
        raise CheckpointError(f"checkpoint {path}: the optimizer state loads by parameter name; pass the model too")
    if model is not None:
        load_model_weights_(model, path)
    if sharded:
        _load_sharded_optimizer(path, model, optimizer, saved["optimizer"]["state_dict"])
    elif optimizer is not None and world()[1] == 1:
        optimizer.load_state_dict(saved["optimizer"]["state_dict"])
    elif optimizer is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # Saved by one process: keyed by position in model.parameters(); every rank takes its shards of it.
        set_optimizer_state_dict(model, optimizer, _by_name(saved["optimizer"]["state_dict"], model),
                                 options=StateDictOptions(full_state_dict=True))
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"])
    return saved["state"]


def _read_trainer_state(path: Path) -> dict:
    """trainer/state.json with its tensors put back; the old pickled format is refused unread."""
    for name in PICKLED:
        if (path / name).exists():
            raise CheckpointError(f"{path / name} is a pickle (fastgrpo's checkpoint format before {FORMAT}), not "
                                  "loaded: unpickling a received file can run code. If you trust it (your own run), "
                                  f"convert it: python -m fastgrpo.checkpoint upgrade {path}")
    file = path / TRAINER_STATE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {TRAINER_STATE} is missing")
    try:
        saved = json.loads(file.read_text())
        version = saved.get("format")
    except (ValueError, AttributeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file} is corrupt or not a trainer state: {_first_line(e)}") from e
    if version != FORMAT:
        raise CheckpointError(f"{file} has format {version!r}; this fastgrpo reads format {FORMAT}")
    with _open_safetensors(path / TRAINER_TENSORS) as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    try:
        return {key: _decode(saved[key], tensors) for key in ("state", "optimizer", "scheduler", "rng")}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file} is corrupt: {type(e).__name__} {_first_line(e)}") from e


def _load_sharded_optimizer(path: Path, model, optimizer, rest: dict) -> None:
    """DCP: each rank reads the pieces of its own optimizer slices, whatever the number of ranks that saved them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    files = sorted((path / SHARDED).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {SHARDED}/*.safetensors optimizer slices")
    for file in files:  # a truncated or corrupt shard is named here, not deep inside DCP
        with _open_safetensors(file):
            pass
    # this rank's slices, keyed by name (a fresh optimizer's state is initialized first)
    flat, _ = _split_optimizer_state(get_optimizer_state_dict(model, optimizer))
    try:
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / SHARDED)), no_dist=world()[1] == 1)
    except (CheckpointException, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path / SHARDED} does not match the optimizer: {_first_line(_cause(e))}") from e
    state = {name: dict(values) for name, values in rest["state"].items()}
    for key, tensor in flat.items():
        name, _, item = key.rpartition("/")
        state[name][item] = tensor
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": rest["param_groups"]})


def _by_name(optimizer_state: dict, model) -> dict:
    """A plain optimizer.state_dict() (keyed by parameter position) keyed by parameter name instead."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]  # the optimizer's (LoRA: adapters)
    return {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]}


@torch.no_grad()
def load_model_weights_(model: torch.nn.Module, path) -> None:
    """Copy the safetensors weights in `path` into `model`'s existing tensors; every name and shape must match.

    Tensors are read one at a time, so no second copy of the model is held. Tied weights (an LM head sharing the
    embedding) are saved once under one name and count as loaded under all of theirs. An FSDP2-sharded model's
    ranks each read only their own slice of each tensor from the file. A LoRA (peft) model's checkpoint holds its
    adapter alone (adapter_model.safetensors, peft's names): that is what is loaded, the base stays as loaded.
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path} is incomplete: no *.safetensors weight files")
    # detached views of the parameters and persistent buffers
    targets = adapter_state(model) if is_lora(model) else model.state_dict()
    loaded = set()
    for file in files:
        with _open_safetensors(file) as f:
            for name in f.keys():
                if name not in targets:
                    raise CheckpointError(f"{file}: tensor {name} has no counterpart in the model")
                target, shape = targets[name], tuple(f.get_slice(name).get_shape())
                if shape != tuple(target.shape):
                    raise CheckpointError(f"{file}: tensor {name} has shape {shape}, "
                                          f"the model's has {tuple(target.shape)}")
                if isinstance(target, DTensor):
                    local_shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                                target.placements)
                    rows = tuple(slice(o, o + n) for o, n in zip(offset, local_shape))
                    target.to_local().copy_(f.get_slice(name)[rows])
                else:
                    target.copy_(f.get_tensor(name))
                loaded.add(_address(target))
    missing = [name for name, target in targets.items() if _address(target) not in loaded]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} model tensor(s), first: {missing[0]}")


@contextmanager
def _open_safetensors(file: Path):
    """safe_open, with a missing, truncated or corrupt file named in one line. The library checks at open that the
    header's offsets cover the file exactly, so a truncated file fails here, before any tensor is read."""
    try:
        handle = safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is truncated, corrupt or missing: {_first_line(e)}") from e
    with handle as f:
        yield f


def _address(t: torch.Tensor) -> int:
    return (t.to_local() if isinstance(t, DTensor) else t).data_ptr()


def _step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (every step-N directory: they only appear whole), oldest first."""
    steps = [d for d in root.glob("step-*") if STEP_DIR.fullmatch(d.name) and d.is_dir()]
    return sorted(steps, key=lambda d: int(d.name.removeprefix("step-")))


def _rename_dir(src: Path, dst: Path) -> None:
    """Atomically put `src` at `dst`. A re-saved step replaces the old copy; for the moment between the two
    renames `latest` dangles, which latest_checkpoint() covers by falling back to the highest step."""
    if dst.exists():
        old = dst.with_name(TMP_PREFIX + dst.name + "-replaced")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)
    fsync(dst.parent)


def _remove_dir(path: Path) -> None:
    # Rename first: a crash halfway through rmtree must not leave a partial step-* that looks complete.
    doomed = path.with_name(TMP_PREFIX + path.name + "-deleted")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (so that a rename survives power loss), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(obj, tensors: dict, where: str):
    """obj as JSON values, its tensors moved into `tensors` under their path (e.g. "optimizer['state'][0]['exp_avg']").
    Refuses, naming the path, anything that is not a dict, list, tuple, str, int, float, bool, None or tensor."""
    if isinstance(obj, torch.Tensor):
        tensors[where] = obj.detach().cpu().contiguous()
        return {TENSOR: where}
    if type(obj) in PLAIN:
        return obj
    if type(obj) in (list, tuple):
        items = [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if type(obj) is list else {TUPLE: items}
    if type(obj) is dict:
        if all(type(k) is str for k in obj) and not (len(obj) == 1 and next(iter(obj)) in (TENSOR, TUPLE, ITEMS)):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        return {ITEMS: [[_encode(k, tensors, f"{where}.keys()"), _encode(v, tensors, f"{where}[{k!r}]")]
                        for k, v in obj.items()]}
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}".removeprefix("builtins.")
    raise CheckpointError(f"{where} is a {kind}, which a checkpoint does not store: use dict, list, tuple, str, "
                          "int, float, bool, None or tensors")


def _decode(obj, tensors: dict):
    """The inverse of _encode: builds only dicts, lists, tuples, plain values and the named tensors."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == TENSOR:
            return tensors[value]
        if tag == TUPLE:
            return tuple(_decode(v, tensors) for v in value)
        if tag == ITEMS:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _get_rng_state() -> dict:
    """Every global RNG, as plain values and tensors."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(rng: dict) -> None:
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = rng["numpy"]
    np.random.set_state(("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(rng["torch"])
    # A GPU run's checkpoint may be inspected on a CPU machine: there is no CUDA RNG to restore there.
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _cause(e: BaseException) -> BaseException:
    """The exception itself, or for DCP's CheckpointException the first rank's failure it wraps."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def upgrade_pickled_checkpoint(path) -> Path:
    """Rewrite a checkpoint of format 1 (trainer_state.pt, sharded/) in this format, in place; returns its path.

    This unpickles (torch.load(weights_only=True), and DCP's .metadata with plain pickle): run it only on a checkpoint
    you trust, such as one your own run wrote. One process, whatever number of ranks saved it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageWriter
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not (path / OLD_STATE).is_file():
        raise CheckpointError(f"{path} has no {OLD_STATE}: not a checkpoint of format 1")
    old = torch.load(path / OLD_STATE, map_location="cpu", weights_only=True)
    tmp, tensors = path / (TMP_PREFIX + TRAINER), {}
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / TRAINER).mkdir(parents=True)
    optimizer = old["optimizer"]
    if optimizer == "sharded":
        saved = {}  # rebuilt from .metadata, without a model, by the private calls DCP's dcp_to_torch_save makes
        _load_state_dict(saved, storage_reader=FileSystemReader(path / OLD_SHARDED),
                         planner=_EmptyStateDictLoadPlanner(keys={"optimizer"}), no_dist=True)
        flat, rest = _split_optimizer_state(saved["optimizer"])
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(tmp / SHARDED, save_distributed=True), no_dist=True)
        optimizer = {"sharded": True, "state_dict": _encode(rest, tensors, "optimizer")}
    elif optimizer is not None:
        optimizer = {"sharded": False, "state_dict": _encode(optimizer, tensors, "optimizer")}
    _write_trainer_state(tmp, {"format": FORMAT, "state": _encode(old["state"], tensors, "state"),
                               "scheduler": _encode(old["scheduler"], tensors, "scheduler"),
                               "rng": _encode(old["rng"], tensors, "rng"), "optimizer": optimizer}, tensors)
    for file in tmp.rglob("*"):
        fsync(file)
    # An upgrade that stopped after this rename left trainer/ beside the old files, which are still the source.
    shutil.rmtree(path / TRAINER, ignore_errors=True)
    os.replace(tmp / TRAINER, path / TRAINER)
    tmp.rmdir()
    (path / OLD_STATE).unlink()
    shutil.rmtree(path / OLD_SHARDED, ignore_errors=True)
    fsync(path)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "upgrade":
        print("usage: python -m fastgrpo.checkpoint upgrade CHECKPOINT   (a checkpoint of format 1 that you trust)",
              file=sys.stderr)
        raise SystemExit(2)
    print(f"{upgrade_pickled_checkpoint(argv[1])}: upgraded to format {FORMAT}")


if __name__ == "__main__":
    # This file runs as __main__: the error classes command_line catches are those of the imported module
    from fastgrpo.checkpoint import main as checkpoint_main
    from fastgrpo.runs import command_line

    command_line(checkpoint_main)
