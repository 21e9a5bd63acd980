"""Checkpoints: the model in Hugging Face format plus everything needed to resume training exactly.

    run_dir/checkpoints/
        latest                  # one line: the name of the newest complete checkpoint, e.g. "step-00000200"
        step-00000100/          # config.json, model.safetensors, tokenizer files: transformers and vLLM load it
        step-00000200/              as is; trainer_state.pt: optimizer, scheduler, user state, RNG states
        .tmp-step-00000300/     # a save in progress (or one that crashed): never read, removed by the next save

Under torchrun (several ranks, FSDP2) a checkpoint is also sharded: sharded/ holds the model and optimizer state
as torch.distributed.checkpoint (DCP) writes it, each rank its own shards, and trainer_state.pt names it instead of
holding the optimizer. The Hugging Face files beside it are consolidated from the full tensors (rank 0 writes them),
so transformers and vLLM load any checkpoint alike. Either kind resumes on any number of ranks: DCP reshards
sharded/ to the loading world size (a single process included), and a single-process checkpoint is sharded as it
loads. Every rank must see the checkpoint directory (on several nodes: a shared filesystem).

A checkpoint directory only ever appears whole: it is written under a temporary name, fsynced, and renamed into
place (a rename within one filesystem is atomic), and only then does `latest` move. So a crash at any point leaves
the previous checkpoint and pointer intact, and any `step-*` directory is complete.

Every rank calls save_checkpoint and load_checkpoint (under torchrun they are collectives); rank 0 alone writes
the files outside sharded/. trainer_state.pt loads with torch.load(weights_only=True).

    path = save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, state={"step": step}, keep_last=3)
    state = load_checkpoint(latest_checkpoint(run_dir), model, optimizer, scheduler)
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.tensor import DTensor, distribute_tensor

from .distributed import world

TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
SHARDED = "sharded"  # the DCP directory of a checkpoint written by several ranks


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not match the model it is loaded into."""


def save_checkpoint(run_dir, step: int, model, tokenizer, optimizer=None, scheduler=None, state: dict | None = None,
                    keep_last: int | None = None) -> Path:
    """Write run_dir/checkpoints/step-{step:08d}/ atomically, point `latest` at it, keep the newest `keep_last`.

    `state` is the caller's own resume data (step, data position, metrics history...): plain Python types and
    tensors, so that it loads under weights_only. Returns the checkpoint's path.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
    state = dict(state or {})
    _check_weights_only_loadable(state)
    rank, world_size = world()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / (TMP_PREFIX + final.name)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of a save that crashed; removing them first also frees the disk space a retry may need.
        for stale in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale)
        tmp.mkdir()
    if world_size == 1:
        model.save_pretrained(tmp)
        optimizer_state = optimizer.state_dict() if optimizer is not None else None
    else:
        dist.barrier()  # tmp exists before any rank writes its shards into it
        _save_sharded(tmp, model, optimizer)
        optimizer_state = SHARDED if optimizer is not None else None
    if rank == 0:
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "state": state,
                    "rng": _get_rng_state()}, tmp / TRAINER_STATE)
        _publish(root, tmp, final, keep_last)
    if world_size > 1:
        dist.barrier()  # no rank goes on (and may read `latest`) before the checkpoint is in place
    return final


def _save_sharded(tmp: Path, model, optimizer) -> None:
    """Every rank: its model and optimizer shards into tmp/sharded (DCP); rank 0: the consolidated HF weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    if optimizer is not None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / SHARDED)
    else:
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=tmp / SHARDED)
    # Gathered into rank 0's CPU memory (the other ranks get nothing): one full copy of the weights, once per save.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        model.save_pretrained(tmp, state_dict=full)


def _publish(root: Path, tmp: Path, final: Path, keep_last: int | None) -> None:
    """Flush tmp, rename it to final, point `latest` at it, prune to keep_last (one process: rank 0)."""
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync(file)
    _fsync(tmp)

    _rename_dir(tmp, final)
    pointer_tmp = root / (TMP_PREFIX + LATEST)
    pointer_tmp.write_text(final.name + "\n")
    _fsync(pointer_tmp)
    os.replace(pointer_tmp, root / LATEST)
    _fsync(root)

    if keep_last is not None:
        # The new checkpoint always stays, even when older runs of this directory left higher step numbers.
        others = [d for d in _step_dirs(root) if d != final]
        for old in others[:max(len(others) - (keep_last - 1), 0)]:
            _remove_dir(old)


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint `latest` names; the highest step if the pointer is missing or dangling; None if none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if target.is_dir():
            return target
    # A crash between renaming a checkpoint in and writing the pointer, or while replacing a re-saved step.
    steps = _step_dirs(root)
    return steps[-1] if steps else None


def load_checkpoint(path, model=None, optimizer=None, scheduler=None) -> dict:
    """Restore what was saved into the given objects (model weights in place) and the RNG states; return `state`.

    Any checkpoint loads on any number of ranks, into a plain or an FSDP2-sharded model (the optimizer together with
    its model). To build a fresh model instead, use AutoModelForCausalLM.from_pretrained(path).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    file = path / TRAINER_STATE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {TRAINER_STATE} is missing")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{file} is corrupt or not a trainer state: {_first_line(e)}") from e

    # Check before changing anything, so that a refused load leaves the caller's objects as they were.
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and saved[name] is None:
            raise CheckpointError(f"checkpoint {path} has no {name} state (it was saved without a {name})")
    sharded = (path / SHARDED).is_dir()
    if optimizer is not None and model is None and (sharded or world()[1] > 1):
        raise CheckpointError(f"checkpoint {path}: the optimizer state loads by parameter name; pass the model too")
    if sharded and model is not None:
        _load_sharded(path, model, optimizer)
    else:
        if model is not None:
            load_model_weights_(model, path)
        if optimizer is not None and world()[1] == 1:
            optimizer.load_state_dict(saved["optimizer"])
        elif optimizer is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            # Saved by one process: keyed by position in model.parameters(); every rank takes its shards of it.
            set_optimizer_state_dict(model, optimizer, _by_name(saved["optimizer"], model),
                                     options=StateDictOptions(full_state_dict=True))
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"])
    return saved["state"]


def _load_sharded(path: Path, model, optimizer) -> None:
    """DCP: each rank reads the pieces of its own shards, whatever the number of ranks that saved them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    if optimizer is None:
        states = {"model": get_model_state_dict(model)}
        dcp.load(states, checkpoint_id=path / SHARDED)
        set_model_state_dict(model, states["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    states = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(states, checkpoint_id=path / SHARDED)
    set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])


def _by_name(optimizer_state: dict, model) -> dict:
    """A plain optimizer.state_dict() (keyed by parameter position) keyed by parameter name instead."""
    names = [name for name, _ in model.named_parameters()]
    return {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]}


@torch.no_grad()
def load_model_weights_(model: torch.nn.Module, path) -> None:
    """Copy the safetensors weights in `path` into `model`'s existing tensors; every name and shape must match.

    Tensors are read one at a time, so no second copy of the model is held. Tied weights (an LM head sharing the
    embedding) are saved once under one name and count as loaded under all of theirs. An FSDP2-sharded model takes
    its own shard of each tensor (every rank reads the file).
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path} is incomplete: no *.safetensors weight files")
    targets = model.state_dict()  # detached views of the parameters and persistent buffers
    loaded = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name not in targets:
                    raise CheckpointError(f"{file}: tensor {name} has no counterpart in the model")
                tensor, target = f.get_tensor(name), targets[name]
                if tensor.shape != target.shape:
                    raise CheckpointError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, "
                                          f"the model's has {tuple(target.shape)}")
                if isinstance(target, DTensor):  # src_data_rank=None: slice locally, no communication
                    tensor = distribute_tensor(tensor.to(target.device), target.device_mesh, target.placements,
                                               src_data_rank=None)
                target.copy_(tensor)
                loaded.add(_address(target))
    missing = [name for name, target in targets.items() if _address(target) not in loaded]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} model tensor(s), first: {missing[0]}")


def _address(t: torch.Tensor) -> int:
    return (t.to_local() if isinstance(t, DTensor) else t).data_ptr()


def _step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (zero-padded names sort by step)."""
    return sorted(d for d in root.glob("step-*") if d.is_dir())


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
    _fsync(dst.parent)


def _remove_dir(path: Path) -> None:
    # Rename first: a crash halfway through rmtree must not leave a partial step-* that looks complete.
    doomed = path.with_name(TMP_PREFIX + path.name + "-deleted")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (so that a rename survives power loss), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_weights_only_loadable(state: dict) -> None:
    # Fail at save time, not at resume time hours later: a numpy scalar in the metrics history is the usual culprit.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(f"state holds {found.group(1) if found else 'an object'}, which torch.load("
                              "weights_only=True) refuses: store plain Python types and tensors") from e


def _get_rng_state() -> dict:
    """Every global RNG, as plain lists, ints and tensors (what weights_only loading accepts)."""
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


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
