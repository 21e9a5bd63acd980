"""Tools and environments for multi-turn rollouts (fastgrpo/episodes.py).

A tool is a plain Python function with type hints and a Google-style docstring, as TRL's `tools=` takes them: its
JSON schema (transformers' get_json_schema) is what the chat template describes to the model. The model calls it
in its own turn, in the Qwen2.5 / Hermes format the templates of those models teach:

    <tool_call>{"name": "calculator", "arguments": {"expression": "347*86"}}</tool_call>

An Environment is the general multi-turn task: given the model's turn, it returns the next observation (messages
the chat template renders), whether the episode is done, and optionally a reward. ToolEnvironment is the common case:
it runs the turn's tool calls and ends the episode on a turn without one. A TRL `environment_factory` object (a
`reset(**row)` method, public methods that are its tools, optionally `get_reward()`) is wrapped by ToolEnvironment
as it is.

Nothing a model writes can fail a step: a malformed call, an unknown tool, a tool that raises or runs past its time
limit each return an error observation ({"error": ...}, as TRL returns them) and the episode goes on.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolCall:
    name: str | None
    arguments: dict
    error: str | None = None  # why the call could not be read; name and arguments then mean nothing


def parse_tool_calls(turn: str) -> list[ToolCall]:
    """The calls in a decoded turn, in order; an unclosed or unreadable one is a ToolCall with its error.

    >>> parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    [ToolCall(name='f', arguments={'x': 1}, error=None)]
    >>> parse_tool_calls('<tool_call>{"name": "f"')[0].error
    'malformed tool call: not JSON'
    """
    calls = []
    for match in TOOL_CALL.finditer(turn):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            calls.append(ToolCall(None, {}, "malformed tool call: not JSON"))
            continue
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            calls.append(ToolCall(None, {}, 'malformed tool call: need {"name": str, "arguments": {...}}'))
            continue
        calls.append(ToolCall(call["name"], arguments))
    return calls


def tool_schema(func: Callable) -> dict:
    """The JSON schema the chat template shows the model, from the function's signature and docstring."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(func)
    except Exception as e:  # transformers raises its own DocstringParsingException / TypeHintParsingException
        raise ValueError(f"tool {getattr(func, '__name__', func)!r} cannot be described to the model: {e}") from None


def run_bounded(funcs: list[Callable], timeout_s: float, limit: int) -> list[tuple[bool, object]]:
    """(True, result) or (False, an error message) per function: each runs in a thread of its own, at most `limit`
    at once, each with timeout_s from its start. A function still running then is abandoned: its thread is a daemon,
    so a tool that never returns cannot hold the step or keep the process alive."""
    out: list = [None] * len(funcs)
    changed = threading.Condition()

    def run(i):
        try:
            result = (True, funcs[i]())
        except Exception as e:
            result = (False, f"{type(e).__name__}: {e}")
        with changed:
            if out[i] is None:
                out[i] = result
            changed.notify_all()

    pending, running = deque(range(len(funcs))), {}  # running: index -> deadline
    with changed:
        while pending or running:
            while pending and len(running) < max(limit, 1):
                i = pending.popleft()
                running[i] = time.monotonic() + timeout_s
                threading.Thread(target=run, args=(i,), daemon=True, name="fastgrpo-tool").start()
            now = time.monotonic()
            for i in [i for i, deadline in running.items() if out[i] is not None or deadline <= now]:
                if out[i] is None:
                    out[i] = (False, f"timed out after {timeout_s:g} s")
                del running[i]
            if running and not (pending and len(running) < limit):
                changed.wait(max(0.0, min(running.values()) - now))
    return out


@dataclass
class Step:
    """What an environment answers a turn with."""

    messages: list[dict] = field(default_factory=list)  # the observation: chat messages (role "tool" or "user")
    done: bool = False
    reward: float | None = None  # the episode's reward, where the environment scores it (the last one given counts)
    calls: int = 0  # tool calls answered (metrics)
    errors: int = 0  # of which failed: malformed, unknown, raised or timed out


class Environment(Protocol):
    """A multi-turn task, one instance per episode."""

    tools: list[Callable]  # described to the model in the prompt (may be empty)

    def reset(self, **row) -> str | None:
        """Start from a dataset row; a string returned is appended to the prompt's last user message (TRL's rule)."""

    def step(self, turn: str) -> Step:
        """The next observation after the model's (decoded) turn."""

    # optional: final_reward() -> float | None, called once when the episode has ended (however it ended)


class ToolEnvironment:
    """Runs the tool calls of each turn, concurrently, each within `timeout_s`; a turn without a call ends the episode.

    `owner`: a TRL-style environment object whose reset(**row) and get_reward() are used where it has them.
    """

    def __init__(self, tools: list[Callable], timeout_s: float = 10.0, owner=None):
        self.tools, self.timeout_s, self.owner = list(tools), timeout_s, owner
        self.by_name = {t.__name__: t for t in self.tools}

    @classmethod
    def wrapping(cls, owner, extra_tools: list[Callable] = (), timeout_s: float = 10.0) -> ToolEnvironment:
        """A TRL environment_factory object: its public methods (besides reset and get_reward) are its tools."""
        methods = [getattr(owner, name) for name, _ in inspect.getmembers(type(owner), inspect.isfunction)
                   if not name.startswith("_") and name not in ("reset", "get_reward")]
        return cls([*extra_tools, *methods], timeout_s, owner)

    def reset(self, **row) -> str | None:
        return self.owner.reset(**row) if hasattr(self.owner, "reset") else None

    def final_reward(self) -> float | None:
        """The owner's get_reward() once the episode has ended, however it ended (TRL calls it once per rollout)."""
        return self.owner.get_reward() if hasattr(self.owner, "get_reward") else None

    def step(self, turn: str) -> Step:
        calls = parse_tool_calls(turn)
        if not calls:
            return Step(done=True)
        results = run_bounded([lambda c=c: self._call(c) for c in calls], self.timeout_s, len(calls))
        return Step([{"role": "tool", "name": c.name or "unknown",
                      "content": value if ok else json.dumps({"error": value})}
                     for c, (ok, value) in zip(calls, results)],
                    calls=len(calls), errors=sum(not ok for ok, _ in results))

    def _call(self, call: ToolCall) -> str:
        if call.error is not None:
            raise ValueError(call.error)
        if call.name not in self.by_name:
            raise ValueError(f"unknown tool {call.name!r} (tools: {', '.join(self.by_name) or 'none'})")
        return str(self.by_name[call.name](**call.arguments))


# ----------------------------------------------------------------------------------------------------------
# Built-in tools

_ARITHMETIC = re.compile(r"[\d\s+\-*/().%]+")


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression of integers with + - * / // % ** and parentheses.

    Args:
        expression: The expression, e.g. "347*86".
    """
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.USub: operator.neg, ast.UAdd: operator.pos}

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return ops[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {expression!r}")

    if len(expression) > 200 or not _ARITHMETIC.fullmatch(expression):
        raise ValueError(f"not arithmetic: {expression!r}")
    result = value(ast.parse(expression, mode="eval").body)
    return str(int(result)) if float(result).is_integer() else str(result)


class PythonTool:
    """Runs a program in the code reward's sandbox (fastgrpo/sandbox.py: isolated, resource-limited) and returns
    what it printed. Started on first use; close() stops its workers."""

    def __init__(self, cfg=None):
        from .config import CodeConfig

        self.cfg, self.box, self.lock = cfg or CodeConfig(), None, threading.Lock()

    def __call__(self, code: str) -> str:
        with self.lock:
            if self.box is None:
                from .sandbox import Sandbox

                self.box = Sandbox(self.cfg)
        output = self.box.execute(code)
        return output.stdout if output.status == "ok" else json.dumps({"error": output.status,
                                                                         "stderr": output.stderr[-500:]})

    def close(self) -> None:
        if self.box is not None:
            self.box.close()


def python_tool(box: PythonTool) -> Callable:
    def python(code: str) -> str:
        """Runs a Python program in a sandbox and returns what it printed.

        Args:
            code: The program; print what you need to see.
        """
        return box(code)

    return python


def load_object(spec: str, what: str):
    """`module:attribute` imported (the user's own code, named in their config)."""
    module, _, attribute = spec.partition(":")
    if not module or not attribute:
        raise ValueError(f"{what}={spec!r}: expected module:attribute")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what}={spec!r} cannot be loaded: {e}") from None
