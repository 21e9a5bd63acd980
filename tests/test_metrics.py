import json
import resource
import runpy
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fastgrpo.metrics import MetricsLogger, Timer, peak_memory_mib, plot_metrics, read_metrics

PLOT_SCRIPT = Path(__file__).parents[1] / "scripts" / "plot_run.py"


def log_steps(run_dir, steps, **kwargs):
    logger = MetricsLogger(run_dir, **kwargs)
    for step in steps:
        logger.log(step, {"reward/mean": torch.tensor(step / 10), "kl": 1e-4 * step, "tokens": 512})
    logger.close()


def test_log_writes_jsonl_and_tensorboard(tmp_path):
    before = time.time()
    log_steps(tmp_path, range(3), console=False)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert set(first) == {"step", "wall_time", "reward/mean", "kl", "tokens"}
    assert before <= first["wall_time"] <= time.time()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert read_metrics(tmp_path)[2]["reward/mean"] == pytest.approx(0.2)
    assert all(type(v) is float for k, v in first.items() if k != "step")

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("tokens")] == [(0, 512.0), (1, 512.0), (2, 512.0)]


def test_console_line_shows_chosen_keys_present_this_step(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, tensorboard=False, console_keys=("reward/mean", "kl", "absent", "tokens"))
    logger.log(7, {"reward/mean": 0.53125, "kl": 1.5e-5, "tokens": 12345, "other": 1})
    logger.close()
    assert capsys.readouterr().out == "step 7 | reward/mean 0.531 | kl 1.50e-05 | tokens 12345\n"

    quiet = MetricsLogger(tmp_path, tensorboard=False, console=False)
    quiet.log(8, {"reward/mean": 0.5})
    quiet.close()
    assert capsys.readouterr().out == ""


def test_reserved_names_are_refused(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="step"):
        logger.log(1, {"step": 3})
    logger.close()


def test_resume_after_crash_mid_line_keeps_the_later_copy_of_each_step(tmp_path):
    log_steps(tmp_path, range(5), console=False)
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 5, "rew')  # crashed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]  # a reader tolerates it

    log_steps(tmp_path, [3, 4, 5, 6], console=False)  # resumed from a step-3 checkpoint
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5, 6]
    assert len(path.read_text().splitlines()) == 9  # the partial line was dropped, not glued to the next

    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ["garbage"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:3 is not a JSON record"):
        read_metrics(tmp_path)


def test_wandb_is_optional_and_receives_every_metric(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path, wandb_project="p")

    calls = []
    run = types.SimpleNamespace(log=lambda values, step: calls.append((step, values)),
                                finish=lambda: calls.append("finish"))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(kwargs) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(tmp_path, tensorboard=False, console=False, wandb_project="p")
    logger.log(2, {"kl": torch.tensor(0.25)})
    logger.close()
    assert calls == [dict(project="p", name=tmp_path.name, dir=tmp_path), (2, {"kl": 0.25}), "finish"]


def test_timer_sums_each_phase_over_its_blocks():
    timer = Timer()
    for _ in range(2):
        with timer("generation"):
            time.sleep(0.01)
    with timer("training"):
        pass
    split = timer.as_dict()
    assert list(split) == ["time/generation", "time/training"]
    assert split["time/generation"] >= 0.02 > split["time/training"]


def test_peak_memory_is_the_high_water_mark():
    before = peak_memory_mib()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = peak_memory_mib()
    assert peak >= before
    assert peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.05)  # Linux: KiB
    del block


def test_plot_script_writes_a_png(tmp_path, monkeypatch):
    log_steps(tmp_path, range(30), console=False)
    out = tmp_path / "curves.png"
    monkeypatch.setattr(sys, "argv", ["plot_run.py", str(tmp_path), "--keys", "reward/mean,kl", "--out", str(out)])
    runpy.run_path(str(PLOT_SCRIPT), run_name="__main__")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert plot_metrics(tmp_path).name == "curves.png"  # every key, default place
    with pytest.raises(KeyError, match="accuracy"):
        plot_metrics(tmp_path, ["accuracy"])
