import errno
import json
import os
import pickle
import random
import shlex
import shutil
import traceback

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from transformers import AutoModelForCausalLM

from fastgrpo import checkpoint
from fastgrpo.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_model_weights_,
                                 save_checkpoint)
from fastgrpo.runs import command_line
from fastgrpo.tiny import char_tokenizer, tiny_config


def make_model(seed=0, **config):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(char_tokenizer()), hidden=128, **config))


def train_steps(model, optimizer, scheduler, n=2):
    for _ in range(n):
        ids = torch.randint(0, model.config.vocab_size, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


@pytest.fixture
def trained():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    train_steps(model, optimizer, scheduler)
    return model, optimizer, scheduler


def save(run_dir, step, model, **kwargs):
    return save_checkpoint(run_dir, step, model, char_tokenizer(), **kwargs)


def test_round_trip_restores_weights_optimizer_scheduler_state_and_rng(tmp_path, trained):
    model, optimizer, scheduler = trained
    user_state = {"step": 7, "data_position": 112, "history": [{"reward": 0.5, "nan": float("nan")}],
                  "shape": (2, 3), "by_id": {3: "c", 1: ("a", None)}, "ema": torch.arange(3.0),
                  "lookalike": {"__tensor__": "a key that looks like the codec's tag"}}
    path = save(tmp_path, 7, model, optimizer=optimizer, scheduler=scheduler, state=user_state)
    after_save = (torch.rand(4), random.random(), np.random.rand(3))

    other = make_model(seed=1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    other_sched = torch.optim.lr_scheduler.LambdaLR(other_opt, lambda s: 1 / (1 + s))
    state = load_checkpoint(path, other, other_opt, other_sched)

    assert repr(state) == repr(user_state)  # the same types back: tuples, int keys, NaN, the tensor
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(other_opt.state_dict(), optimizer.state_dict(), rtol=0, atol=0)
    assert other_sched.state_dict() == scheduler.state_dict()
    after_load = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(after_load[0], after_save[0])
    assert after_load[1] == after_save[1]
    np.testing.assert_array_equal(after_load[2], after_save[2])
    # Training continues identically from the restored optimizer and scheduler.
    torch.manual_seed(3)
    train_steps(model, optimizer, scheduler, n=1)
    torch.manual_seed(3)
    train_steps(other, other_opt, other_sched, n=1)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_layout_loads_in_transformers_and_holds_no_pickle(tmp_path, trained):
    model, optimizer, scheduler = trained
    path = save(tmp_path, 1, model, optimizer=optimizer, scheduler=scheduler, state={"step": 1})
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name  # what vLLM's LLM(model=path) reads
    # vLLM loads every top-level *.safetensors file as weights: the optimizer's tensors must not be among them
    assert [p.name for p in path.glob("*.safetensors")] == ["model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    saved = json.loads((path / checkpoint.TRAINER_STATE).read_text())
    assert set(saved) == {"format", "optimizer", "scheduler", "state", "rng"}
    for file in path.rglob("*"):  # the pickle protocol 2+ opcode PROTO, and torch.save's zip archive
        assert not file.is_file() or file.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x04", b"PK"), file


def test_state_a_checkpoint_cannot_store_fails_at_save_time(tmp_path):
    with pytest.raises(CheckpointError, match=r"state\['history'\]\[0\]\['reward'\] is a numpy.float64"):
        save(tmp_path, 1, make_model(), state={"history": [{"reward": np.float64(0.5)}]})
    with pytest.raises(CheckpointError, match=r"state\['seen'\] is a set"):
        save(tmp_path, 1, make_model(), state={"seen": {1, 2}})
    assert latest_checkpoint(tmp_path) is None


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_space_safetensors(*args, **kwargs):  # what safetensors raises when a write hits a full disk
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _no_space_on_a_rank(*args, **kwargs):  # what torch.distributed.checkpoint raises on every rank
    raise CheckpointException("CheckpointException ranks:dict_keys([1])",
                              {1: (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), traceback.StackSummary())})


@pytest.mark.parametrize("target, fail, error", [(os, "fsync", _no_space),
                                                 (checkpoint, "save_file", _no_space_safetensors),
                                                 (checkpoint, "save_file", _no_space_on_a_rank)],
                         ids=["fsync", "tensors", "dcp"])
def test_full_disk_keeps_previous_checkpoint_names_the_path_and_leaves_no_partial_step(tmp_path, monkeypatch,
                                                                                       target, fail, error):
    model = make_model()
    good = save(tmp_path, 1, model, state={"step": 1})
    monkeypatch.setattr(target, fail, error)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 2, model, state={"step": 2})
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message, message
    assert str(tmp_path / "checkpoints" / "step-00000002") in message, message
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) == good
    assert (root / "latest").read_text().strip() == good.name
    assert sorted(p.name for p in root.iterdir()) == ["latest", good.name]  # no partial step, no temporary dir
    assert load_checkpoint(good) == {"step": 1}
    newer = save(tmp_path, 2, model, state={"step": 2})
    assert latest_checkpoint(tmp_path) == newer


class RunsACommand:
    """Pickled, a file that runs `touch marker` when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("planted", ["sharded/.metadata", "trainer_state.pt"])
def test_a_received_pickle_is_refused_unread(tmp_path, trained, planted):
    """A torch.distributed.checkpoint .metadata, or an old trainer_state.pt, in a checkpoint someone sent: the load
    stops with one line naming the file, and the pickle's command never runs."""
    model, optimizer, scheduler = trained
    marker = tmp_path / "pwned"
    payload = pickle.dumps(RunsACommand(marker))
    pickle.loads(payload)  # the payload is live: unpickling it runs the command
    assert marker.exists()
    marker.unlink()

    path = save(tmp_path, 1, model, optimizer=optimizer, scheduler=scheduler, state={"step": 1})
    (path / planted).parent.mkdir(exist_ok=True)
    (path / planted).write_bytes(payload)
    other = make_model(seed=1)
    with pytest.raises(CheckpointError, match=f"{path / planted} is a pickle") as info:
        try:
            load_checkpoint(path, other, torch.optim.AdamW(other.parameters(), lr=1e-3))
        finally:
            assert not marker.exists(), "unpickling the planted file ran its command"
    assert "\n" not in str(info.value)


def _as_format_1(path, model, optimizer, scheduler, sharded):
    """The checkpoint at `path` rewritten as fastgrpo wrote it before format 2: trainer_state.pt, and on several
    ranks sharded/ as torch.distributed.checkpoint's default writer saves it (a pickled .metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    shutil.rmtree(path / checkpoint.TRAINER)
    if sharded:
        dcp.save({"model": get_model_state_dict(model), "optimizer": get_state_dict(model, optimizer)[1]},
                 checkpoint_id=path / "sharded", no_dist=True)
    torch.save({"optimizer": "sharded" if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "state": {"step": 1}, "rng": checkpoint._get_rng_state()}, path / "trainer_state.pt")


@pytest.mark.parametrize("sharded", [False, True], ids=["one-process", "sharded"])
def test_a_trusted_checkpoint_of_format_1_upgrades_in_place(tmp_path, trained, sharded, capsys):
    model, optimizer, scheduler = trained
    path = save(tmp_path, 1, model)
    _as_format_1(path, model, optimizer, scheduler, sharded)
    with pytest.raises(CheckpointError, match=f"python -m fastgrpo.checkpoint upgrade {path}$"):
        load_checkpoint(path)

    capsys.readouterr()  # the save's progress bars
    with pytest.raises(SystemExit) as exit_:  # as `python -m fastgrpo.checkpoint upgrade` ends on bad input
        command_line(lambda: checkpoint.main(["upgrade", str(path.parent)]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {path.parent} has no trainer_state.pt: not a checkpoint of format 1\n"
    checkpoint.main(["upgrade", str(path)])
    assert capsys.readouterr().out == f"{path}: upgraded to format 2\n"
    assert sorted(p.name for p in path.iterdir() if not p.is_file()) == ["trainer"]  # no sharded/, no temporary
    assert not (path / "trainer_state.pt").exists()
    assert (path / checkpoint.SHARDED).is_dir() == sharded
    other = make_model(seed=1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    other_sched = torch.optim.lr_scheduler.LambdaLR(other_opt, lambda s: 1 / (1 + s))
    assert load_checkpoint(path, other, other_opt, other_sched) == {"step": 1}
    torch.testing.assert_close(other_opt.state_dict(), optimizer.state_dict(), rtol=0, atol=0)
    assert other_sched.state_dict() == scheduler.state_dict()


def refuse_unpickling(monkeypatch):
    """Every way into pickle (and torch.load, a restricted unpickler) fails, until monkeypatch.undo()."""
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


def test_loading_unpickles_nothing(tmp_path, trained, monkeypatch):
    model, optimizer, scheduler = trained
    path = save(tmp_path, 1, model, optimizer=optimizer, scheduler=scheduler, state={"step": 1})
    refuse_unpickling(monkeypatch)
    other = make_model(seed=1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    other_sched = torch.optim.lr_scheduler.LambdaLR(other_opt, lambda s: 1 / (1 + s))
    assert load_checkpoint(path, other, other_opt, other_sched) == {"step": 1}
    monkeypatch.undo()
    torch.testing.assert_close(other_opt.state_dict(), optimizer.state_dict(), rtol=0, atol=0)


def test_keep_last_prunes_oldest_after_the_new_one_is_in_place(tmp_path):
    model = make_model()
    for step in (10, 20, 30, 40):
        path = save(tmp_path, step, model, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000030", "step-00000040"]
    assert latest_checkpoint(tmp_path) == path
    # Resumed from an earlier step in the same directory: the new checkpoint survives pruning and is latest.
    path = save(tmp_path, 35, model, keep_last=2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000035", "step-00000040"]
    assert latest_checkpoint(tmp_path) == path


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 5, make_model(), state={"v": 1})
    path = save(tmp_path, 5, make_model(), state={"v": 2})
    assert load_checkpoint(path) == {"v": 2}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step-00000005"]


def test_latest_falls_back_to_highest_step_when_pointer_is_missing_empty_garbled_or_dangling(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model = make_model()
    save(tmp_path, 9, model)
    second = save(tmp_path, 10, model)  # sorts by step number, not by name
    pointer = tmp_path / "checkpoints" / "latest"
    for garbage in (b"step-00000099\n", b"", b"\n", b".", b"..", b"\xff\xfe\x00garbage", b"../../elsewhere"):
        pointer.write_bytes(garbage)
        assert latest_checkpoint(tmp_path) == second, garbage
    pointer.unlink()
    assert latest_checkpoint(tmp_path) == second
    assert load_checkpoint(latest_checkpoint(tmp_path)) == {}


def test_tied_embeddings_load_in_place(tmp_path):
    model = make_model(tie_embeddings=True)
    path = save(tmp_path, 1, model)
    other = make_model(seed=1, tie_embeddings=True)
    load_model_weights_(other, path)
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()


def test_bad_checkpoints_give_one_line_errors_naming_the_path(tmp_path, trained):
    model, optimizer, _ = trained
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'} does not exist"):
        load_checkpoint(tmp_path / "nope")

    path = save(tmp_path, 1, model)
    with pytest.raises(CheckpointError, match="has no optimizer state"):
        load_checkpoint(path, optimizer=optimizer)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.\w+\.weight has shape"):
        load_model_weights_(make_model(intermediate=512), path)
    with pytest.raises(CheckpointError, match="lacks 12 model tensor"):
        load_model_weights_(make_model(layers=3), path)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.\S+ has no counterpart"):
        load_model_weights_(make_model(layers=1), path)

    weights = path / "model.safetensors"
    tensors = path / checkpoint.TRAINER_TENSORS
    for file in (weights, tensors):
        intact = file.read_bytes()
        file.write_bytes(intact[:len(intact) // 2])
        with pytest.raises(CheckpointError, match=f"{file} is truncated") as info:
            load_checkpoint(path, model)
        assert "\n" not in str(info.value)
        file.write_bytes(intact)

    weights.unlink()
    with pytest.raises(CheckpointError, match=f"{path} is incomplete: no \\*.safetensors"):
        load_model_weights_(model, path)
    state_file = path / checkpoint.TRAINER_STATE
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{state_file} is corrupt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    state_file.unlink()
    with pytest.raises(CheckpointError, match=f"{path} is incomplete: trainer/state.json is missing"):
        load_checkpoint(path)


def test_sharded_checkpoint_needs_the_model_to_load_its_optimizer(tmp_path, trained):
    model, optimizer, _ = trained
    path = save(tmp_path, 1, model, optimizer=optimizer)
    state_file = path / checkpoint.TRAINER_STATE
    saved = json.loads(state_file.read_text())
    saved["optimizer"]["sharded"] = True  # what several ranks write (tests/test_distributed.py saves real ones)
    state_file.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="loads by parameter name; pass the model too"):
        load_checkpoint(path, optimizer=optimizer)
