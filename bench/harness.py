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
import statistics
import subprocess
import sys
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


def _child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    module = importlib.import_module(spec["module"])
    params = spec["params"]
    try:
        step = getattr(module, spec["builder"])(**params)
    except Skip as why:
        print(ROW_MARKER + json.dumps({"skipped": str(why)}), flush=True)
        return
    result = measure(step, torch.device(params.get("device", "cpu")), spec["warmup"], spec["repeats"])
    result.update(step.info or {})
    print(ROW_MARKER + json.dumps(result), flush=True)


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
    rows = [line[len(ROW_MARKER):] for line in proc.stdout.splitlines() if line.startswith(ROW_MARKER)]
    if proc.returncode != 0 or not rows:
        # -9 is the kernel's out-of-memory killer, the usual fate of a full-logits case at a large shape
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}
    return json.loads(rows[-1])


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
