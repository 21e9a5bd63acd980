"""The one benchmark harness: times forward, backward and the full step, and measures peak memory honestly.

A benchmark file only builds inputs: a function `build(**params) -> Step` (raise `Skip` where the case cannot run
here). `run_case` runs that function in a FRESH Python process, so no case inherits another's allocator caches,
compiled kernels or imports, and reports one row (a dict):

    fwd_s, bwd_s, total_s   median over `repeats` steps after `warmup` steps (each step: forward, then backward)
    peak_extra_mib          the most memory any timed step needed above what was resident just before it:
                            on CUDA, torch.cuda.max_memory_allocated; on CPU, the kernel's RSS high-water mark
                            (VmHWM in /proc/self/status), reset before each step by writing "5" to
                            /proc/self/clear_refs, after glibc has returned freed heap pages (malloc_trim)
    tflops, gbps, tokens_per_s   the step's `flops`, `min_bytes` and `tokens` over total_s
    loss                    the forward's value, when it is a scalar: the cases of one shape must agree on it

`environment()` adds the machine, the library versions and the git commit to every row.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
ROW_MARKER = "BENCH_ROW "
PACKAGES = ("torch", "triton", "trl", "liger-kernel", "fastgrpo", "fastgrpo-kernels")


@dataclass
class Step:
    """One training step of the thing measured, split where the harness puts its clock."""

    forward: Callable[[], Any]  # returns what backward consumes (usually the loss)
    backward: Callable[[Any], None]
    params: list[torch.Tensor]  # leaves whose .grad is cleared before each step
    flops: float  # per full step, for TFLOP/s
    min_bytes: float  # memory traffic no exact method can avoid per full step, for GB/s
    tokens: int  # per step, for tokens/s
    info: dict | None = None  # extra fields the builder measured (copied into the row)


class Skip(Exception):
    """Raised by a builder for a case that cannot run on this machine; the row says why."""


# ----------------------------------------------------------------------------------------------------------
# Inside the fresh process.


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class _PeakMemory:
    """Peak memory of one step above what was resident when `start` was called."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.libc = None if self.cuda else ctypes.CDLL("libc.so.6")

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.libc.malloc_trim(0)  # freed small blocks would otherwise stay resident and hide the next step's use
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.base = _status_mib("VmRSS")

    def stop_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return _status_mib("VmHWM") - self.base


def measure(step: Step, device: torch.device, warmup: int, repeats: int) -> dict:
    """Run `warmup` untimed steps, then `repeats` timed ones; see the module docstring for the fields."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def clear_grads():
        for p in step.params:
            p.grad = None

    def one_step():
        sync()
        t0 = time.perf_counter()
        out = step.forward()
        sync()
        t1 = time.perf_counter()
        step.backward(out)
        sync()
        t2 = time.perf_counter()
        loss = float(out.detach()) if torch.is_tensor(out) and out.dim() == 0 else None
        return t1 - t0, t2 - t1, t2 - t0, loss

    for _ in range(warmup):
        one_step()
        clear_grads()
    memory = _PeakMemory(device)
    times, peaks = [], []
    for _ in range(repeats):
        memory.start()
        fwd, bwd, total, loss = one_step()
        peaks.append(memory.stop_mib())
        times.append((fwd, bwd, total))
        clear_grads()  # before the next baseline, so that baseline holds no gradients
    fwd, bwd, total = (statistics.median(t[i] for t in times) for i in range(3))
    return {
        "fwd_s": fwd,
        "bwd_s": bwd,
        "total_s": total,
        "total_s_all": [t[2] for t in times],
        "peak_extra_mib": max(peaks),
        "tflops": step.flops / total / 1e12,
        "gbps": step.min_bytes / total / 1e9,
        "tokens_per_s": step.tokens / total,
        "loss": loss,
    }


class Turns:
    """Whose turn it is, in a run of several processes taking turns (`run_interleaved`); inert otherwise.

    The processes form a ring of named pipes, one byte passed around: a process runs only while it holds the byte,
    so each one's steps are timed alone on the machine, and step k of every case runs within one round of the
    ring: whatever the machine is doing at the time slows the step of every case alike. `step()` is called at
    the start of each step: it hands the turn on, waits for it to come back, and records both moments.
    """

    ENV = "BENCH_TURNS"  # "<fifo dir>:<this process's index>:<number of processes>"

    def __init__(self):
        spec = os.environ.get(self.ENV)
        self.active = spec is not None
        self.released, self.acquired = [], []
        if self.active:
            folder, index, count = spec.rsplit(":", 2)
            self.mine = os.open(f"{folder}/{index}", os.O_RDWR)
            self.next = os.open(f"{folder}/{(int(index) + 1) % int(count)}", os.O_RDWR)

    def take(self) -> None:
        if self.active:
            os.read(self.mine, 1)

    def hand_on(self) -> None:
        if self.active:
            os.write(self.next, b".")

    def step(self) -> None:
        self.released.append(time.perf_counter())
        self.hand_on()
        self.take()
        self.acquired.append(time.perf_counter())

    def waits(self) -> list[float]:
        """Seconds each step start waited for the turn."""
        return [got - gave for gave, got in zip(self.released, self.acquired)]

    def step_s(self) -> list[float]:
        """Seconds each step held the turn, from its start to the next step's start (the last step has none)."""
        return [end - start for start, end in zip(self.acquired, self.released[1:])]


TURNS = Turns()


def _child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    module = importlib.import_module(spec["module"])
    params = spec["params"]
    TURNS.take()  # setup too runs alone
    try:
        try:
            step = getattr(module, spec["builder"])(**params)
        except Skip as why:
            print(ROW_MARKER + json.dumps({"skipped": str(why)}), flush=True)
            return
        result = measure(step, torch.device(params.get("device", "cpu")), spec["warmup"], spec["repeats"])
        result.update(step.info or {})
        print(ROW_MARKER + json.dumps(result), flush=True)
    finally:
        TURNS.hand_on()


# ----------------------------------------------------------------------------------------------------------
# In the parent.


def run_case(module: str, builder: str, params: dict, *, warmup: int = 1, repeats: int = 3,
             timeout_s: float | None = None) -> dict:
    """Build and measure `module.builder(**params)` in a fresh process; returns the measured fields, or
    {"skipped": why} / {"error": why}."""
    spec = {"module": module, "builder": builder, "params": params, "warmup": warmup, "repeats": repeats}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)], cwd=BENCH_DIR,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    return _row(proc.returncode, proc.stdout, proc.stderr)


def _row(returncode: int, stdout: str, stderr: str) -> dict:
    rows = [line[len(ROW_MARKER):] for line in stdout.splitlines() if line.startswith(ROW_MARKER)]
    if returncode != 0 or not rows:
        # -9 is the kernel's out-of-memory killer, the usual fate of a full-logits case at a large shape
        tail = stderr.strip().splitlines()[-3:]
        return {"error": f"exit code {returncode}: " + " | ".join(tail)}
    return json.loads(rows[-1])


def run_interleaved(module: str, builder: str, params: list[dict], *, timeout_s: float | None = None) -> list[dict]:
    """Like run_case for each of `params`, but all processes at once, taking turns (Turns): one row per case.

    The builder must call harness.TURNS.step() at the start of each step. Every process is alive for the whole
    run, so the machine must hold all of them; the turn of a process that has exited is passed on by this one.
    A process killed by a signal (the out-of-memory killer: -9) may have taken the turn with it, so that stops
    the run: the others are killed too, and their rows say so.
    """
    with tempfile.TemporaryDirectory(prefix="bench-turns-") as folder:
        n = len(params)
        for i in range(n):
            os.mkfifo(f"{folder}/{i}")
        pipes = [os.open(f"{folder}/{i}", os.O_RDWR) for i in range(n)]  # held open: bytes in them survive
        procs, logs = [], []
        for i, p in enumerate(params):
            spec = {"module": module, "builder": builder, "params": p, "warmup": 0, "repeats": 1}
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            env = {**os.environ, Turns.ENV: f"{folder}:{i}:{n}"}
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
                                          cwd=BENCH_DIR, stdout=out, stderr=err, text=True, env=env))
            logs.append((out, err))
        os.write(pipes[0], b".")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stopped = None
        while any(p.poll() is None for p in procs):
            killed = [i for i, p in enumerate(procs) if (p.poll() or 0) < 0]
            if killed or (deadline is not None and time.monotonic() > deadline):
                stopped = (f"stopped: case {killed[0]} was killed (exit code {procs[killed[0]].returncode})" if killed
                           else f"timed out after {timeout_s:.0f} s")
                for p in procs:
                    p.kill()
                break
            dead = [pipes[i] for i, p in enumerate(procs) if p.poll() is not None]
            ready, _, _ = select.select(dead, [], [], 0.05)  # with none dead, a 50 ms sleep
            for fd in ready:  # an exited process's turn: on to the next
                os.read(fd, 1)
                os.write(pipes[(pipes.index(fd) + 1) % n], b".")
        for fd in pipes:
            os.close(fd)
        rows = []
        for p, (out, err) in zip(procs, logs):
            out.seek(0)
            err.seek(0)
            row = _row(p.wait(), out.read(), err.read())
            rows.append({"error": stopped} if stopped and "error" in row else row)
        return rows


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=BENCH_DIR, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "uncommitted"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Machine, versions and commit, the same for every row of one run."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {p: _version(p) for p in PACKAGES},
        "commit": _git_commit(),
    }


if __name__ == "__main__":
    # Through the module, not __main__: builders raise harness.Skip, which is not __main__.Skip.
    importlib.import_module("harness")._child_main(sys.argv[1])
