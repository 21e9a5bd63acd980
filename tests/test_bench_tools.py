"""bench/bench_tools.py at toy size (--smoke): both benchmarks of issue 18 run end to end and report every case, so
the script cannot rot unnoticed."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_the_tools_benchmark_runs_every_case_at_toy_size(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    pytest.importorskip("trl")
    import bench_generation
    import bench_tools

    monkeypatch.setenv("FASTGRPO_BENCH_CACHE", str(tmp_path / "models"))  # the cases' processes build their own
    monkeypatch.setattr(bench_generation, "CACHE", tmp_path / "models")
    monkeypatch.setattr(bench_tools, "BENCH_DIR", tmp_path)  # raw results there, not in the checkout
    out = tmp_path / "TOOLS.md"
    raw = bench_tools.main(["--smoke", "--out", str(out)])
    rollout, trl = raw["rollout"]["rows"], raw["trl"]["rows"]
    assert all("error" not in row for row in [*rollout.values(), *trl.values()]), raw
    # the same sampled tokens on both sides, and the multi-turn side really had turns with observations between
    assert rollout["single"]["sampled"] == rollout["multi"]["sampled"] == [1 * 2 * 2 * 8] * 2
    assert min(rollout["multi"]["observation"]) > 0 and rollout["single"]["observation"] == [0, 0]
    for row in trl.values():
        assert len(row["held_s"]) == 1 and row["tokens"][0] > 0 and row["peak_rss_mib"] > 0
    report = out.read_text()
    for case in ("| single |", "| multi |", "| fastgrpo |", "| trl |"):
        line = next(line for line in report.splitlines() if line.startswith(case))
        assert "error" not in line and line.count("|") > 6, line
