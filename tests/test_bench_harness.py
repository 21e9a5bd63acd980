"""bench/harness.py's interleaved runs: processes take turns, one step at a time, and an exited one's turn moves on."""

import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from harness import run_interleaved  # noqa: E402

PROBE = '''
import os
import signal
import time
from harness import TURNS, Step

def build(name, steps, killed_at=None):
    spans, info = [], {}

    def forward():
        for k in range(steps):
            TURNS.step()
            if k == killed_at:
                os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would, holding the turn
            start = time.time()
            time.sleep(0.02)  # long enough for another process to run, were it not waiting for its turn
            spans.append((name, start, time.time()))
        TURNS.step()  # the last step's end, as the start of a step that never runs
        info.update(spans=spans, held=TURNS.step_s())

    return Step(forward, lambda _: None, params=[], flops=0.0, min_bytes=1.0, tokens=1, info=info)
'''


def test_processes_take_turns_and_an_exited_ones_turn_moves_on(tmp_path, monkeypatch):
    (tmp_path / "probe.py").write_text(textwrap.dedent(PROBE))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    rows = run_interleaved("probe", "build", [dict(name="a", steps=5), dict(name="b", steps=5),
                                              dict(name="c", steps=2)], timeout_s=120)
    assert all("error" not in row for row in rows), rows
    spans = sorted((span for row in rows for span in row["spans"]), key=lambda s: s[1])
    assert [s[0] for s in spans] == list("abcabc") + list("ababab")  # c exits after its two: a and b go on
    assert all(prev[2] <= nxt[1] for prev, nxt in zip(spans, spans[1:]))  # never two at once
    for row, steps in zip(rows, (5, 5, 2)):
        assert len(row["held"]) == steps and all(0.02 <= s < 1.0 for s in row["held"])


def test_a_killed_process_stops_the_run_instead_of_hanging_it(tmp_path, monkeypatch):
    (tmp_path / "probe.py").write_text(textwrap.dedent(PROBE))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    rows = run_interleaved("probe", "build", [dict(name="a", steps=50), dict(name="b", steps=50, killed_at=2)],
                           timeout_s=60)
    assert [row.get("error") for row in rows] == ["stopped: case 1 was killed (exit code -9)"] * 2
