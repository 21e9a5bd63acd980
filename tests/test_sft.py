"""SFT (R1 stages 1 and 3) on a tiny local model: learning, parity with transformers' loss, resume, bad input."""

import json

import pytest
import torch

from fastgrpo.config import load_config
from fastgrpo.sft import SFTConfig, load_examples, sft_step, train
from fastgrpo.tiny import build_tiny_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


def make_cfg(model_path, run_dir, *overrides):
    return load_config(SFTConfig, None, [
        f"model.path={model_path}", f"log.run_dir={run_dir}", "log.tensorboard=false", "data.num_examples=200",
        "data.max_length=64", "train.sequences_per_step=16", "train.micro_batch_tokens=256", "train.lr=3e-3",
        *overrides,
    ])


def test_loss_falls_on_the_builtin_task(model_path, tmp_path):
    history = train(make_cfg(model_path, tmp_path, "train.steps=25"))
    losses = [h["loss"] for h in history]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert history[-1]["packing/padding_fraction"] == 0.0
    assert (tmp_path / "checkpoints" / "step-00000025" / "model.safetensors").exists()


def test_packed_fused_loss_equals_transformers_loss(model_path, tmp_path):
    """One step's loss equals transformers' own cross-entropy over the completion tokens of the padded batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_cfg(model_path, tmp_path, "train.micro_batch_tokens=64")  # several micro-batches
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    sequences, prompt_lengths, _ = load_examples(cfg.data, tokenizer)
    indices = list(range(6))
    width = max(len(sequences[i]) for i in indices)
    ids = torch.zeros(len(indices), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attention = torch.zeros_like(ids)
    for row, i in enumerate(indices):
        seq = torch.tensor(sequences[i])
        ids[row, : len(seq)], attention[row, : len(seq)] = seq, 1
        labels[row, prompt_lengths[i]: len(seq)] = seq[prompt_lengths[i]:]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = sft_step(model, optimizer, sequences, prompt_lengths, indices, cfg)
    assert metrics["packing/num_micro_batches"] > 1
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_resume_reproduces(model_path, tmp_path):
    straight = train(make_cfg(model_path, tmp_path / "a", "train.steps=4", "log.save_every=2"))
    train(make_cfg(model_path, tmp_path / "b", "train.steps=2", "log.save_every=2"))
    resumed = train(make_cfg(model_path, tmp_path / "b", "train.steps=4", "log.save_every=2"))
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight], rel=1e-5)


def test_jsonl_and_bad_input(model_path, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"q": f"{i}+1=", "a": f"{i + 1}</s>"}) + "\n" for i in range(8)))
    cfg = make_cfg(model_path, tmp_path / "run", f"data.source={path}", "data.prompt_column=q",
                   "data.completion_column=a", "train.steps=1")
    assert len(train(cfg)) == 1
    with pytest.raises(ValueError, match="no column 'completion'"):
        train(make_cfg(model_path, tmp_path / "bad", f"data.source={path}", "data.prompt_column=q"))
    with pytest.raises(ValueError, match="fits data.max_length=3"):
        train(make_cfg(model_path, tmp_path / "short", "data.max_length=3"))


def test_a_run_whose_every_step_is_non_finite_fails(model_path, tmp_path, monkeypatch):
    import fastgrpo.sft as sft
    from fastgrpo.runs import RunError

    fused = sft.fused_linear_cross_entropy
    monkeypatch.setattr(sft, "fused_linear_cross_entropy", lambda *a, **k: fused(*a, **k) * float("nan"))
    with pytest.raises(RunError, match="no step of the run .* updated the weights: every step had non-finite"):
        train(make_cfg(model_path, tmp_path, "train.steps=2"))
