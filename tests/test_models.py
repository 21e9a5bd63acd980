"""Loading a model folder someone sent you reads safetensors only: a folder with nothing but pytorch_model.bin (a
pickle) is refused before anything unpickles it."""


import pytest
import torch

from fastgrpo.config import ModelConfig
from fastgrpo.models import load_model
from fastgrpo.rewards import RewardModelReward
from fastgrpo.tiny import build_tiny_model


@pytest.fixture()
def pickled_only(tmp_path, monkeypatch):
    """A model folder whose weights are pytorch_model.bin only; torch.load made to record any call."""
    folder = build_tiny_model(tmp_path / "tiny")
    model = torch.nn.Linear(1, 1)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load was called"))
    return folder, calls


def test_load_model_reads_no_pickle(pickled_only):
    folder, calls = pickled_only
    with pytest.raises(OSError, match="safetensors"):
        load_model(ModelConfig(path=str(folder)), trainable=True, device=torch.device("cpu"))
    assert calls == []


def test_reward_model_reads_no_pickle(pickled_only):
    folder, calls = pickled_only
    with pytest.raises(OSError, match="safetensors"):
        RewardModelReward(folder)
    assert calls == []
