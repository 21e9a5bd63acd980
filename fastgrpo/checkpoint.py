"""Checkpoints: the model in Hugging Face format plus everything needed to resume training exactly.

    run_dir/checkpoints/
        latest                  # one line: the name of the newest complete checkpoint, e.g. "step-00000200"
        step-00000100/          # config.json, model.safetensors, tokenizer files: transformers and vLLM load it
        step-00000200/              as is; trainer_state.pt: optimizer, scheduler, user state, RNG states
        .tmp-step-00000300/     # a save in progress (or one that crashed): never read, removed by the next save

A checkpoint directory only ever appears whole: it is written under a temporary name, fsynced, and renamed into
place (a rename within one filesystem is atomic), and only then does `latest` move. So a crash at any point leaves
the previous checkpoint and pointer intact, and any `step-*` directory is complete.

One process writes a run's checkpoints (rank 0); trainer_state.pt loads with torch.load(weights_only=True).

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
from safetensors import safe_open

TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
TMP_PREFIX = ".tmp-"


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
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    # Leftovers of a save that crashed; removing them first also frees the disk space a retry may need.
    for stale in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale)

    final = root / f"step-{step:08d}"
    tmp = root / (TMP_PREFIX + final.name)
    tmp.mkdir()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "state": state,
                "rng": _get_rng_state()}, tmp / TRAINER_STATE)
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
    return final


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

    To build a fresh model instead, use AutoModelForCausalLM.from_pretrained(path).
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
    if model is not None:
        load_model_weights_(model, path)
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"])
    return saved["state"]


@torch.no_grad()
def load_model_weights_(model: torch.nn.Module, path) -> None:
    """Copy the safetensors weights in `path` into `model`'s existing tensors; every name and shape must match.

    Tensors are read one at a time, so no second copy of the model is held. Tied weights (an LM head sharing the
    embedding) are saved once under one name and count as loaded under all of theirs.
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
                target.copy_(tensor)
                loaded.add(target.data_ptr())
    missing = [name for name, target in targets.items() if target.data_ptr() not in loaded]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} model tensor(s), first: {missing[0]}")


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
