"""Mixed precision (fastgrpo/precision.py): fp32 weights that bf16 compute updates, and why the default is that."""

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.config import ConfigError, GRPOConfig, load_config
from fastgrpo.generation import SamplingConfig
from fastgrpo.grpo import train
from fastgrpo.tiny import build_tiny_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2")


def sevens(completions, **kwargs):
    return [c.count("7") / max(len(c), 1) for c in completions]


def make_cfg(model_path, run_dir, *overrides):
    return load_config(GRPOConfig, None, [
        f"model.path={model_path}", f"log.run_dir={run_dir}", "log.tensorboard=false", "model.dtype=bfloat16",
        "data.num_examples=64", "data.max_prompt_length=32", "generation.backend=hf",
        "generation.num_generations=4", "generation.max_completion_length=12", "train.prompts_per_step=4",
        "train.steps=1", "train.lr=1e-6", "train.weight_decay=0", "train.micro_batch_tokens=256", "loss.beta=0.04",
        *overrides,
    ])


def changed_fraction(run_dir, model_path) -> tuple[float, set]:
    """Share of the base model's weights that one step changed, and the dtypes the checkpoint holds."""
    trained = load_file(run_dir / "checkpoints" / "step-00000001" / "model.safetensors")
    base = load_file(model_path / "model.safetensors")
    changed = total = 0
    for name, w in trained.items():
        changed += int((w.float() != base[name].to(w.dtype).float()).sum())
        total += w.numel()
    return changed / total, {w.dtype for w in trained.values()}


def test_fp32_weights_keep_the_updates_that_bf16_weights_round_away(model_path, tmp_path):
    """One GRPO step at lr 1e-6 with bf16 compute. AdamW's first step moves every weight with a gradient by ~lr:
    fp32 weights take it; bf16 weights (neighbours ~1e-4 apart at 0.02) round almost all of it away."""
    (mixed,) = train(make_cfg(model_path, tmp_path / "mixed"), reward_funcs=[sevens])
    (pure,) = train(make_cfg(model_path, tmp_path / "pure", "model.param_dtype=bfloat16"), reward_funcs=[sevens])
    assert mixed["bad_updates"] == pure["bad_updates"] == 0 and mixed["advantage/abs_mean"] > 0
    moved_mixed, dtypes_mixed = changed_fraction(tmp_path / "mixed", model_path)
    moved_pure, dtypes_pure = changed_fraction(tmp_path / "pure", model_path)
    assert dtypes_mixed == {torch.float32} and dtypes_pure == {torch.bfloat16}
    assert moved_mixed > 0.5 and moved_pure < 0.05, (moved_mixed, moved_pure)


def test_weights_narrower_than_compute_are_a_config_error(model_path, tmp_path):
    with pytest.raises(ConfigError, match="model.param_dtype=bfloat16 is narrower than model.dtype=float32"):
        make_cfg(model_path, tmp_path, "model.dtype=float32", "model.param_dtype=bfloat16")


@pytest.mark.parametrize("sync", ["auto", "reload"])
def test_vllm_samples_in_bf16_from_fp32_weights(model_path, sync):
    """Mixed precision with vLLM: fp32 storage cannot be shared, so vLLM holds bf16 weights of its own (auto:
    copy, which casts the trainer's into them in place), and after a sync it samples from the trainer's updated
    weights, to bf16 precision."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from fastgrpo.generation import VLLMGenerator
    from fastgrpo_kernels import fused_linear_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    gen = VLLMGenerator(model_path, model, sync=sync, dtype="bfloat16", max_model_len=128, kv_cache_gib=0.25)
    assert gen.sync == ("copy" if sync == "auto" else sync)
    def update():  # large enough to change what is sampled
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)

    update()
    prompts = [[1, 10, 11, 12], [1, 20, 21]]
    sampling = SamplingConfig(n=2, temperature=0.8, max_tokens=12, seed=0)

    def error(outputs):
        worst = 0.0
        for prompt, completions in zip(prompts, outputs):
            for c in completions:
                ids = torch.tensor([prompt + c.token_ids])
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    hidden = model.model(ids).last_hidden_state[0, len(prompt) - 1: -1]
                    logp = fused_linear_logprobs(hidden, model.lm_head.weight, torch.tensor(c.token_ids), 0.8)
                worst = max(worst, (logp - torch.tensor(c.logprobs)).abs().max().item())
        return worst

    stale = error(gen.generate(prompts, sampling))
    gen.sleep()  # as the trainer does: on CPU the packed copies are freed, and rebuilt by the sync
    assert gen.sync_weights() > 0
    synced = error(gen.generate(prompts, sampling))
    assert synced < 0.1 < stale, (synced, stale)
    # On CPU, woken without a sync, it rebuilds its packed copies from the trainer's current weights, as a sync would.
    # Only where oneDNN packed them: on CPUs without AVX-512 bf16 vLLM computes every bf16 layer from its plain weight
    # (which the copy keeps, instead of emptying it as it once did: "mat2 must be a matrix" at the first generate).
    if gen.repack:
        update()
        gen.sleep()
        assert error(gen.generate(prompts, sampling)) < 0.1


def test_sft_in_mixed_precision(model_path, tmp_path):
    """SFT with bf16 compute: the loss is the fp32 run's to bf16 precision, and the fp32 weights take lr-1e-6 steps."""
    from fastgrpo.sft import SFTConfig
    from fastgrpo.sft import train as sft_train

    def run(name, *overrides):
        cfg = load_config(SFTConfig, None, [
            f"model.path={model_path}", f"log.run_dir={tmp_path / name}", "log.tensorboard=false",
            "data.num_examples=64", "data.max_length=64", "train.sequences_per_step=8", "train.steps=1",
            "train.micro_batch_tokens=128", "train.lr=1e-6", "train.weight_decay=0", *overrides])
        (step,) = sft_train(cfg)
        return step["loss"], changed_fraction(tmp_path / name, model_path)

    loss32, _ = run("fp32")
    loss16, (moved, dtypes) = run("mixed", "model.dtype=bfloat16")
    assert loss16 == pytest.approx(loss32, rel=2e-2) and loss16 != loss32
    assert dtypes == {torch.float32} and moved > 0.5, moved


def test_evaluation_samples_an_fp32_checkpoint_in_bf16(model_path):
    """A mixed-precision run's checkpoints hold fp32 weights; evaluation and rejection sampling take a vLLM dtype."""
    pytest.importorskip("vllm")
    from fastgrpo import vllm_bridge
    from fastgrpo.evaluate import EvalConfig, make_sampler_llm
    from fastgrpo.rejection import RejectionConfig

    with pytest.raises(ConfigError, match="dtype='fp16' is not one of"):
        load_config(RejectionConfig, None, [f"model={model_path}", "dtype=fp16"])
    cfg = load_config(EvalConfig, None, [f"model={model_path}", "dtype=bfloat16", "kv_cache_gib=0.05"])
    generator, _ = make_sampler_llm(cfg)
    assert {p.dtype for p in vllm_bridge.engine_model(generator.llm).parameters()} == {torch.bfloat16}
