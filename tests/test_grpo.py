"""The GRPO trainer end to end on a tiny local model: learning, every loss variant, exact resume, bad input."""

import math

import pytest
import torch

from fastgrpo.config import ConfigError, GRPOConfig, load_config
from fastgrpo.grpo import train
from fastgrpo.metrics import read_metrics
from fastgrpo.rewards import RewardError
from fastgrpo.tiny import build_tiny_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


def sevens(completions, **kwargs):
    """A reward a tiny random model can learn in a few steps: the share of '7' characters it writes."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def make_cfg(model_path, run_dir, *overrides):
    return load_config(GRPOConfig, None, [
        f"model.path={model_path}", f"log.run_dir={run_dir}", "log.tensorboard=false",
        "data.num_examples=64", "data.max_prompt_length=32",
        "generation.backend=hf", "generation.num_generations=4", "generation.max_completion_length=12",
        "train.prompts_per_step=4", "train.steps=1", "train.lr=3e-3", "train.micro_batch_tokens=256",
        *overrides,
    ])


@pytest.mark.parametrize("sync", ["zero_copy", "reload"])
def test_reward_rises_with_vllm(model_path, tmp_path, sync, monkeypatch):
    if sync == "zero_copy":  # nothing is copied after a step: neither a reload nor a cast copy may run
        from fastgrpo import vllm_bridge

        def copied(*args, **kwargs):
            raise AssertionError("zero_copy copied weights")

        monkeypatch.setattr(vllm_bridge, "reload_weights", copied)
        monkeypatch.setattr(vllm_bridge, "WeightCopier", copied)
    cfg = make_cfg(model_path, tmp_path, "generation.backend=vllm", f"generation.sync={sync}", "generation.num_generations=8",
                   "generation.max_completion_length=16", "train.steps=16", "train.lr=1e-2", "loss.loss_type=dapo")
    history = train(cfg, reward_funcs=[sevens])
    rewards = [h["reward/mean"] for h in history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards
    logged = read_metrics(tmp_path)
    assert [r["step"] for r in logged] == list(range(16)) and (tmp_path / "checkpoints").is_dir()


@pytest.mark.parametrize("overrides", [
    ["loss.loss_type=grpo"],
    ["loss.loss_type=bnpo", "loss.importance_level=sequence"],
    ["loss.loss_type=dr_grpo", "loss.advantage_scale=none"],
    ["loss.loss_type=dapo", "loss.beta=0.04", "loss.delta=2.0", "loss.advantage_scale=batch"],
    ["loss.loss_type=vespo", "loss.beta=0.04", "loss.bias_correction_kl=true", "loss.vespo_k_pos=1.5"],
    ["train.num_iterations=2", "loss.tis_cap=2.0", "loss.mask_truncated=true", "loss.overlong_buffer=4"],
    ["train.dynamic_sampling=true", "train.max_refills=2"],
], ids=lambda o: ",".join(x.split("=")[0].split(".")[1] + "=" + x.split("=")[1] for x in o))
def test_each_variant_takes_a_step(model_path, tmp_path, overrides):
    cfg = make_cfg(model_path, tmp_path, *overrides)
    (step,) = train(cfg, reward_funcs=[sevens])
    for key in ("reward/mean", "loss/clip_region", "loss/entropy", "grad_norm", "packing/padding_fraction"):
        assert math.isfinite(step[key]), key
    assert step["bad_updates"] == 0
    if "loss.beta=0.04" in overrides:
        assert step["loss/kl"] >= 0
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step-00000001")
    base = AutoModelForCausalLM.from_pretrained(model_path)
    changed = any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))
    assert changed or step["advantage/abs_mean"] == 0


def test_resume_reproduces_uninterrupted_run(model_path, tmp_path):
    straight = train(make_cfg(model_path, tmp_path / "a", "train.steps=4", "log.save_every=2"), reward_funcs=[sevens])
    interrupted = make_cfg(model_path, tmp_path / "b", "train.steps=2", "log.save_every=2")
    train(interrupted, reward_funcs=[sevens])
    resumed = train(make_cfg(model_path, tmp_path / "b", "train.steps=4", "log.save_every=2"), reward_funcs=[sevens])
    keys = ("reward/mean", "loss/clip_region", "loss/entropy", "grad_norm", "completion/length_mean")
    assert [h["step"] for h in resumed] == [0, 1, 2, 3]
    for a, b in zip(straight[2:], resumed[2:]):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_prompts_from_a_local_jsonl_file(model_path, tmp_path):
    import json

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i}+{i}=", "solution": str(2 * i)}) + "\n" for i in range(6)))
    cfg = make_cfg(model_path, tmp_path / "run", f"data.source={path}", "data.prompt_column=question",
                   "data.answer_column=solution")
    (step,) = train(cfg, reward_funcs=[sevens])
    assert step["completion/length_mean"] > 0 and math.isfinite(step["reward/mean"])


def test_bad_input(model_path, tmp_path):
    with pytest.raises(ConfigError, match="loss.bta"):
        load_config(GRPOConfig, None, [f"model.path={model_path}", "loss.bta=1"])
    with pytest.raises(ConfigError, match="loss.eps_high=0.28 is cispo's cap"):
        load_config(GRPOConfig, None, [f"model.path={model_path}", "loss.loss_type=cispo"])
    with pytest.raises(ValueError, match="no column 'question'"):
        train(make_cfg(model_path, tmp_path / "a", "data.prompt_column=question"), reward_funcs=[sevens])
    with pytest.raises(ValueError, match="exceeds data.max_prompt_length=3"):
        train(make_cfg(model_path, tmp_path / "b", "data.max_prompt_length=3", "data.long_prompts=error"),
              reward_funcs=[sevens])

    def broken(completions, **kwargs):
        raise KeyError("boom")

    def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(RewardError, match="broken"):
        train(make_cfg(model_path, tmp_path / "c"), reward_funcs=[broken])
    with pytest.raises(RewardError, match="short"):
        train(make_cfg(model_path, tmp_path / "d"), reward_funcs=[short])


def test_non_finite_steps_are_skipped_then_stop(model_path, tmp_path, monkeypatch):
    import fastgrpo.grpo as grpo

    calls = []

    def loss_goes_nan(*args, **kwargs):  # from the third micro-batch on (step 2 here), the loss is NaN
        calls.append(1)
        loss, metrics = fused(*args, **kwargs)
        return (loss * float("nan") if len(calls) > 2 else loss), metrics

    fused = grpo.fused_linear_grpo_loss
    monkeypatch.setattr(grpo, "fused_linear_grpo_loss", loss_goes_nan)
    cfg = make_cfg(model_path, tmp_path, "train.steps=6", "train.max_bad_steps=2", "log.save_every=1",
                   "train.micro_batch_tokens=4096")
    with pytest.raises(RuntimeError, match="2 consecutive steps with non-finite gradients; the last good checkpoint"):
        train(cfg, reward_funcs=[sevens])
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept[-1] == "step-00000002"  # the steps that went non-finite saved nothing
    logged = read_metrics(tmp_path)
    assert [r["bad_updates"] for r in logged] == [0, 0, 1, 1]


def test_a_step_with_no_trainable_token_trains_nothing(model_path, tmp_path, monkeypatch):
    """Every completion of step 0 truncated under mask_truncated: logged as nothing to train, no update, not a bad
    step (max_bad_steps=1 would stop the run); step 1 trains as usual."""
    import fastgrpo.grpo as grpo

    def truncated_at_step_0(*args, **kwargs):
        rollout = collect(*args, **kwargs)
        rollout.truncated[:] = args[6] == 0
        return rollout

    collect = grpo.collect_rollout
    monkeypatch.setattr(grpo, "collect_rollout", truncated_at_step_0)
    cfg = make_cfg(model_path, tmp_path, "train.steps=2", "train.max_bad_steps=1", "loss.mask_truncated=true")
    history = train(cfg, reward_funcs=[sevens])
    assert [h["nothing_to_train"] for h in history] == [1.0, 0.0]
    assert [h["bad_updates"] for h in history] == [0, 0] and "grad_norm" not in history[0]
    assert math.isfinite(history[1]["grad_norm"])


def test_a_run_that_trains_nothing_fails(model_path, tmp_path, monkeypatch):
    import fastgrpo.grpo as grpo
    from fastgrpo.runs import RunError

    def nan_loss(*args, **kwargs):
        loss, metrics = fused(*args, **kwargs)
        return loss * float("nan"), metrics

    fused = grpo.fused_linear_grpo_loss
    monkeypatch.setattr(grpo, "fused_linear_grpo_loss", nan_loss)
    with pytest.raises(RunError, match=r"last 2 step\(s\) had non-finite gradients, so its final state was not "
                                           r"saved; the last good checkpoint is None"):
        train(make_cfg(model_path, tmp_path / "nan", "train.steps=2"), reward_funcs=[sevens])
    monkeypatch.undo()
    # every completion runs to the length limit and is masked out: not one token to train on
    cfg = make_cfg(model_path, tmp_path / "masked", "generation.ignore_eos=true", "loss.mask_truncated=true")
    with pytest.raises(RunError, match="no step of the run .* updated the weights"):
        train(cfg, reward_funcs=[sevens])


def test_warmup_counts_steps_and_the_logged_lr_is_the_steps_own(model_path, tmp_path):
    cfg = make_cfg(model_path, tmp_path, "train.steps=3", "train.num_iterations=2", "train.warmup_steps=2")
    history = train(cfg, reward_funcs=[sevens])
    assert [h["lr"] for h in history] == pytest.approx([1.5e-3, 3e-3, 3e-3])


def test_dynamic_sampling_judges_groups_by_the_accuracy_reward(model_path):
    from fastgrpo.grpo import dynamic_sampling_column, informative_groups

    names = ["accuracy_reward", "format_reward", "overlong_penalty"]
    cfg = make_cfg(model_path, "unused")
    assert dynamic_sampling_column(cfg, names) == 0 and dynamic_sampling_column(cfg, ["sevens"]) is None
    assert dynamic_sampling_column(make_cfg(model_path, "unused", "train.dynamic_sampling_reward=total"), names) is None
    with pytest.raises(ValueError, match="train.dynamic_sampling_reward='acc' names none of the run's rewards"):
        dynamic_sampling_column(make_cfg(model_path, "unused", "train.dynamic_sampling_reward=acc"), names)
    nan = float("nan")
    # G = 2. Group 0: all wrong, formats differ (the total differs: kept before); group 1: one right; group 2: a
    # general prompt that accuracy does not score, judged by its total
    per_func = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [nan, 0.3], [nan, 0.7]])
    rewards = per_func.nansum(1)
    assert informative_groups(rewards, per_func, 0, 2).tolist() == [False, True, True]
    assert informative_groups(rewards, per_func, None, 2).tolist() == [True, True, True]


def test_reward_model_runs_on_the_trainers_device(model_path, monkeypatch):
    import fastgrpo.grpo as grpo

    built = []
    monkeypatch.setattr("fastgrpo.rewards.RewardModelReward", lambda path, device=None: built.append((path, device)))
    cfg = make_cfg(model_path, "unused", "rewards.funcs=[reward_model]", "rewards.weights=[1.0]",
                   "rewards.reward_model=/rm")
    grpo.make_rewards(cfg, device=torch.device("meta"))
    assert built == [("/rm", torch.device("meta"))]


def test_prompt_order_follows_the_train_seed(model_path):
    from transformers import AutoTokenizer

    from fastgrpo.grpo import make_sampler

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    first = lambda seed: [make_sampler(make_cfg(model_path, "unused", f"train.seed={seed}"), tokenizer).next()[0]  # noqa: E731
                          for _ in range(1)]
    assert first(1) == first(1) and first(0) != first(1)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo", "luspo", "cispo", "sapo", "vespo"])
def test_the_step_gradient_does_not_depend_on_micro_batching(model_path, loss_type):
    """The normalizers are the step's (the loss op's arguments): S identical sequences give the same gradient in one
    micro-batch as one per micro-batch. (bnpo averages its micro-batches' means, TRL's way: equal here.)"""
    from transformers import AutoModelForCausalLM

    from fastgrpo.grpo import Rollout, optimize

    S, prompt, completion = 6, [1, 10, 11], [20, 21, 22, 23]
    rollout = Rollout([prompt] * S, [completion] * S, [[-1.0] * len(completion)] * S, torch.zeros(S, dtype=torch.bool),
                      torch.zeros(S), torch.zeros(S, 1))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    norms = []
    for budget in (64, len(prompt) + len(completion)):  # one micro-batch; one per sequence
        cfg = make_cfg(model_path, "unused", f"loss.loss_type={loss_type}", f"train.micro_batch_tokens={budget}",
                       "train.max_grad_norm=1e9", "loss.eps_high=5.0" if loss_type == "cispo" else "loss.eps_high=0.28")
        loss_config = cfg.loss.to_kernel(cfg.generation.temperature, cfg.generation.max_completion_length)
        step = optimize(model, None, optimizer, rollout, torch.ones(S), loss_config, cfg)
        norms.append((step["packing/num_micro_batches"], step["grad_norm"]))
    assert [n for n, _ in norms] == [1, S]
    assert norms[1][1] == pytest.approx(norms[0][1], rel=1e-5)


IS_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.mark.parametrize("mode", IS_MODES)
def test_each_rollout_correction_mode_takes_a_step(model_path, tmp_path, mode):
    cfg = make_cfg(model_path, tmp_path, f"loss.is_mode={mode}", "loss.is_clip_min=0.5", "loss.is_clip_max=2.0")
    (step,) = train(cfg, reward_funcs=[sevens])
    for key in ("reward/mean", "loss/clip_region", "loss/entropy", "loss/ratio", "grad_norm"):
        assert math.isfinite(step[key]), key
    assert step["bad_updates"] == 0


@pytest.mark.parametrize("mode", IS_MODES)
def test_packed_rollout_correction_equals_the_padded_rollouts(model_path, mode):
    """The IS weights reaching the loss, micro-batch by micro-batch (several sequences packed in each), are
    rollout_is_weights of the padded (S, T) rollout: no sequence mode takes a product over another's tokens."""
    from transformers import AutoModelForCausalLM

    from fastgrpo.grpo import Rollout, prepare
    from fastgrpo_kernels import rollout_is_weights

    S, prompt = 8, [1, 10, 11]
    completions = [[20 + j for j in range(2 + s % 6)] for s in range(S)]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    on_policy = Rollout([prompt] * S, completions, [[0.0] * len(c) for c in completions],
                        torch.zeros(S, dtype=torch.bool), torch.zeros(S), torch.zeros(S, 1))
    budget = ["train.micro_batch_tokens=24"]
    mbs, _, _ = prepare(model, None, on_policy, torch.ones(S), make_cfg(model_path, "unused", "train.num_iterations=2",
                                                                        *budget))
    assert len(mbs) > 1 and all(len(mb.packed.seq_indices) > 1 for mb in mbs)
    T = max(map(len, completions))
    old_logp, mask = torch.zeros(S, T), torch.zeros(S, T)  # (S, T) the padded rollout
    for mb in mbs:
        for s, logp in zip(mb.packed.seq_indices.tolist(), mb.old_logp.split(mb.cu_seqlens.diff().tolist())):
            old_logp[s, : len(logp)], mask[s, : len(logp)] = logp, 1.0
    sampling_logp = old_logp + 0.3 * torch.randn(S, T, generator=torch.Generator().manual_seed(0))  # (S, T)
    sampled = [sampling_logp[s, : len(c)].tolist() for s, c in enumerate(completions)]
    rollout = Rollout([prompt] * S, completions, sampled, torch.zeros(S, dtype=torch.bool), torch.zeros(S),
                      torch.zeros(S, 1))
    cfg = make_cfg(model_path, "unused", f"loss.is_mode={mode}", "loss.is_clip_min=0.5", "loss.is_clip_max=1.5",
                   *budget)
    expected = rollout_is_weights(old_logp, sampling_logp, mask, mode, 0.5, 1.5)  # (S, T)
    seen = set()
    for mb in prepare(model, None, rollout, torch.ones(S), cfg)[0]:
        for s, weights in zip(mb.packed.seq_indices.tolist(), mb.is_weights.split(mb.cu_seqlens.diff().tolist())):
            torch.testing.assert_close(weights, expected[s, : len(weights)], rtol=1e-5, atol=1e-6)
            seen.add(s)
    assert seen == set(range(S))
    assert len(set(expected[mask.bool()].tolist())) > S // 2  # weights that differ from sequence to sequence


def test_rollout_correction_bad_config(model_path):
    base = [f"model.path={model_path}"]
    for overrides, match in [
        (["loss.is_mode=token_clip"], r"loss.is_mode='token_clip' is not one of"),
        (["loss.is_mode=token_mask", "loss.tis_cap=2.0"], "loss.tis_cap=2.0 and loss.is_mode=token_mask both"),
        (["loss.is_mode=sequence_mask", "loss.loss_type=vespo"], "vespo folds the weights"),
        (["loss.is_mode=token_mask", "loss.is_clip_min=3.0"], "loss.is_clip_min=3.0 must be less than"),
        (["loss.is_mode=token_truncate", "loss.is_clip_max=null"], "needs loss.is_clip_min or loss.is_clip_max"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(GRPOConfig, None, base + overrides)
    load_config(GRPOConfig, None, base + ["loss.is_mode=token_mask", "loss.loss_type=vespo"])
