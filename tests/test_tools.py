"""Multi-turn rollouts with tools (fastgrpo/tools.py, fastgrpo/episodes.py): exact token ids, masks, limits,
failing tools, concurrency, and GRPO runs that train on episodes (and resume to the uninterrupted run)."""

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from fastgrpo.config import GRPOConfig, load_config
from fastgrpo.episodes import EpisodeRunner, ObservationRenderer
from fastgrpo.generation import Completion, SamplingConfig
from fastgrpo.tiny import build_tiny_model, char_tokenizer
from fastgrpo.tools import Step, ToolEnvironment, calculator, parse_tool_calls, run_bounded, tool_schema

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tools") / "qwen2", hidden=64, intermediate=128))


# ----------------------------------------------------------------------------------------------------------
# Tools and their failures


def test_tool_calls_are_read_from_the_models_format():
    two = parse_tool_calls(f'x {CALL} y <tool_call>{{"name": "f", "arguments": "{{\\"a\\": 1}}"}}</tool_call>')
    assert [(c.name, c.arguments, c.error) for c in two] == [("calculator", {"expression": "6*7"}, None),
                                                           ("f", {"a": 1}, None)]  # arguments as a JSON string too
    assert parse_tool_calls("no call") == []
    for bad in ['<tool_call>{"name": "f", </tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
                '<tool_call>["f"]</tool_call>', '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
                '<tool_call>{"name": "f"']:
        (call,) = parse_tool_calls(bad)
        assert call.error.startswith("malformed tool call"), bad


def get_weather(city: str, unit: str = "celsius") -> str:
    """Gets the current temperature in a city.

    Args:
        city: The city, e.g. "Paris".
        unit: "celsius" or "fahrenheit".
    """
    return f"22 degrees {unit} in {city}"


def raising(x: int) -> str:
    """Always fails.

    Args:
        x: anything
    """
    raise RuntimeError("the database is down")


def hanging(x: int) -> str:
    """Never returns.

    Args:
        x: anything
    """
    threading.Event().wait()


def test_a_trl_style_tool_function_works_unchanged():
    schema = tool_schema(get_weather)  # what TRL's tools= makes of it: transformers' get_json_schema
    assert schema["function"]["name"] == "get_weather"
    assert schema["function"]["parameters"]["required"] == ["city"]
    step = ToolEnvironment([get_weather]).step('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                                               '</tool_call>')
    assert step.messages == [{"role": "tool", "name": "get_weather", "content": "22 degrees celsius in Oslo"}]
    assert (step.done, step.calls, step.errors) == (False, 1, 0)

    def undocumented(x):
        return x

    with pytest.raises(ValueError, match="tool 'undocumented' cannot be described to the model"):
        tool_schema(undocumented)


def test_bad_calls_and_failing_tools_answer_with_an_error_and_never_raise():
    env = ToolEnvironment([get_weather, raising, hanging, calculator], timeout_s=0.5)
    turns = {
        '<tool_call>{"name": "get_weather", </tool_call>': "malformed tool call: not JSON",
        '<tool_call>{"name": "search", "arguments": {}}</tool_call>': "unknown tool 'search'",
        '<tool_call>{"name": "raising", "arguments": {"x": 1}}</tool_call>': "RuntimeError: the database is down",
        '<tool_call>{"name": "hanging", "arguments": {"x": 1}}</tool_call>': "timed out after 0.5 s",
        '<tool_call>{"name": "get_weather", "arguments": {"town": "Oslo"}}</tool_call>': "unexpected keyword",
        '<tool_call>{"name": "calculator", "arguments": {"expression": "__import__(\'os\')"}}</tool_call>':
            "not arithmetic",
    }
    for turn, error in turns.items():
        start = time.monotonic()
        step = env.step(turn)
        assert time.monotonic() - start < 5
        (message,) = step.messages
        assert error in json.loads(message["content"])["error"], turn
        assert (step.done, step.calls, step.errors) == (False, 1, 1)
    assert env.step("Answer: 42").done  # a turn without a call ends the episode


def test_calls_run_concurrently_and_at_most_the_limit_at_once():
    active, most, intervals, lock = [0], [0], [], threading.Lock()

    def slow():
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        start = time.monotonic()
        time.sleep(0.3)
        with lock:
            active[0] -= 1
            intervals.append((start, time.monotonic()))
        return "ok"

    assert run_bounded([slow] * 6, timeout_s=30, limit=6) == [(True, "ok")] * 6
    assert max(s for s, _ in intervals) < min(e for _, e in intervals)  # every call started before any ended
    intervals.clear()
    most[0] = 0
    assert run_bounded([slow] * 6, timeout_s=30, limit=2) == [(True, "ok")] * 6
    assert most[0] == 2


class Weather:
    """A TRL environment_factory environment: reset(**row), tool methods, get_reward()."""

    def reset(self, **row):
        self.calls = 0
        return " (use the tool)"

    def temperature(self, city: str) -> str:
        """The temperature in a city.

        Args:
            city: The city.
        """
        self.calls += 1
        return "22"

    def get_reward(self):
        return float(self.calls)


def test_a_trl_environment_is_wrapped_as_it_is():
    env = ToolEnvironment.wrapping(Weather(), [calculator])
    assert [t.__name__ for t in env.tools] == ["calculator", "temperature"]
    assert env.reset(prompt="p") == " (use the tool)"
    step = env.step('<tool_call>{"name": "temperature", "arguments": {"city": "Oslo"}}</tool_call>')
    assert step.messages[0]["content"] == "22"
    assert env.step("done").done and env.final_reward() == 1.0


def test_a_trl_environments_reward_is_read_when_its_episode_ends_however_it_ends(tok, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    calls = '<tool_call>{"name": "temperature", "arguments": {"city": "Oslo"}}</tool_call>'
    for turns, max_turns, reward in (([calls, "It is 22."], 3, 1.0), ([calls], 2, 1.0), (["It is warm."], 2, 0.0)):
        run = runner(tok, tmp_path, environment="test_tools:Weather", max_turns=max_turns)
        (group,) = run.generate(ScriptedTurns(tok, turns), [[1]], [{"prompt": "p"}], SamplingConfig(n=1, seed=0))
        assert group[0].extra["reward"] == reward, turns


# ----------------------------------------------------------------------------------------------------------
# Episodes, token in / token out


class ScriptedTurns:
    """A generator whose turns are scripted text, typed character by character (so the ids do not survive a decode
    and re-encode: "<think>" typed out is 7 tokens, re-encoded it is one); it records what it was asked."""

    def __init__(self, tok, turns):
        self.tok, self.turns, self.asked = tok, turns, []

    def generate_each(self, prompts, sampling, seeds, max_tokens):
        out = []
        for prompt, seed, budget in zip(prompts, seeds, max_tokens):
            self.asked.append(list(prompt))
            turn = seed // (2**36)
            text = self.turns[min(turn, len(self.turns) - 1)]
            ids = self.typed(text)
            logprobs = [-0.5 - 0.01 * i for i in range(len(ids))]
            reason = "length" if len(ids) > budget else "stop"
            out.append(Completion(ids[:budget], logprobs[:budget], reason))
        return out

    def typed(self, text):
        return [self.tok.convert_tokens_to_ids(self.tok.tokenize(ch)[0]) for ch in text] + [self.tok.eos_token_id]


def runner(tok, tmp_path, **tools):
    cfg = load_config(GRPOConfig, None, [f"model.path={tmp_path}", "tools.funcs=[calculator]",
                                         *(f"tools.{k}={v}" for k, v in tools.items())])
    return EpisodeRunner(cfg.tools, tok, tok.eos_token_id, max_tokens=400)


def test_an_episode_is_the_sampled_and_observation_ids_never_re_encoded(tok, tmp_path):
    gen = ScriptedTurns(tok, [f"<think>6*7</think>{CALL}", "Answer: 42"])
    run = runner(tok, tmp_path)
    prompt = run.tokenizer("<|user|>6*7=<|assistant|>", add_special_tokens=False)["input_ids"]
    (group,) = run.generate(gen, [prompt], [{"prompt": "6*7="}], SamplingConfig(n=2, seed=5))
    first, observation, last = (gen.typed(f"<think>6*7</think>{CALL}"),
                                ObservationRenderer(tok, tok.eos_token_id).ids([{"role": "tool", "name": "calculator",
                                                                                 "content": "42"}]),
                                gen.typed("Answer: 42"))
    assert tok.decode(observation) == "<|user|><tool_response>42</tool_response><|assistant|>"
    for c in group:
        assert c.token_ids == first + observation + last
        assert c.extra["mask"] == [1] * len(first) + [0] * len(observation) + [1] * len(last)
        assert c.logprobs[:len(first)] == [-0.5 - 0.01 * i for i in range(len(first))]
        assert c.logprobs[len(first):len(first) + len(observation)] == [0.0] * len(observation)
        assert (c.extra["turns"], c.extra["tool_calls"], c.extra["tool_errors"], c.finish_reason) == (2, 1, 0, "stop")
    # the second turn continued from the ids themselves, and a decode + encode would not have given them back
    assert gen.asked[2:] == [prompt + first + observation] * 2
    assert tok(tok.decode(first + observation), add_special_tokens=False)["input_ids"] != first + observation


def test_turn_and_token_limits(tok, tmp_path):
    always = ScriptedTurns(tok, [CALL])
    (group,) = runner(tok, tmp_path, max_turns=3).generate(always, [[1]], [{}], SamplingConfig(n=1, seed=0))
    (c,) = group
    assert (c.extra["turns"], c.extra["tool_calls"], c.finish_reason) == (3, 2, "stop")  # the last call is not run
    run = runner(tok, tmp_path)
    run.max_tokens = 140
    (group,) = run.generate(always, [[1]], [{}], SamplingConfig(n=1, seed=0))
    (c,) = group
    assert len(c.token_ids) == 140 and c.finish_reason == "length"  # turn, observation, then a truncated turn
    assert c.extra["turns"] == 2 and c.extra["mask"][-1] == 1
    run.max_tokens = len(always.typed(CALL)) + 5
    (group,) = run.generate(always, [[1]], [{}], SamplingConfig(n=1, seed=0))
    (c,) = group
    assert len(c.token_ids) == len(always.typed(CALL)) + 5 and c.finish_reason == "length"  # the observation is cut
    assert c.extra["mask"][-5:] == [0] * 5 and c.extra["turns"] == 1


class SlowEcho:
    """An environment answering every turn (episodes run to max_turns) after a pause, logging when it ran."""

    tools = []
    log, lock = [], threading.Lock()

    def reset(self, **row):
        return None

    def step(self, turn):
        start = time.monotonic()
        time.sleep(0.2)
        with self.lock:
            self.log.append((start, time.monotonic()))
        return Step([{"role": "tool", "name": "echo", "content": str(len(turn))}], reward=float(len(turn) % 3))


class Hangs(SlowEcho):
    def step(self, turn):
        if "x" in turn:
            threading.Event().wait()
        return super().step(turn)


def test_slow_environments_step_concurrently_and_a_hung_one_ends_only_its_episode(tok, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    SlowEcho.log.clear()
    run = runner(tok, tmp_path, environment="test_tools:SlowEcho", max_turns=2)
    (group,) = run.generate(ScriptedTurns(tok, ["hello"]), [[1]], [{}], SamplingConfig(n=8, seed=0))
    assert len(SlowEcho.log) == 8 and max(s for s, _ in SlowEcho.log) < min(e for _, e in SlowEcho.log)
    assert all(c.extra["turns"] == 2 and c.extra["reward"] == 2.0 for c in group)
    run = runner(tok, tmp_path, environment="test_tools:Hangs", max_turns=2, timeout_s=0.2)
    turns = ScriptedTurns(tok, ["x"])
    (hung,) = run.generate(turns, [[1]], [{}], SamplingConfig(n=2, seed=0))
    assert all(c.extra["turns"] == 1 and c.extra["tool_errors"] == 1 for c in hung)


# ----------------------------------------------------------------------------------------------------------
# Training on episodes


def test_observation_tokens_get_no_loss_kl_or_entropy(tok, tmp_path, model_path):
    from fastgrpo.grpo import Rollout, prepare
    from fastgrpo.models import load_model
    from fastgrpo_kernels import fused_linear_grpo_loss

    cfg = load_config(GRPOConfig, None, [f"model.path={model_path}", "loss.beta=0.04", "loss.is_mode=sequence_truncate",
                                         "generation.num_generations=2", "train.micro_batch_tokens=64"])
    model = load_model(cfg.model, trainable=True, device=torch.device("cpu"))
    ref = load_model(cfg.model, trainable=False, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(8, 100, (n,), generator=g).tolist() for n in (30, 25)]
    masks = [[1] * 10 + [0] * 12 + [1] * 8, [1] * 25]
    rollout = Rollout([[1, 9, 10]] * 2, completions, [[-1.0 if m else 0.0 for m in mask] for mask in masks],
                      torch.tensor([False, False]), torch.tensor([1.0, 0.0]), torch.tensor([[1.0], [0.0]]),
                      loss_mask=masks)
    micro_batches, norms, _ = prepare(model, ref, rollout, torch.tensor([1.0, -1.0]), cfg)
    assert norms["num_items"] == 10 + 8 + 25
    (mb,) = micro_batches
    assert mb.mask.tolist() == [float(m) for s in mb.packed.seq_indices.tolist() for m in masks[s]]
    observation = mb.mask == 0
    # a sequence's IS weight is the product of its sampled tokens' ratios alone (the observations have none)
    first = mb.packed.seq_of_token[mb.rows] == mb.packed.seq_indices.tolist().index(0)
    expected = (mb.old_logp[first & ~observation] + 1.0).sum().exp().clamp(max=cfg.loss.is_clip_max)
    assert torch.allclose(mb.is_weights[first], expected.expand(int(first.sum())))
    hidden = torch.randn(len(mb.rows), model.config.hidden_size, requires_grad=True)
    head, targets = model.get_output_embeddings().weight, mb.packed.targets[mb.rows]
    config = cfg.loss.to_kernel(1.0, cfg.generation.max_completion_length)
    loss, metrics = fused_linear_grpo_loss(hidden, head, targets, mb.advantages, mb.mask, mb.old_logp, mb.ref_logp,
                                           config, is_weights=mb.is_weights, cu_seqlens=mb.cu_seqlens, **norms)
    loss.backward()
    assert hidden.grad[observation].abs().max() == 0 and hidden.grad[~observation].abs().max() > 0
    # the KL and entropy metrics are the sampled tokens' alone: change the observation rows and they stay
    moved = hidden.detach().clone()
    moved[observation] += 5.0
    ref_moved = mb.ref_logp.clone()
    ref_moved[observation] -= 3.0
    again, metrics2 = fused_linear_grpo_loss(moved, head, targets, mb.advantages, mb.mask, mb.old_logp, ref_moved,
                                             config, is_weights=mb.is_weights, cu_seqlens=mb.cu_seqlens, **norms)
    assert torch.allclose(again, loss) and all(torch.allclose(torch.as_tensor(metrics[k]),
                                                              torch.as_tensor(metrics2[k])) for k in ("kl", "entropy"))


def tool_run_args(model_path, run_dir, steps, *extra):
    return [f"model.path={model_path}", f"log.run_dir={run_dir}", "log.tensorboard=false", "log.save_every=1",
            "data.source=builtin:multiply", "data.num_examples=64", "data.max_prompt_length=64",
            "generation.backend=hf", "generation.num_generations=4", "generation.max_completion_length=100",
            "train.prompts_per_step=2", f"train.steps={steps}", "train.lr=3e-3", "tools.environment=test_tools:Echo",
            "tools.max_turns=3", "tools.max_turn_tokens=10", "rewards.funcs=[environment]", "rewards.weights=[1.0]", "loss.beta=0.04",
            "loss.tis_cap=2.0", *extra]


class Echo:
    """Answers every turn with its length (episodes run to max_turns) and scores the episode by its last turn."""

    tools = []

    def reset(self, **row):
        return None

    def step(self, turn):
        return Step([{"role": "tool", "name": "echo", "content": str(len(turn))}], reward=float(len(turn) % 5), calls=1)


def test_a_killed_multi_turn_run_resumes_to_the_uninterrupted_one(model_path, tmp_path, monkeypatch):
    from test_iterative import kill_mid_run, untimed

    from fastgrpo.grpo import train

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    straight = train(load_config(GRPOConfig, None, tool_run_args(model_path, tmp_path / "straight", 5)))
    assert all(h["episode/turns_mean"] > 1 and h["episode/observation_tokens_mean"] > 0 for h in straight)
    assert all(math.isfinite(h["loss/kl"]) and h["reward/std"] > 0 for h in straight)
    killed = tmp_path / "killed"
    kill_mid_run(tool_run_args(model_path, killed, 5), killed, last="step-00000005")
    resumed = train(load_config(GRPOConfig, None, tool_run_args(model_path, killed, 5)))
    assert untimed(resumed) == untimed(straight)


def test_bad_tool_config_is_one_line(model_path, tmp_path):
    from fastgrpo.grpo import train

    for bad, message in (("tools.funcs=[no_such_module:f]", "tools.funcs='no_such_module:f' cannot be loaded"),
                         ("tools.funcs=[nocolon]", "expected module:attribute"),
                         ("tools.environment=os:sep", "tools.environment='os:sep'")):
        with pytest.raises(ValueError, match=message):
            train(load_config(GRPOConfig, None, [*tool_run_args(model_path, tmp_path / bad[:12], 1), bad]))


def test_vllm_continues_episodes_from_their_ids_with_the_trainers_log_probs(tok, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from fastgrpo.generation import VLLMGenerator

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    model_path = str(build_tiny_model(tmp_path / "qwen2"))  # vLLM's CPU attention needs head_dim 32 or more
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    gen = VLLMGenerator(model_path, model, sync="zero_copy", dtype="float32", max_model_len=256, kv_cache_gib=0.05)
    cfg = load_config(GRPOConfig, None, [f"model.path={model_path}", "tools.environment=test_tools:Echo",
                                         "tools.max_turns=3", "tools.max_turn_tokens=20",
                                         "generation.max_completion_length=150"])
    prompt = [1, 4, 30, 31, 32, 5]
    (group,) = EpisodeRunner(cfg.tools, tok, tok.eos_token_id, max_tokens=150).generate(
        gen, [prompt], [{}], SamplingConfig(n=4, temperature=0.8, max_tokens=150, seed=3))
    assert all(c.extra["turns"] == 3 for c in group)
    for c in group:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1].float() / 0.8
        trainer = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        sampled = torch.tensor(c.extra["mask"]) == 1
        assert (trainer[sampled] - torch.tensor(c.logprobs)[sampled]).abs().max() < 1e-4


def test_evaluation_runs_the_same_episodes(model_path, tmp_path, monkeypatch, capsys):
    from fastgrpo import evaluate

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "results.json"
    evaluate.main([model_path, "backend=hf", "tools.environment=test_tools:Echo", "tools.max_turns=2",
                   "tools.max_turn_tokens=5", "data.source=builtin:multiply", "data.eval_examples=3", "k=2",
                   "max_completion_length=60", f"out={out}"])
    results = json.loads(out.read_text())
    assert results["turns"] == 2 and results["prompts"] == 3 and "tool_call_share" in results
    assert "pass@1" in capsys.readouterr().out


def test_the_pipelines_rl_stages_and_evaluation_take_tools(tmp_path):
    from fastgrpo.config import load_cli_config
    from fastgrpo.pipeline import PipelineConfig, eval_config, stage_config

    cfg = load_cli_config(PipelineConfig, [
        f"run_dir={tmp_path}", "base.path=m", "reasoning_rl.model.path=m", "helpfulness_rl.model.path=m",
        "helpfulness_rl.rewards.reward_model=rm", "reasoning_rl.tools.funcs=[calculator]",
        "reasoning_rl.tools.max_turns=2", "eval.tools.funcs=[calculator]", "helpfulness_rl.tools.environment=test_tools:Echo"])
    assert stage_config(cfg, "reasoning_rl").tools.funcs == ["calculator"]
    assert stage_config(cfg, "reasoning_rl").tools.max_turns == 2
    assert stage_config(cfg, "helpfulness_rl").tools.environment == "test_tools:Echo"
    assert eval_config(cfg, "model", tmp_path / "eval.json").tools.funcs == ["calculator"]


def test_rewards_score_what_the_model_wrote_not_what_a_tool_answered(tok, tmp_path):
    from fastgrpo.grpo import score_share
    from fastgrpo.rewards import accuracy_reward

    cfg = load_config(GRPOConfig, None, [f"model.path={tmp_path}", "generation.num_generations=1"])
    row = {"prompt": "6*7=", "answer": "42"}
    for last, right in (("I called it.", 0.0), ("Answer: 42", 1.0)):
        (group,) = runner(tok, tmp_path).generate(ScriptedTurns(tok, [CALL, last]), [[1]], [row],
                                                  SamplingConfig(n=1, seed=0))
        scores = score_share([([1], row)], group, tok, [accuracy_reward], [1.0], cfg)
        assert scores.rewards.tolist() == [right], last  # the tool's "42" is in the episode, not in the model's text
