"""Multi-turn rollouts, token in / token out: episodes of model turns and tool (environment) observations.

An episode's tokens after its prompt are exactly: each turn's tokens as the generator sampled them, then each
observation's tokens as the chat template renders them, appended to the ids. Nothing is decoded and re-encoded: a
turn is decoded only to read its tool calls, and the next turn continues from the token ids themselves (vLLM's
prefix cache keeps the history's KV within a step, so a turn does not re-prefill it). Observation tokens carry
mask 0: no loss, KL or entropy, and their log-probs are not the model's; sampled tokens keep the generator's
log-probs, so truncated importance sampling works across turns.

Rounds: every live episode of the rank's share samples its next turn in one generate call, then the environments'
steps (the turns' tool calls) run concurrently, at most tools.max_concurrency at once, each within tools.timeout_s.
Every call is as deterministic as its tools: turn t of episode k samples with its own seed, so an episode's tokens do
not depend on the others, and a resumed run reproduces an uninterrupted one.

Limits: tools.max_turns model turns; generation.max_completion_length tokens after the prompt, turns and
observations together (a turn reaching it is truncated as a single-turn completion is, finish_reason "length"; an
observation that does not fit is cut and ends the episode, also "length"); tools.max_turn_tokens per turn (a turn
reaching it is handed to the environment as it is, and the observation starts with the end-of-turn token that
closes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import CodeConfig, GRPOConfig, ToolsConfig
from .data import decode, encode_prompt
from .generation import Completion, SamplingConfig
from .tools import PythonTool, ToolEnvironment, calculator, load_object, python_tool, run_bounded, tool_schema

TURN_SEED_STRIDE = 2**36  # turn t of an episode samples with its seed + t * stride: no two draws of a run share one
PROBE = "\x00fastgrpo-turn\x00"  # an assistant turn's content, to find where the template ends a turn
STEP_GRACE_S = 1.0  # beyond tools.timeout_s, before an environment step (its calls time-boxed already) is abandoned


class ObservationRenderer:
    """Token ids of an observation (messages after a sampled turn), rendered by the tokenizer's chat template.

    The template renders [user, assistant, *messages] plus the next assistant header; the tokens after the assistant
    turn's end are the observation. What the template puts after the turn-ending token (Qwen's "\\n" after
    <|im_end|>) belongs to the observation too, since the sampled turn stops at that token.
    """

    def __init__(self, tokenizer, end_token_id: int):
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("multi-turn rollouts need a tokenizer with a chat template (it renders observations)")
        self.base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": PROBE}]
        rendered = self._render(self.base, False)
        after = rendered[rendered.rindex(PROBE) + len(PROBE):]
        end = tokenizer.decode([end_token_id])
        if not after.startswith(end):
            raise ValueError(f"the chat template ends an assistant turn with {after!r}, not with the end-of-turn "
                             f"token {end!r} that generation stops at")
        self.lead, self.base_text = after[len(end):], rendered
        probe = self._render(self.base + [{"role": "tool", "name": "t", "content": "x"}], True)
        if not probe.startswith(rendered) or "x" not in probe[len(rendered):]:
            raise ValueError("the tokenizer's chat template does not render tool messages after an assistant turn")

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def ids(self, messages: list[dict]) -> list[int]:
        text = self._render(self.base + messages, True)
        if not text.startswith(self.base_text):
            raise ValueError("the tokenizer's chat template is not prefix-consistent: the rendering of a conversation "
                             "changes when messages are added after it")
        return self.tokenizer(self.lead + text[len(self.base_text):], add_special_tokens=False)["input_ids"]


@dataclass
class Episode:
    prompt_ids: list[int]
    environment: object
    seed: int
    ids: list[int] = field(default_factory=list)  # after the prompt: sampled and observation tokens
    logprobs: list[float] = field(default_factory=list)  # the generator's for sampled tokens; 0.0 for observations
    mask: list[int] = field(default_factory=list)  # 1: sampled, 0: observation
    turns: int = 0
    turn_start: int = 0  # where the last sampled turn starts in ids
    turn_cut: bool = False  # the last turn stopped at tools.max_turn_tokens, not at its end-of-turn token
    tool_calls: int = 0
    tool_errors: int = 0
    finish_reason: str = "stop"
    reward: float | None = None
    done: bool = False

    def add(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.ids += ids
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.mask += [1 if logprobs is not None else 0] * len(ids)

    def completion(self, index: int) -> Completion:
        return Completion(self.ids, self.logprobs, self.finish_reason, index,
                          {"mask": self.mask, "turns": self.turns, "tool_calls": self.tool_calls,
                           "tool_errors": self.tool_errors, "reward": self.reward})


class EpisodeRunner:
    """Runs episodes on a generator (VLLMGenerator or HFGenerator: anything with generate_each).

    max_tokens: each episode's tokens after its prompt (generation.max_completion_length); prompt_column: the rows'
    prompt (an environment's reset text is appended to it); code: the python tool's sandbox settings.
    """

    def __init__(self, limits: ToolsConfig, tokenizer, end_token_id: int, max_tokens: int,
                 prompt_column: str = "prompt", code: CodeConfig | None = None):
        self.limits, self.tokenizer, self.max_tokens, self.prompt_column = limits, tokenizer, max_tokens, prompt_column
        self.renderer, self.end_token_id = ObservationRenderer(tokenizer, end_token_id), end_token_id
        self.python = PythonTool(code) if "python" in limits.funcs else None
        self.tools = [self._tool(name) for name in limits.funcs]
        self.factory = None if limits.environment is None else load_object(limits.environment, "tools.environment")
        if self.factory is not None and not callable(self.factory):
            raise ValueError(f"tools.environment={limits.environment!r} is not callable (a class or factory)")
        self.schemas = [tool_schema(t) for t in getattr(self.environment(), "tools", [])]

    def _tool(self, name: str):
        if name == "calculator":
            return calculator
        if name == "python":
            return python_tool(self.python)
        tool = load_object(name, "tools.funcs")
        if not callable(tool):
            raise ValueError(f"tools.funcs: {name!r} is not a function")
        return tool

    def environment(self):
        """A fresh environment for one episode."""
        if self.factory is None:
            return ToolEnvironment(self.tools, self.limits.timeout_s)
        made = self.factory()
        if hasattr(made, "step"):
            return made
        return ToolEnvironment.wrapping(made, self.tools, self.limits.timeout_s)

    def generate(self, generator, prompts: list[list[int]], rows: list[dict], sampling: SamplingConfig
                 ) -> list[list[Completion]]:
        """sampling.n episodes per prompt, as generator.generate lays out completions; sample j of prompt i seeded
        as a single-turn rollout seeds it (sampling.seed + i * n + j) on its first turn."""
        base = 0 if sampling.seed is None else sampling.seed
        episodes = [self.start(ids, row, base + i * sampling.n + j)
                    for i, (ids, row) in enumerate(zip(prompts, rows)) for j in range(sampling.n)]
        for turn in range(self.limits.max_turns):
            live = [e for e in episodes if not e.done]
            if not live:
                break
            self.sample_turn(generator, live, sampling, turn)
            self.observe([e for e in live if not e.done], last=turn + 1 == self.limits.max_turns)
        for e in episodes:
            final = getattr(e.environment, "final_reward", None)
            if final is not None and (reward := final()) is not None:
                e.reward = reward
        n = sampling.n
        return [[e.completion(i) for e in episodes[i * n:(i + 1) * n]] for i in range(len(prompts))]

    def start(self, prompt_ids: list[int], row: dict, seed: int) -> Episode:
        environment = self.environment()
        extra = environment.reset(**row)
        if extra:  # TRL's rule: appended to the prompt's last user message
            prompt = row[self.prompt_column]
            prompt = prompt + extra if isinstance(prompt, str) else \
                [*prompt[:-1], {**prompt[-1], "content": prompt[-1]["content"] + extra}]
            prompt_ids = encode_prompt(self.tokenizer, prompt, self.schemas)
        return Episode(prompt_ids, environment, seed)

    def sample_turn(self, generator, live: list[Episode], sampling: SamplingConfig, turn: int) -> None:
        """One turn of each live episode; one reaching the episode's token budget ends it, truncated, and one
        reaching tools.max_turn_tokens goes to its environment as it is."""
        budget, cap = self.max_tokens, self.limits.max_turn_tokens or 2**62
        rooms = [budget - len(e.ids) for e in live]
        outputs = generator.generate_each([e.prompt_ids + e.ids for e in live], sampling,
                                          [e.seed + turn * TURN_SEED_STRIDE for e in live],
                                          [min(room, cap) for room in rooms])
        for e, c, room in zip(live, outputs, rooms):
            e.turn_start = len(e.ids)
            e.add(c.token_ids, c.logprobs)
            e.turns += 1
            e.turn_cut = c.finish_reason == "length"
            if e.turn_cut and len(c.token_ids) == room:
                e.done, e.finish_reason = True, "length"

    def observe(self, stepping: list[Episode], last: bool) -> None:
        """The environments' answers to the turns just sampled, run concurrently; on the last turn the episodes end
        (what a tool would have answered is not seen by the model, so it is not run)."""
        if last:
            for e in stepping:
                e.done = True
            return
        turns = [decode(self.tokenizer, e.ids[e.turn_start:]) for e in stepping]
        steps = run_bounded([lambda e=e, t=t: e.environment.step(t) for e, t in zip(stepping, turns)],
                            self.limits.timeout_s + STEP_GRACE_S, self.limits.max_concurrency)
        for e, (ok, step) in zip(stepping, steps):
            if not ok:  # the environment itself failed or hung: its state cannot be trusted, the episode ends
                e.tool_errors += 1
                e.done = True
                continue
            e.reward = step.reward if step.reward is not None else e.reward
            e.tool_calls += step.calls
            e.tool_errors += step.errors
            if step.done:
                e.done = True
                continue
            # a turn cut at tools.max_turn_tokens is closed by the observation, with the end-of-turn token
            closing = [self.end_token_id] if e.turn_cut else []
            self.append_observation(e, closing + self.renderer.ids(step.messages))

    def append_observation(self, e: Episode, ids: list[int]) -> None:
        room = self.max_tokens - len(e.ids)
        if len(ids) >= room:  # no room for the observation and a turn after it
            e.add(ids[:room], None)
            e.done, e.finish_reason = True, "length"
            return
        e.add(ids, None)

    def close(self) -> None:
        if self.python is not None:
            self.python.close()


def sampled_ids(c: Completion) -> list[int]:
    """The tokens the model wrote: a multi-turn episode's turns (its observations left out); a completion's all."""
    mask = c.extra.get("mask")
    return c.token_ids if mask is None else [t for t, m in zip(c.token_ids, mask) if m]


def tools_enabled(cfg: ToolsConfig) -> bool:
    return bool(cfg.funcs) or cfg.environment is not None


def episode_runner(cfg: GRPOConfig, tokenizer) -> EpisodeRunner | None:
    """A GRPO run's multi-turn runner; None where it has no tools or environment."""
    if not tools_enabled(cfg.tools):
        return None
    return EpisodeRunner(cfg.tools, tokenizer, tokenizer.eos_token_id, cfg.generation.max_completion_length,
                         cfg.data.prompt_column, cfg.rewards.code)
