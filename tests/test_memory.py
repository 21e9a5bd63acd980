"""Full fine-tuning's memory options are honoured (bench/bench_memory.py measures how much each moves the peak):
gradient checkpointing on the packed path, bitsandbytes' 8-bit AdamW (with exact resume), a bf16 reference."""

import sys

import pytest
import torch

from fastgrpo.config import ConfigError
from fastgrpo.grpo import start_run, train
from fastgrpo.packing import pack, packed_backward, packed_hidden_states
from fastgrpo.tiny import build_tiny_model
from test_grpo import make_cfg as grpo_cfg
from test_grpo import sevens


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    # hidden 128: the embedding and the head (105 x 128) are above bitsandbytes' 4096-element floor for 8-bit state
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


def make_cfg(model_path, run_dir, *overrides):
    return grpo_cfg(model_path, run_dir, "loss.beta=0.04", *overrides)  # a reference model: its dtype is an option


def saved_activation_bytes(model, packed) -> int:
    """Bytes autograd keeps from a packed forward for the backward (the activations), counted as they are saved."""
    saved = []

    def keep(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        hidden = packed_hidden_states(model, packed)
    packed_backward(model, hidden.square().sum())
    return sum(saved)


def test_gradient_checkpointing_keeps_fewer_activations_on_the_packed_path(model_path, tmp_path):
    """model.gradient_checkpointing: the packed forward saves each decoder layer's input only, and the backward
    (which recomputes the layers) gives the same gradients."""
    from fastgrpo.models import load_model

    sequences = [list(range(3, 3 + n)) for n in (40, 25, 33)]
    counted, grads = {}, {}
    for on in (False, True):
        cfg = make_cfg(model_path, tmp_path, f"model.gradient_checkpointing={str(on).lower()}")
        model = load_model(cfg.model, trainable=True, device=torch.device("cpu"))
        counted[on] = saved_activation_bytes(model, pack(sequences, [0, 1, 2], [5, 5, 5]))
        grads[on] = [p.grad for p in model.parameters()]
    assert counted[True] < counted[False] / 2, counted
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_adamw_8bit_keeps_8_bit_state(model_path, tmp_path):
    run, _ = start_run(make_cfg(model_path, tmp_path, "train.optimizer=adamw_8bit"), reward_funcs=[sevens])
    from fastgrpo.grpo import grpo_step

    grpo_step(run, 0)
    head = run.model.get_output_embeddings().weight
    state = run.optimizer.state[head]
    assert type(run.optimizer).__name__ == "AdamW8bit"
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8 and state["state1"].shape == head.shape


def test_adamw_8bit_resume_reproduces_the_uninterrupted_run(model_path, tmp_path):
    optimizer = "train.optimizer=adamw_8bit"
    straight = train(make_cfg(model_path, tmp_path / "a", optimizer, "train.steps=4", "log.save_every=2"),
                     reward_funcs=[sevens])
    train(make_cfg(model_path, tmp_path / "b", optimizer, "train.steps=2", "log.save_every=2"), reward_funcs=[sevens])
    resumed = train(make_cfg(model_path, tmp_path / "b", optimizer, "train.steps=4", "log.save_every=2"),
                    reward_funcs=[sevens])
    assert [h["step"] for h in resumed] == [0, 1, 2, 3]
    for a, b in zip(straight[2:], resumed[2:]):
        for key in ("reward/mean", "loss/kl", "grad_norm", "completion/length_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_adamw_8bit_without_bitsandbytes_is_one_line(model_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(ConfigError, match=r"^train.optimizer=adamw_8bit needs bitsandbytes \(pip install"):
        start_run(make_cfg(model_path, tmp_path, "train.optimizer=adamw_8bit"), reward_funcs=[sevens])


def test_reference_in_bf16_while_training_in_fp32(model_path, tmp_path):
    run, _ = start_run(make_cfg(model_path, tmp_path, "model.reference_dtype=bfloat16"), reward_funcs=[sevens])
    from fastgrpo.grpo import grpo_step

    metrics = grpo_step(run, 0)
    assert {p.dtype for p in run.ref_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    assert metrics["bad_updates"] == 0 and 0 <= metrics["loss/kl"] < 1e-2  # the reference is the policy, rounded


def test_reference_dtype_with_lora_is_refused(model_path, tmp_path):
    with pytest.raises(ConfigError, match="model.reference_dtype=bfloat16 with model.lora"):
        make_cfg(model_path, tmp_path, "model.reference_dtype=bfloat16", "model.lora.r=4")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def test_the_update_starts_on_a_trimmed_heap(model_path, tmp_path, monkeypatch):
    """Freed temporaries of the rollout and the reference pass go back to the OS before the update (whose end holds
    the step's peak), instead of staying in glibc's heap under it."""
    import fastgrpo.grpo as grpo

    score, update, seen = grpo.score, grpo.update, {}

    def score_leaving_a_freed_heap(*args, **kwargs):
        out = score(*args, **kwargs)
        torch.empty(2**22)  # a freed 16 MiB block raises glibc's mmap threshold: what follows comes from the heap
        blocks = [torch.ones(2**20) for _ in range(128)]  # 4 MiB temporaries, every other one freed: 256 MiB of holes
        seen["kept"] = blocks[1::2]
        del blocks
        seen["freed"] = rss_mib()
        return out

    def update_measured(*args, **kwargs):
        seen["update"] = rss_mib()
        return update(*args, **kwargs)

    monkeypatch.setattr(grpo, "score", score_leaving_a_freed_heap)
    monkeypatch.setattr(grpo, "update", update_measured)
    run, _ = start_run(make_cfg(model_path, tmp_path), reward_funcs=[sevens])
    grpo.grpo_step(run, 0)
    assert seen["freed"] - seen["update"] > 200, seen


def test_freed_activations_go_back_before_the_embedding_gradient(model_path, tmp_path, monkeypatch):
    """In the backward, the heap is trimmed after every decoder layer's gradients (its activations then freed) and
    before the input embedding's gradient, the backward's last large allocation."""
    import fastgrpo.grpo as grpo

    run, _ = start_run(make_cfg(model_path, tmp_path), reward_funcs=[sevens])
    embedding, layers = run.model.get_input_embeddings().weight, list(run.model.model.layers.parameters())
    calls = []
    monkeypatch.setattr(grpo, "release_freed_memory", lambda: calls.append(
        (embedding.grad is None, all(p.grad is not None for p in layers))))
    grpo.grpo_step(run, 0)
    assert (True, True) in calls, calls
