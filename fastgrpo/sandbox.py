"""Running a model's programs against test cases: isolated, resource-limited, on a pool of pre-started workers.

    with Sandbox(CodeConfig()) as box:
        box.run([Program("def f(x): return x + 1", ["assert f(1) == 2", "assert f(2) == 4"])])
        # -> [Result(passed=[True, False], status='ok')]

A worker is a long-lived `python -I -S` (sandbox_worker.py) that forks one child per program, so a program costs a
fork, not an interpreter start. Under bubblewrap (`bwrap`, where it runs) each worker sees a read-only /usr and the
interpreter's own install and nothing else of the machine's files; it has no network (an empty network namespace,
127.0.0.1 included), its own pid namespace, a private size-capped /tmp, and is killed with the trainer. Each program
then runs in a fresh directory of that /tmp, under limits on CPU time, address space, processes, file size (its
stdout and stderr are files) and open files, within a wall-clock timeout for all its cases; when the trainer runs
as root the program also drops to a uid of its own, so that its directory is the only place it can write and the
process limit holds. Whatever a program leaves running is killed before the worker takes the next one.

Without bubblewrap (isolation=auto) programs run with the same limits and timeout but see the machine's files as
their uid may, and the network: one line on stderr says so. isolation=bwrap refuses to run without it.
What no mode does: hide the tests from a program that searches its own process memory for them.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .config import CodeConfig

WORKER_SOURCE = (Path(__file__).parent / "sandbox_worker.py").read_text()
START_TIMEOUT_S = 30.0  # a worker's start (bwrap + interpreter): ~0.1 s, much more on a loaded machine
ANSWER_GRACE_S = 5.0  # beyond a job's timeout, what the worker may take to clean up before it counts as lost
# Uids that programs run under when the trainer is root: a block per process, one uid per worker.
_UIDS = itertools.count(0x40000000 + (os.getpid() % 65536) * 4096)


class SandboxError(RuntimeError):
    """The sandbox cannot run as configured; the message fits on one line."""


@dataclass
class Program:
    """`code` and its tests: assert statements run in the program's namespace, or (stdin, expected stdout) pairs."""

    code: str
    tests: list


@dataclass
class Result:
    passed: list[bool]  # one per test
    status: str  # ok | timeout | error | killed by <signal> | no tests | worker lost

    def score(self, scoring: str) -> float:
        """The fraction of tests passed, or (scoring="all") 1.0 if all passed, else 0.0."""
        if not self.passed:
            return 0.0
        return float(all(self.passed)) if scoring == "all" else sum(self.passed) / len(self.passed)


@dataclass
class Output:
    """What a program run alone (Sandbox.execute) printed, and its status (as Result's)."""

    stdout: str
    stderr: str
    status: str


def kind_of(tests: list) -> str:
    """"assert" for a list of statements, "stdio" for a list of (stdin, stdout) pairs; else a ValueError."""
    if all(isinstance(t, str) for t in tests):
        return "assert"
    if all(isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in tests):
        return "stdio"
    raise ValueError("tests must be assert statements (strings) or [stdin, stdout] pairs of strings")


def as_tests(value) -> list:
    """A dataset's `tests` value as Program.tests: a list of assert statements or of {"input", "output"} dicts or
    pairs, a single statement, or APPS' {"inputs": [...], "outputs": [...]} (also as a JSON string).

    >>> as_tests({"inputs": ["1\\n"], "outputs": ["2\\n"]})
    [('1\\n', '2\\n')]
    """
    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = json.loads(value)
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return list(zip(value["inputs"], value["outputs"], strict=True))
    return [(t["input"], t["output"]) if isinstance(t, dict) else tuple(t) if isinstance(t, list) else t
            for t in value]


class Sandbox:
    """A bounded pool of pre-started workers; `run` executes programs on them in parallel. Close it (or use `with`):
    its workers otherwise live until the trainer exits."""

    def __init__(self, cfg: CodeConfig):
        self.cfg = cfg
        self.num_workers = cfg.workers or len(os.sched_getaffinity(0))
        self.uid_switch = os.geteuid() == 0
        why_not = _bwrap_missing()
        if why_not is not None and cfg.isolation == "bwrap":
            raise SandboxError(f"rewards.code.isolation=bwrap, but bubblewrap cannot run here ({why_not}); "
                               f"install it (apt-get install bubblewrap) or set isolation=auto")
        if why_not is not None:
            who = "a uid of their own" if self.uid_switch else "this user"
            print(f"warning: sandbox: bubblewrap is not usable ({why_not}): programs run as {who} with resource "
                  f"limits only, seeing this machine's files and network as that uid may", file=sys.stderr, flush=True)
        self.isolated = why_not is None
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="sandbox")
        try:
            for worker in self._executor.map(lambda _: self._start(), range(self.num_workers)):
                self._idle.put(worker)
        except BaseException:
            self.close()
            raise

    def run(self, programs: list[Program]) -> list[Result]:
        """One Result per program, in order; each within the config's timeout (plus its cleanup)."""
        return list(self._executor.map(self._run_one, programs))

    def execute(self, code: str) -> Output:
        """Run a program once (no tests, stdin empty) under the same isolation and limits: what it printed (the
        Python tool of multi-turn rollouts)."""
        answer = self._ask({"code": code, "tests": [], "kind": "run", "nonce": secrets.token_hex(8)})
        return Output(answer.get("stdout", ""), answer.get("stderr", ""), answer["status"])

    def _run_one(self, program: Program) -> Result:
        if not program.tests:
            return Result([], "no tests")
        answer = self._ask({"code": program.code, "tests": program.tests, "kind": kind_of(program.tests),
                            "nonce": secrets.token_hex(8)})
        return Result([bool(p) for p in answer["passed"]] or [False] * len(program.tests), answer["status"])

    def _ask(self, job: dict) -> dict:
        worker = self._idle.get()
        try:
            return worker.ask(job, self.cfg.timeout_s + ANSWER_GRACE_S)
        except _WorkerLost:
            self._retire(worker)
            worker = self._start()
            return {"passed": [], "status": "worker lost"}
        finally:
            self._idle.put(worker)

    def _start(self) -> _Worker:
        uid = next(_UIDS) if self.uid_switch else None
        root = "/tmp" if self.isolated else tempfile.mkdtemp(prefix="fastgrpo-sandbox-")
        settings = {"root": root, "uid": uid, "pid_namespace": self.isolated, "timeout_s": self.cfg.timeout_s,
                    "cpu_s": self.cfg.cpu_s, "memory_bytes": self.cfg.memory_mb << 20,
                    "max_processes": self.cfg.max_processes, "max_output_bytes": self.cfg.max_output_bytes}
        python = [_python(), "-I", "-S", "-c", WORKER_SOURCE, json.dumps(settings)]
        argv = _bwrap_argv(self._tmpfs_bytes()) + python if self.isolated else python
        worker = _Worker(argv, None if self.isolated else root)
        worker.uid = uid
        with self._lock:
            self._workers.append(worker)
        return worker

    def _tmpfs_bytes(self) -> int:
        return max(64 << 20, 8 * self.cfg.max_output_bytes)

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._workers.remove(worker)

    def close(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.kill()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _WorkerLost(Exception):
    pass


class _Worker:
    """One worker process: a job line out, an answer line back, within a deadline."""

    def __init__(self, argv: list[str], host_root: str | None):
        self.host_root = host_root
        self.uid: int | None = None  # what its programs run as, if not the trainer's uid
        env = {"PATH": "/usr/bin:/bin"}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env,
                                     cwd=host_root or "/", start_new_session=True)
        self._pending = b""
        try:
            ready = self._read_line(time.monotonic() + START_TIMEOUT_S)
        except _WorkerLost:
            ready = b""
        if ready != b"ready":
            self.kill()
            raise SandboxError(f"a sandbox worker did not start (exit code {self.proc.poll()}): {' '.join(argv[:3])}")

    def ask(self, job: dict, timeout_s: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        except (OSError, ValueError) as e:  # a dead worker's pipe, or one closed by kill()
            raise _WorkerLost from e
        return json.loads(self._read_line(time.monotonic() + timeout_s))

    def _read_line(self, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _readable(fd, remaining):
                raise _WorkerLost
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _WorkerLost
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)  # bwrap and its namespace's init, or the bare worker and its children
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()
        if self.host_root:
            shutil.rmtree(self.host_root, ignore_errors=True)


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _python() -> str:
    """The base interpreter (not a venv's): its install is all a worker needs to see."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _bwrap_argv(tmpfs_bytes: int) -> list[str]:
    """bubblewrap's command line for a worker: new namespaces (no network), a read-only /usr and the interpreter's
    prefix, a private /tmp of `tmpfs_bytes`; as root, only the capabilities the worker needs to switch uid, own its
    jobs' directories and kill what they leave."""
    argv = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin"]
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    prefix = Path(os.path.realpath(sys.base_prefix))
    if not prefix.is_relative_to("/usr"):
        for parent in reversed(prefix.parents[:-1]):  # bwrap would create them 0700: unreadable to the program's uid
            argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", str(prefix), str(prefix)]
    argv += ["--dev", "/dev", "--proc", "/proc", "--size", str(tmpfs_bytes), "--perms", "0755", "--tmpfs", "/tmp",
             "--chdir", "/tmp"]
    if os.geteuid() == 0:
        argv += ["--cap-drop", "ALL"] + [a for cap in ("SETUID", "SETGID", "CHOWN", "FOWNER", "DAC_OVERRIDE", "KILL")
                                         for a in ("--cap-add", f"CAP_{cap}")]
    return argv + ["--"]


def _bwrap_missing() -> str | None:
    """None if bubblewrap runs a program here with the worker's namespaces, else why not (one line)."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    try:
        done = subprocess.run(_bwrap_argv(1 << 20) + [_python(), "-I", "-S", "-c", "pass"], capture_output=True,
                              timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "bwrap did not finish a trial run"
    if done.returncode != 0:
        return " ".join(done.stderr.decode(errors="replace").split()) or f"exit code {done.returncode}"
    return None


# ---------------------------------------------------------------------------------------------- the reward

PYTHON_FENCES = ("", "python", "py", "python3")  # the language tags of a fenced block that counts as Python


def extract_code(completion: str) -> str | None:
    """The last fenced Python block (```python, ```py or no language) of the completion's answer part (after its
    last </think>, if any); None if there is none. A block left open by truncation is no answer.

    >>> extract_code("<think>```python\\nx = 1\\n```</think> So:\\n```python\\ndef f(x): return x\\n```")
    'def f(x): return x\\n'
    """
    blocks, language, lines = [], None, None
    for line in completion.rpartition("</think>")[2].splitlines(keepends=True):
        if lines is None:
            if line.lstrip().startswith("```"):
                language, lines = line.strip()[3:].strip().lower(), []
        elif line.rstrip().endswith("```"):  # the closing fence, possibly after the block's last code
            lines.append(line[:line.rfind("```")])
            if language in PYTHON_FENCES:
                blocks.append("".join(lines).rstrip(" ") or None)
            lines = None
        else:
            lines.append(line)
    return next((b for b in reversed(blocks) if b), None)


class CodeReward:
    """TRL-style reward: the final fenced Python block of each completion, run in the sandbox against its row's
    `tests` column (see `as_tests`); scored as the fraction of tests passed, or all-or-nothing (CodeConfig.scoring).
    0.0 without a code block; None for a row without tests. The sandbox starts on the first call.

    >>> CodeReward()(prompts=["p"], completions=["```python\\ndef f(x): return 2 * x\\n```"],
    ...              tests=[["assert f(2) == 4", "assert f(3) == 5"]])                       # doctest: +SKIP
    [0.5]
    """

    __name__ = "code_reward"

    def __init__(self, cfg: CodeConfig | None = None):
        self.cfg = cfg or CodeConfig()
        if self.cfg.scoring not in ("fraction", "all"):
            raise ValueError(f"rewards.code.scoring must be 'fraction' or 'all', got {self.cfg.scoring!r}")
        if self.cfg.isolation not in ("auto", "bwrap"):
            raise ValueError(f"rewards.code.isolation must be 'auto' or 'bwrap', got {self.cfg.isolation!r}")
        self.sandbox: Sandbox | None = None

    def __call__(self, prompts, completions, completion_ids=None, tests=None, **kwargs):
        if tests is None:
            raise ValueError("code_reward needs the dataset column 'tests', which the batch does not have")
        # A group's G completions often hold the same program (more so as the policy converges): each distinct
        # (program, tests) runs once per call.
        programs, rows_of = {}, {}
        for i, t in enumerate(tests):
            text = completions[i] if isinstance(completions[i], str) else completions[i][-1]["content"]
            code = None if t is None else extract_code(text)
            if code is not None:
                program = Program(code, as_tests(t))
                key = json.dumps([program.code, program.tests])
                programs.setdefault(key, program)
                rows_of.setdefault(key, []).append(i)
        rewards = [None if t is None else 0.0 for t in tests]
        if programs:
            if self.sandbox is None:
                self.sandbox = Sandbox(self.cfg)
            for key, result in zip(programs, self.sandbox.run(list(programs.values())), strict=True):
                for i in rows_of[key]:
                    rewards[i] = result.score(self.cfg.scoring)
        return rewards

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None


