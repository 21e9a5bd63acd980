"""fastgrpo_kernels.integrations.trl against TRL 1.16 as shipped: the real GRPOTrainer trains a tiny local Qwen2 for
two optimizer steps, and FastGRPOTrainer trains a copy on the same prompts and seeds; both log the same loss, gradient
norm and metrics per step and end with the same weights (fp32). SGD, not Adam: the weights after a step are then the
gradients themselves (Adam's first step is lr * sign(g), blind to the gradients' size).

Each run: two accumulation steps per optimizer step and num_iterations=2, so the second step trains on the first
step's completions with updated weights (ratios != 1, old log-probs from the fused pass); with beta > 0 the reference
pass is the fused one too. Generation is transformers' sampling with fixed seeds; the fused path draws no random
numbers, so both runs sample the same completions.

Then every loss type (both importance levels where TRL has them), on one hand-made batch, against TRL's own
`_compute_loss` and fused head on the same trainer: loss and every parameter's gradient.
"""

import warnings

import pytest
import torch
from test_parity import trl, trl_stand_in  # noqa: F401 (trl: a fixture)
from test_trl_objectives import trl_batch

pytest.importorskip("trl")
warnings.filterwarnings("ignore", message="TRL currently supports vLLM")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from fastgrpo_kernels.integrations import trl as integration  # noqa: E402

PROMPTS = ["1+1=", "2+3=", "a b", "xyz", "hello", "7*6=", "GRPO", "ok?"]
CHECKED_METRICS = ("loss", "grad_norm", "entropy", "kl", "clip_ratio/region_mean", "clip_ratio/low_mean",
                   "clip_ratio/high_mean")
TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from fastgrpo.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("trl_tiny") / "qwen2", hidden=64, intermediate=128))


def count_vowels(completions, **_):
    return [float(sum(c in "aeiou" for c in text)) for text in completions]


def grpo_config(output_dir, **overrides):
    options = dict(output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                   num_generations=4, max_completion_length=8, num_iterations=2, max_steps=2, learning_rate=0.5,
                   optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                   seed=0, data_seed=0, use_cpu=True, bf16=False, disable_tqdm=True, dataloader_num_workers=0)
    return GRPOConfig(**(options | overrides))


def train(trainer_class, model_path, output_dir, **overrides):
    from datasets import Dataset

    trainer = trainer_class(model=model_path, reward_funcs=count_vowels, args=grpo_config(output_dir, **overrides),
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def initial_weights(model_path):
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(model_path).named_parameters())


class Spy:
    """Counts the calls of one of the integration's kernels."""

    def __init__(self, monkeypatch, name):
        self.calls, fn = 0, getattr(integration, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(integration, name, counted)


@pytest.mark.parametrize("overrides", [
    pytest.param(dict(), id="dapo"),
    pytest.param(dict(loss_type="grpo", beta=0.04, epsilon_high=0.28, temperature=0.7), id="grpo-kl"),
])
def test_trains_as_trl(tiny_model, tmp_path, monkeypatch, overrides):
    trl_logs, trl_weights = train(GRPOTrainer, tiny_model, tmp_path / "trl", **overrides)
    loss_spy, logp_spy = Spy(monkeypatch, "fused_linear_grpo_loss"), Spy(monkeypatch, "fused_linear_logprobs")
    logs, weights = train(integration.FastGRPOTrainer, tiny_model, tmp_path / "fast", **overrides)

    assert loss_spy.calls == 4  # 2 steps x 2 accumulation steps
    # old log-probs (once per generation: 2 accumulation batches), and as many reference passes with beta > 0
    assert logp_spy.calls == (4 if overrides.get("beta") else 2)
    assert len(logs) == len(trl_logs) == 2
    for step, (ours, theirs) in enumerate(zip(logs, trl_logs)):
        for name in CHECKED_METRICS:
            if name in theirs:
                assert name in ours, f"step {step}: {name} not logged"
                torch.testing.assert_close(ours[name], theirs[name], **TOL, msg=lambda m: f"step {step} {name}: {m}")
    # The updates, not the weights: a weight of 0.02 would hide an update's error under rtol.
    start = initial_weights(tiny_model)
    for name, w in weights.items():
        update, trl_update = w - start[name], trl_weights[name] - start[name]
        assert trl_update.abs().max() > 0, f"{name} did not move"
        torch.testing.assert_close(update, trl_update, **TOL, msg=lambda m: f"{name} update: {m}")
    print(f"max |loss diff| {max(abs(a['loss'] - b['loss']) for a, b in zip(logs, trl_logs)):.2e}, "
          f"max |weight diff| {max((w - trl_weights[n]).abs().max().item() for n, w in weights.items()):.2e}")


def test_loss_config_is_the_parity_tests_mapping(trl):
    """loss_config reads TRL's options back into the very GRPOLossConfig the parity tests held TRL's loss to."""
    for loss_type in ("cispo", "sapo", "luspo", "vespo"):
        batch = trl_batch("everything" if loss_type == "luspo" else "kl_bias_correction", loss_type, "token")
        trainer = trl_stand_in(trl, None, batch)
        trainer.temperature = batch.config.temperature
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
                     "vespo_k_neg", "vespo_lambda_neg"):
            assert hasattr(trainer.args, name)
        assert integration.loss_config(trainer) == batch.config


@pytest.mark.parametrize("overrides,name", [
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    (dict(entropy_coef=0.01), "entropy_coef"),
    (dict(use_liger_kernel=True), "use_liger_kernel"),
])
def test_unsupported_option_is_named(tiny_model, tmp_path, overrides, name):
    from datasets import Dataset

    with pytest.raises(ValueError, match=f"does not support {name}"):
        integration.FastGRPOTrainer(model=tiny_model, reward_funcs=count_vowels,
                                    args=grpo_config(tmp_path, **overrides),
                                    train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


def test_bad_combination_is_named(tiny_model, tmp_path):
    """A combination GRPOLossConfig refuses (delta on sapo, which has no clip) fails at construction, naming it."""
    from datasets import Dataset

    with pytest.raises(ValueError, match="delta"):
        integration.FastGRPOTrainer(model=tiny_model, reward_funcs=count_vowels,
                                    args=grpo_config(tmp_path, loss_type="sapo", delta=2.0),
                                    train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


# ----------------------------------------------------------------------------------------------------------
# Every loss type, on one batch: TRL's own _compute_loss (its fused head) against the integration's, on one trainer


def make_trainer(model_path, output_dir, **overrides):
    from datasets import Dataset

    # temperature: TRL's head takes it at construction
    args = grpo_config(output_dir, beta=0.04, gradient_accumulation_steps=3, temperature=0.7, **overrides)
    fast = integration.FastGRPOTrainer(model=model_path, reward_funcs=count_vowels, args=args,
                                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    fast.current_gradient_accumulation_steps = 3  # set by Trainer.train, as is train mode; the normalizers read both
    fast.model.train()
    return fast


@pytest.fixture(scope="module")
def trainer(tiny_model, tmp_path_factory):
    return make_trainer(tiny_model, tmp_path_factory.mktemp("trl_out"))


def loss_inputs(vocab, seed=0):
    """A prepared batch as _generate_and_score_completions leaves it: left-padded prompts, completions of different
    lengths (one empty), old / reference log-probs near the policy's, token IS ratios around 1."""
    B, P, T = 4, 3, 6
    gen = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, 0] = 0
    completion_mask = (torch.arange(T) < torch.tensor([6, 4, 0, 5])[:, None]).long()
    return {
        "prompt_ids": torch.randint(8, vocab, (B, P), generator=gen) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(8, vocab, (B, T), generator=gen) * completion_mask,
        "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.7, 0.4, -0.6]),
        "num_items_in_batch": 3 * completion_mask.sum(),
        # 1 where masked, as TRL's ratios of masked differences are (vespo sums them over every position)
        "importance_sampling_ratio": torch.exp(0.2 * torch.randn(B, T, generator=gen) * completion_mask),
    }


def with_logps(trainer, inputs, seed=1):
    """Old and reference log-probs: the policy's own (TRL's head) shifted by noise big enough to reach the clips."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    with torch.no_grad():
        logp, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].size(1))
    noise = 0.3 * torch.randn(2, *logp.shape, generator=gen)
    return inputs | {"old_per_token_logps": logp + noise[0], "ref_per_token_logps": logp + noise[1]}


def loss_and_grads(compute, trainer, inputs):
    trainer.model.zero_grad()
    loss = compute(trainer, inputs)
    (0.37 * loss).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


LOSS_SETUPS = [(loss_type, level) for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo", "luspo", "cispo", "sapo")
               for level in ("token", "sequence")] + [("vespo", "token")]


def compare_with_trl(trainer, monkeypatch, loss_type, level, bf16=False, **input_changes):
    """Loss and every parameter's gradient of TRL's _compute_loss and the integration's, with KL (bias-corrected:
    TRL's default), vLLM IS ratios, clip-higher (cispo: its cap) and temperature 0.7, under 3 accumulation steps."""
    monkeypatch.setattr(trainer, "loss_type", loss_type)
    monkeypatch.setattr(trainer, "importance_sampling_level", level)
    monkeypatch.setattr(trainer, "epsilon_high", 1.3 if loss_type == "cispo" else 0.28)
    monkeypatch.setattr(trainer, "use_vllm", True)
    monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", True)
    monkeypatch.setattr(trainer, "loss_config", integration.loss_config(trainer))
    inputs = with_logps(trainer, loss_inputs(trainer.model.config.vocab_size)) | input_changes
    theirs, their_grads = loss_and_grads(lambda t, x: GRPOTrainer._compute_loss(t, t.model, x), trainer, inputs)
    ours, our_grads = loss_and_grads(lambda t, x: t._compute_loss(t.model, x), trainer, inputs)
    assert any(g.abs().max() > 0 for g in their_grads.values())
    if bf16:  # each parameter's gradient within 2% of its norm (bf16 has 8 bits of mantissa)
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-4)
        for name, grad in our_grads.items():
            if "k_proj.bias" not in name:  # its exact gradient is 0 (softmax ignores q.b, the same for every key)
                assert (grad - their_grads[name]).norm() <= 2e-2 * their_grads[name].norm(), name
        return
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss_type,level", LOSS_SETUPS)
def test_each_loss_type_matches_trls_compute_loss(trainer, loss_type, level, monkeypatch):
    compare_with_trl(trainer, monkeypatch, loss_type, level)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence")])
def test_sequence_is_ratios_and_eval_mode(trainer, loss_type, level, mode, monkeypatch):
    """Sequence-mode IS ratios ([B, 1], TRL's sequence_* modes), in train mode and in eval (no accumulation)."""
    ratios = torch.tensor([[1.3], [0.8], [1.0], [0.0]])  # the last one masked out (a *_mask mode)
    trainer.model.train(mode == "train")
    try:
        compare_with_trl(trainer, monkeypatch, loss_type, level, importance_sampling_ratio=ratios)
    finally:
        trainer.model.train()


def test_tied_lm_head_matches_trl(tmp_path, monkeypatch):
    """A head tied to the embeddings (Qwen2.5-0.5B's): the head's and the embedding's gradients land on one weight."""
    from fastgrpo.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "tied", hidden=64, intermediate=128, tie_embeddings=True)
    tied = make_trainer(str(path), tmp_path / "out")
    assert tied.model.lm_head.weight is tied.model.model.embed_tokens.weight
    compare_with_trl(tied, monkeypatch, "grpo", "token")


def test_bf16_model_with_fp32_head_matches_trl(tiny_model, tmp_path, monkeypatch):
    """cast_lm_head_to_fp32 on a bf16 model: both heads take the bf16 backbone's states to fp32, outside autocast."""
    fp32_head = make_trainer(tiny_model, tmp_path, cast_lm_head_to_fp32=True,
                             model_init_kwargs={"dtype": "bfloat16"})
    assert fp32_head.model.lm_head.weight.dtype == torch.float32
    assert fp32_head.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    compare_with_trl(fp32_head, monkeypatch, "grpo", "token")


def test_bf16_autocast_matches_trl(tiny_model, tmp_path, monkeypatch):
    """bf16=True (accelerate's autocast, fp32 weights): both heads multiply in bf16, so the two agree to bf16's
    precision, not bit for bit."""
    autocast = make_trainer(tiny_model, tmp_path, bf16=True)
    compare_with_trl(autocast, monkeypatch, "grpo", "token", bf16=True)


def test_multimodal_inputs_are_named(trainer):
    inputs = with_logps(trainer, loss_inputs(trainer.model.config.vocab_size))
    with pytest.raises(ValueError, match="multimodal inputs \\(pixel_values\\)"):
        trainer._compute_loss(trainer.model, inputs | {"pixel_values": torch.zeros(4, 3)})
