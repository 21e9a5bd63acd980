"""scripts/gpu_check.sh, the GPU acceptance run: its dry run (every part at toy sizes on the CPU, the same code as on
the GPU) and its pieces: time boxes that keep partial results, and the plugin that moves the kernel tests' tensors
to the device."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
import on_device  # noqa: E402


@pytest.mark.slow
def test_dry_run_reports_every_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # OUT: the device tool's folder, copied to if set
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                         env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "GPU.json").read_text())
    text = (tmp_path / "GPU.md").read_text()
    assert report["dry_run"] and list(report["parts"]) == list(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("why"))
        assert f"| {name} | ok |" in text

    kernels = report["parts"]["kernels"]
    assert kernels["finished"] and kernels["counts"] == {"passed": 7} and not kernels["failures"]

    rows = report["parts"]["loss"]["rows"]
    measured = {(r["level"], r["impl"]) for r in rows if "total_s" in r}
    assert {("lm head + loss", i) for i in gpu_check.LOSS_CASES if i != "liger_triton"} <= measured
    assert {("logits only", i) for i in gpu_check.LOGITS_CASES if i != "liger_triton"} <= measured
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    assert max(losses) - min(losses) < 1e-4  # every implementation computes the same loss on the same inputs

    for name in ("step_0.5b", "step_1.5b"):
        part = report["parts"][name]
        assert len(part["steps"]) == gpu_check.SIZES["dry"]["step"]["steps"][name]
        for step in part["steps"]:
            assert math.isfinite(step["loss"]) and step["micro_batches"] >= 2 and step["time/generation"] > 0
        assert part["weights"]["finite"] and part["weights"]["tensors_changed"] == part["weights"]["tensors"]
        assert f"## GRPO step, {name.removeprefix('step_')} shape" in text
    assert [t for t in report["targets"] if t["target"].startswith("GRPO step at 0.5B")]


def _fake_part(monkeypatch, script: str):
    """run_part starts `script` instead of the part's own process (with the part's result path as argv[1])."""
    monkeypatch.setattr(gpu_check, "part_command",
                        lambda name, result, dry_run, sizes: ([sys.executable, "-c", script, str(result)], {}))


SIZES = {"boxes": {"loss": 3}, "reserve_s": 0, "min_box_s": 1}


def test_a_part_over_its_box_is_killed_with_its_children_and_keeps_its_results(tmp_path, monkeypatch):
    pid_file = tmp_path / "grandchild.pid"
    _fake_part(monkeypatch, f"""
import json, subprocess, sys, time
json.dump({{"rows": [{{"impl": "first"}}]}}, open(sys.argv[1], "w"))
child = subprocess.Popen(["sleep", "60"])  # a case process of the part's
open({str(pid_file)!r}, "w").write(str(child.pid))
time.sleep(60)
""")
    t0 = time.monotonic()
    part = gpu_check.run_part("loss", tmp_path, True, SIZES, deadline=time.monotonic() + 100)
    assert time.monotonic() - t0 < 15
    assert part["status"] == "timed out" and part["rows"] == [{"impl": "first"}]
    assert _ends_within(int(pid_file.read_text()), seconds=10)


def _ends_within(pid: int, seconds: float) -> bool:
    """Whether `pid` is gone (or a zombie, waiting to be reaped) within `seconds`: SIGKILL takes effect
    asynchronously, a moment later on a loaded machine."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_a_failing_part_reports_its_error_and_keeps_its_results(tmp_path, monkeypatch):
    _fake_part(monkeypatch, """
import json, sys
json.dump({"steps": [{"step": 0}]}, open(sys.argv[1], "w"))
raise SystemExit("torch.OutOfMemoryError: CUDA out of memory")
""")
    part = gpu_check.run_part("loss", tmp_path, True, SIZES, deadline=time.monotonic() + 100)
    assert part["status"] == "failed" and part["exit_code"] == 1 and part["steps"] == [{"step": 0}]
    assert "CUDA out of memory" in part["why"]


def test_a_part_without_time_left_is_skipped(tmp_path, monkeypatch):
    _fake_part(monkeypatch, "raise SystemExit('must not start')")
    part = gpu_check.run_part("loss", tmp_path, True, SIZES, deadline=time.monotonic() + 0.5)
    assert part["status"] == "skipped" and "out of time" in part["why"]


def test_tensors_from_test_modules_go_to_the_device_drawn_from_their_cpu_generator():
    library = compile("torch.zeros(2)", "/site-packages/somelib/ops.py", "eval")  # a call from outside the tests
    gen = torch.Generator().manual_seed(3)
    with on_device.ToDevice("meta"):
        x = torch.randn(4, 5, generator=gen, requires_grad=True)
        ids = torch.arange(7)
        kept = eval(library)
        explicit = torch.ones(2, device="cpu")
    assert x.device.type == ids.device.type == "meta" and x.shape == (4, 5) and x.requires_grad
    assert kept.device.type == explicit.device.type == "cpu"
    # drawn from `gen` on the CPU: the generator moved on exactly as a CPU draw of 20 values moves it
    assert torch.equal(gen.get_state(), _state_after_drawing(20, seed=3))


def _state_after_drawing(n, seed):
    g = torch.Generator().manual_seed(seed)
    torch.randn(n, generator=g)
    return g.get_state()


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_cpu_in_a_test_module_is_the_devices():
    autocast = on_device.autocast_on(torch.device("cuda"))
    assert autocast("cpu", dtype=torch.bfloat16).device == "cuda"
    from_library = eval(compile("autocast('cpu', dtype=torch.bfloat16)", "/site-packages/somelib/amp.py", "eval"))
    assert from_library.device == "cpu"


def test_the_plugin_records_each_outcome_as_it_goes_and_collection_errors(tmp_path):
    (tmp_path / "test_ok.py").write_text("import torch\n\ndef test_ok():\n    assert torch.zeros(2).device.type == 'cpu'\n\n"
                                         "def test_bad():\n    assert 1 == 2, 'wrong'\n")
    (tmp_path / "test_broken.py").write_text("import a_package_the_image_lacks\n")
    results = tmp_path / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO / "bench"), "FASTGRPO_TEST_RESULTS": str(results),
           "FASTGRPO_TEST_DEVICE": "cpu"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "on_device", "-p", "no:cacheprovider", "-q",
                          "--continue-on-collection-errors", str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout[-2000:]
    summary = gpu_check.summarize_tests(results)
    assert summary["counts"] == {"passed": 1, "failed": 1, "error": 1} and summary["finished"]
    messages = {f["test"].split("::")[-1]: f["message"] for f in summary["failures"]}
    assert "wrong" in messages["test_bad"] and "a_package_the_image_lacks" in messages["test_broken.py"]
