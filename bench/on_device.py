"""pytest plugin: the kernel tests, written for CPU tensors, run on another device (bench/gpu_check.py's CUDA part).

    FASTGRPO_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest -p on_device tests/kernels    # bench/ on sys.path

tests/kernels build every input on the CPU (seeded CPU generators, `torch.autocast("cpu")`) and have no device
option. Under this plugin the tensors that the test files themselves create go to FASTGRPO_TEST_DEVICE instead,
drawn from the same CPU generators (the same numbers as on the CPU), and their `torch.autocast("cpu")` becomes the
device's. Calls from anywhere else are left alone: a tensor the library creates without a device stays on the CPU
and fails there, as it would in a user's program.

FASTGRPO_TEST_RESULTS=path appends one JSON line per test outcome to `path` as the session runs (a run cut short
keeps what it reached), and a last line with how many Triton kernels were compiled.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

TORCH_DIR = str(Path(torch.__file__).resolve().parent)
FACTORIES = {torch.randn, torch.rand, torch.randint, torch.randperm, torch.zeros, torch.ones, torch.full, torch.empty,
             torch.arange, torch.tensor, torch.as_tensor, torch.linspace, torch.eye}


def called_from_a_test() -> bool:
    """Whether the first frame outside torch and this file is a test module's (test_*.py or conftest.py)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(TORCH_DIR) and name != __file__:
            base = os.path.basename(name)
            return base.startswith("test_") or base == "conftest.py"
        frame = frame.f_back
    return False


class ToDevice(TorchFunctionMode):
    """Factory calls from test modules that name no device create their tensor on `device`."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in FACTORIES or kwargs.get("device") is not None or not called_from_a_test():
            return func(*args, **kwargs)
        generator = kwargs.get("generator")
        if generator is not None and generator.device != self.device:
            # drawn where the generator lives, then moved: the same values as the CPU run of the test
            requires_grad = kwargs.pop("requires_grad", False)
            return func(*args, **kwargs).to(self.device).requires_grad_(requires_grad)
        return func(*args, **{**kwargs, "device": self.device})


def autocast_on(device: torch.device) -> type:
    """torch.autocast, with a test module's "cpu" meaning `device`."""

    class Autocast(torch.autocast):
        def __init__(self, device_type, *args, **kwargs):
            if device_type == "cpu" and called_from_a_test():
                device_type = device.type
            super().__init__(device_type, *args, **kwargs)

    return Autocast


@contextmanager
def on_device(device):
    """Within it, test modules' tensors and autocast regions are on `device`."""
    device = torch.device(device)
    original = torch.autocast
    torch.autocast = autocast_on(device)
    try:
        with ToDevice(device):
            yield
    finally:
        torch.autocast = original


def compiled_kernels() -> int | None:
    """Triton kernels compiled so far for fastgrpo_kernels' JIT functions (None under the interpreter, which
    compiles nothing)."""
    total, found = 0, False
    for name, module in list(sys.modules.items()):
        if not name.startswith("fastgrpo_kernels") or module is None:
            continue
        for obj in vars(module).values():
            caches = getattr(obj, "device_caches", None)
            if isinstance(caches, dict):
                found = True
                total += sum(len(entry[0]) for entry in caches.values())
    return total if found else None


_session = {}


def _record(line: dict) -> None:
    path = os.environ.get("FASTGRPO_TEST_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def pytest_sessionstart(session):
    device = os.environ.get("FASTGRPO_TEST_DEVICE", "cpu")
    _session["context"] = on_device(device)
    _session["context"].__enter__()


def pytest_sessionfinish(session, exitstatus):
    _session.pop("context").__exit__(None, None, None)
    _record({"session": True, "exitstatus": int(exitstatus), "compiled_kernels": compiled_kernels()})


def pytest_collectreport(report):
    if report.failed:
        _record({"test": report.nodeid, "when": "collect", "outcome": "error", "seconds": 0.0,
                 "message": _message(report)})


def _message(report) -> str:
    text = getattr(report, "longreprtext", "") or str(report.longrepr or "")
    lines = [line for line in text.splitlines() if line.startswith("E ")] or text.splitlines()[-1:]
    return " | ".join(line.strip() for line in lines[:3])[:500]


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _record({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                 "seconds": round(report.duration, 3), "message": None if report.passed else _message(report)})
