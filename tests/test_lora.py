"""LoRA through peft (fastgrpo/lora.py): only the adapters train, the reference is the base, vLLM samples with the
adapters over the shared base, checkpoints in peft's format resume exactly; on a tiny local Qwen2."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from test_iterative import sevens  # the share of "7"s: a rule reward a tiny run can move

from fastgrpo.config import ConfigError, GRPOConfig, LoraConfig, ModelConfig, load_config
from fastgrpo.lora import apply_lora, base_parameters, reference_precision
from fastgrpo.models import load_model
from fastgrpo.tiny import build_tiny_model

PROMPTS = [[1, 10, 11, 12, 13], [1, 20, 21], [1, 30]]
TEMPERATURE = 0.8
LORA = LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


def lora_model(model_path, lora=LORA):
    return load_model(ModelConfig(path=model_path, lora=lora), trainable=True, device=torch.device("cpu"))


def base_snapshot(model):
    return {name: p.detach().clone() for name, p in base_parameters(model).items()}


def adapter_step(model, optimizer, seed):
    """One optimizer step on a language-model loss over random tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, model.config.vocab_size, (4, 24), generator=g)
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def adapters(model):
    return [p for p in model.parameters() if p.requires_grad]


def trainer_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def max_logprob_error(model, outputs):
    return max((trainer_logprobs(model, PROMPTS[i], c.token_ids, TEMPERATURE) - torch.tensor(c.logprobs)).abs().max()
               .item() for i, completions in enumerate(outputs) for c in completions)


def test_only_the_adapters_train_and_the_base_stays_bit_identical(model_path):
    model = lora_model(model_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = base_snapshot(model)
    optimizer = torch.optim.AdamW(adapters(model), lr=1e-2)
    adapter_step(model, optimizer, seed=0)
    adapter_step(model, optimizer, seed=1)
    assert all(torch.equal(before[n], p) for n, p in base_parameters(model).items())
    assert set(optimizer.state) == set(adapters(model))  # optimizer state for the adapters alone
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)  # they did change


def test_reference_logprobs_are_the_base_models(model_path):
    model = lora_model(model_path)
    optimizer = torch.optim.AdamW(adapters(model), lr=1e-2)
    adapter_step(model, optimizer, seed=0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = torch.tensor([PROMPTS[0] + [40, 41, 42]])
    with torch.no_grad(), reference_precision(model, None, torch.autocast("cpu", enabled=False)):
        reference = model(input_ids=ids).logits
    with torch.no_grad():
        policy = model(input_ids=ids).logits
        expected = base(input_ids=ids).logits
    assert torch.equal(reference, expected)
    assert not torch.allclose(policy, expected)  # the adapters are on again outside the context


def test_bad_target_module_is_one_line(model_path):
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: \['qkv'\] name no linear layer of qwen2"):
        lora_model(model_path, LoraConfig(target_modules=["q_proj", "qkv"]))


def test_lora_config_from_overrides(model_path):
    cfg = load_config(GRPOConfig, None, [f"model.path={model_path}", "model.lora.r=8"])
    assert cfg.model.lora == LoraConfig(r=8)
    assert load_config(GRPOConfig, None, [f"model.path={model_path}"]).model.lora is None
    with pytest.raises(ConfigError, match="model.lora.rank"):
        load_config(GRPOConfig, None, [f"model.path={model_path}", "model.lora.rank=8"])
    with pytest.raises(ConfigError, match="model.lora.quantize='int3' is not one of"):
        load_config(GRPOConfig, None, [f"model.path={model_path}", "model.lora.quantize=int3"])


def lora_generator(model_path, model, sync):
    """A vLLM generator over `model`; sync "zero_copy_unpacked": vLLM computes from the shared weights themselves (as
    on CUDA), so the adapters are merged into them in place for each rollout."""
    pytest.importorskip("vllm")
    from fastgrpo import vllm_bridge
    from fastgrpo.generation import VLLMGenerator

    if sync != "zero_copy_unpacked":
        return VLLMGenerator(model_path, model, sync=sync, dtype="float32", max_model_len=256, kv_cache_gib=0.0625)
    gen = VLLMGenerator(model_path, None, sync="none", dtype="float32", max_model_len=256, kv_cache_gib=0.0625)
    deltas = vllm_bridge.weight_deltas(model)
    rows = vllm_bridge.AdapterRows(vllm_bridge._weight_plan(gen.llm, model, "share", same_dtype=True), deltas)
    gen.weights = vllm_bridge.ZeroCopy(gen.llm, model, keep_packed=False, adapters=rows)
    return gen


@pytest.mark.parametrize("sync", ["zero_copy", "zero_copy_unpacked", "copy", "reload"])
def test_vllm_samples_with_the_current_adapters(model_path, sync):
    """After optimizer steps on the adapters, vLLM's sampling log-probs are the trainer's forward (adapters on), and
    the trainer's base is bit-identical to what it was: sampling never left the adapters merged into it."""
    from fastgrpo.generation import SamplingConfig

    model = lora_model(model_path)
    gen = lora_generator(model_path, model, sync)
    before = base_snapshot(model)
    optimizer = torch.optim.AdamW(adapters(model), lr=3e-2)
    sampling = SamplingConfig(n=3, temperature=TEMPERATURE, max_tokens=16, seed=0)
    first = gen.generate(PROMPTS, sampling)
    for step in range(2):
        gen.sleep()
        adapter_step(model, optimizer, seed=step)
        gen.sync_weights()
        gen.wake()
        out = gen.generate(PROMPTS, sampling)
        gen.sleep()  # the trainer's forward below runs on the base, as the next training step would
        assert max_logprob_error(model, out) < 1e-4
    assert [c.token_ids for c in out[0]] != [c.token_ids for c in first[0]]  # the adapters really changed sampling
    assert all(torch.equal(before[n], p) for n, p in base_parameters(model).items())


def test_zero_copy_with_lora_keeps_one_copy_of_the_base(model_path):
    """vLLM computes with the trainer's base tensors themselves: every trainer base tensor lives in an engine tensor,
    and the union of storages is one base plus the adapters (and vLLM's padded vocabulary rows)."""
    from fastgrpo import vllm_bridge

    model = lora_model(model_path)
    gen = lora_generator(model_path, model, "zero_copy")
    assert gen.sync == "zero_copy"
    engine = vllm_bridge.engine_model(gen.llm)
    base = base_parameters(model)
    engine_ptrs = {p.untyped_storage().data_ptr() for p in engine.parameters()}
    assert all(p.untyped_storage().data_ptr() in engine_ptrs for p in base.values())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in list(model.parameters()) + list(engine.parameters())}
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    padded_rows = engine.model.embed_tokens.weight.shape[0] - model.config.vocab_size
    assert sum(storages.values()) == (nbytes(base.values()) + nbytes(adapters(model))
                                      + 2 * padded_rows * model.config.hidden_size * 4)


def grpo_cfg(model_path, run_dir, *overrides):
    return load_config(GRPOConfig, None, [
        f"model.path={model_path}", f"log.run_dir={run_dir}", "log.tensorboard=false", "model.lora.r=4",
        "data.num_examples=64", "data.max_prompt_length=32", "loss.beta=0.04",
        "generation.backend=hf", "generation.num_generations=4", "generation.max_completion_length=12",
        "train.prompts_per_step=4", "train.lr=3e-2", "train.micro_batch_tokens=256", "log.save_every=2", *overrides])


def test_grpo_lora_checkpoint_is_peft_format_and_resumes_exactly(model_path, tmp_path):
    """A LoRA GRPO run (beta > 0: the reference is the disabled adapter) checkpoints its adapter in peft's format,
    which PeftModel.from_pretrained loads, and a run resumed from it continues exactly as one that was not
    interrupted; the merged export loads with AutoModelForCausalLM and computes the adapted model's log-probs."""
    from peft import PeftModel

    from fastgrpo import lora
    from fastgrpo.grpo import train

    straight = train(grpo_cfg(model_path, tmp_path / "a", "train.steps=4"), reward_funcs=[sevens])
    train(grpo_cfg(model_path, tmp_path / "b", "train.steps=2"), reward_funcs=[sevens])
    resumed = train(grpo_cfg(model_path, tmp_path / "b", "train.steps=4"), reward_funcs=[sevens])
    for a, b in zip(straight[2:], resumed[2:]):
        for key in ("reward/mean", "loss/kl", "grad_norm", "completion/length_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert straight[-1]["loss/kl"] > 0  # the adapters moved the policy away from its reference, the base
    step_dir = tmp_path / "a" / "checkpoints" / "step-00000004"
    assert (step_dir / "adapter_model.safetensors").is_file() and not (step_dir / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = torch.tensor([PROMPTS[0] + [40, 41, 42]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, step_dir)(input_ids=ids).logits
    resumed_dir = tmp_path / "b" / "checkpoints" / "step-00000004"
    from safetensors.torch import load_file

    a, b = load_file(step_dir / "adapter_model.safetensors"), load_file(resumed_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.allclose(adapted, expected)
    lora.main(["merge", str(step_dir), str(tmp_path / "merged")])  # the README's command
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)


def test_qlora_trains_adapters_over_a_4bit_base(model_path, tmp_path):
    """model.lora.quantize=nf4: the targeted layers load as bitsandbytes' 4-bit NF4 layers (on CPU here), the
    adapters over them train with GRPO (hf generation; beta > 0 through the disabled adapters), the packed base
    does not change; with vLLM the config is refused in one line."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from fastgrpo.grpo import start_run, train

    cfg = grpo_cfg(model_path, tmp_path / "q", "train.steps=2", "model.lora.quantize=nf4")
    run, _ = start_run(cfg, reward_funcs=[sevens])
    layers = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * run.model.config.num_hidden_layers
    before = base_snapshot(run.model)
    run.logger.close()
    history = train(cfg, reward_funcs=[sevens])
    assert all(torch.isfinite(torch.tensor(h["loss/kl"])) for h in history)
    run, _ = start_run(cfg, reward_funcs=[sevens])  # resumes from the final checkpoint: the adapters trained
    run.logger.close()
    assert all(torch.equal(before[n], p) for n, p in base_parameters(run.model).items())
    assert any(p.abs().sum() > 0 for n, p in run.model.named_parameters() if ".lora_B." in n)
    with pytest.raises(ConfigError, match="model.lora.quantize=nf4 needs generation.backend=hf"):
        grpo_cfg(model_path, tmp_path / "v", "model.lora.quantize=nf4", "generation.backend=vllm")


def test_fsdp_one_and_two_ranks_train_the_same_adapters(tmp_path):
    """FSDP2 shards the base and the adapters of every decoder layer: LoRA GRPO (beta > 0 through the disabled
    adapters, gradient checkpointing, the trainer's own code around test_distributed's scripted generator) on 2
    ranks gives the 1-rank steps and adapters, and its sharded checkpoint is an adapter in peft's format."""
    import test_distributed as td
    from safetensors.torch import load_file

    td._skip_without_gloo()
    model, work = build_tiny_model(tmp_path / "model", hidden=64, intermediate=128, layers=2), tmp_path / "runs"
    one = td._run([], "train", [model, work, "grpo:a:2:model.lora.r=4"], tmp_path, "one")
    two = td._run(td.TORCHRUN, "train", [model, work, "grpo:b:2:model.lora.r=4"], tmp_path, "two")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    td._same_steps(two["grpo:b:2:model.lora.r=4"], one["grpo:a:2:model.lora.r=4"], td.GRPO_KEYS, "lora: 2 ranks")
    a, b = (load_file(work / f"grpo-{run}" / "checkpoints" / "step-00000002" / "adapter_model.safetensors")
            for run in "ab")
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-4, name


def test_sft_with_lora_trains_the_adapters_alone(model_path, tmp_path):
    """SFT with model.lora: the loss falls, the checkpoint is peft's adapter, and the optimizer state is the
    adapters' (the base carries none)."""
    from safetensors.torch import load_file

    from fastgrpo.checkpoint import load_checkpoint
    from fastgrpo.sft import SFTConfig, train

    cfg = load_config(SFTConfig, None, [
        f"model.path={model_path}", f"log.run_dir={tmp_path}", "log.tensorboard=false", "data.num_examples=200",
        "data.max_length=64", "train.sequences_per_step=16", "train.micro_batch_tokens=256", "train.lr=2e-2",
        "train.steps=12", "model.lora.r=8"])
    losses = [h["loss"] for h in train(cfg)]
    assert sum(losses[-3:]) < 0.95 * sum(losses[:3]), losses  # from ~log V (4.6) down to ~4.1
    step_dir = tmp_path / "checkpoints" / "step-00000012"
    saved = load_file(step_dir / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    model = lora_model(model_path, LoraConfig(r=8))
    optimizer = torch.optim.AdamW(adapters(model))
    load_checkpoint(step_dir, model, optimizer)
    assert len(optimizer.state) == len(saved) == len(adapters(model))


def test_grpo_lora_with_vllm_shares_the_base_and_learns(model_path, tmp_path, monkeypatch):
    """The whole loop with vLLM: zero-copy (nothing reloaded or copied), beta > 0 with no second model loaded, the
    reward rises, and the base the trainer holds at the end is the checkpoint's, bit for bit."""
    pytest.importorskip("vllm")
    from fastgrpo import grpo, vllm_bridge

    def copied(*args, **kwargs):
        raise AssertionError("zero_copy copied weights")

    monkeypatch.setattr(vllm_bridge, "reload_weights", copied)
    monkeypatch.setattr(vllm_bridge, "WeightCopier", copied)
    loads = []
    monkeypatch.setattr(grpo, "load_model", lambda *a, **k: loads.append(k["trainable"]) or load_model(*a, **k))
    cfg = grpo_cfg(model_path, tmp_path, "generation.backend=vllm", "generation.sync=zero_copy", "train.steps=12",
                   "generation.num_generations=8", "generation.max_completion_length=16", "model.lora.r=8",
                   "model.lora.alpha=32", "log.save_every=12")
    run, _ = grpo.start_run(cfg, reward_funcs=[sevens])
    assert loads == [True] and run.ref_model is None and run.generator.sync == "zero_copy"
    rewards = []
    for step in range(cfg.train.steps):
        metrics = grpo.grpo_step(run, step)
        rewards.append(metrics["reward/mean"])
    # from chance (~1/95 of the characters) to ~5x that: LoRA on a random tiny model learns slower than full weights
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.02, rewards
    assert metrics["loss/kl"] > 0
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    expected = dict(base.named_parameters())
    assert all(torch.equal(expected[n], p) for n, p in base_parameters(run.model).items())


def test_a_lora_pipeline_stage_hands_on_its_merged_model(model_path, tmp_path):
    """The R1 pipeline: a LoRA stage's output, which the next stages start from, is its base with the adapter merged
    (a Hugging Face folder), computing what the base with the adapter computes."""
    from peft import PeftModel

    from fastgrpo.pipeline import PipelineConfig, stage_dir, stage_output
    from fastgrpo.sft import SFTConfig, train

    pipeline = load_config(PipelineConfig, None, [f"run_dir={tmp_path}", f"base.path={model_path}"])
    cfg = load_config(SFTConfig, None, [
        f"model.path={model_path}", f"log.run_dir={stage_dir(pipeline, 'cold_start')}", "log.tensorboard=false",
        "data.num_examples=32", "data.max_length=64", "train.sequences_per_step=8", "train.lr=5e-2", "train.steps=2",
        "model.lora.r=4"])
    train(cfg)
    output = stage_output(pipeline, "cold_start", cfg)
    assert output == str((stage_dir(pipeline, "cold_start") / "merged").resolve())
    ids = torch.tensor([PROMPTS[0] + [40, 41, 42]])
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, stage_dir(pipeline, "cold_start") / "checkpoints" / "step-00000002")(
            input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(merged, adapted, atol=1e-5) and not torch.allclose(merged, plain, atol=1e-3)
