"""What a user sees per step: metrics.jsonl (the record), TensorBoard, optional W&B, a one-line console summary.

    logger = MetricsLogger(run_dir)
    for step in range(steps):
        timer = Timer()
        with timer("generation"):
            ...
        with timer("training"):
            loss, metrics = ...
        logger.log(step, {**metrics, **timer.as_dict(), "peak_memory_mib": peak_memory_mib()})
    logger.close()
    plot_metrics(run_dir, ["reward/mean", "kl"], run_dir / "curves.png")

    with outputs_progress({"sft": run_dir / "sft/DONE.json", ...}, "pipeline"):   # files other processes write
        ...

metrics.jsonl holds one JSON object per logged step: {"step": 3, "wall_time": <unix seconds>, "kl": 0.01, ...}.
A run resumed from an earlier checkpoint appends steps it already logged; read_metrics keeps the later copy.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch
from tqdm import tqdm

from .runs import lock_run_dir

METRICS_FILE = "metrics.jsonl"
RESERVED = ("step", "wall_time")
# Shown on the console when present; every metric still goes to the file, TensorBoard and W&B.
# The names are those fastgrpo.grpo logs.
CONSOLE_KEYS = ("reward/mean", "reward/accuracy", "loss/kl", "loss/clip_region", "completion/length_mean",
                "tokens_per_s", "time/generation", "time/weight_sync", "time/training", "peak_memory_mib")


class MetricsLogger:
    def __init__(self, run_dir, tensorboard: bool = True, wandb_project: str | None = None, console: bool = True,
                 console_keys: tuple[str, ...] = CONSOLE_KEYS):
        self.run_dir = Path(run_dir)
        # metrics.jsonl has one writer: a second process logging here would interleave its records with ours
        lock_run_dir(self.run_dir)
        path = self.run_dir / METRICS_FILE
        if path.exists():
            _drop_partial_last_line(path)
        self._file = path.open("a")
        self._tensorboard = tensorboard
        self._writer = None  # created at the first log(), which knows the step to purge from (see log)
        self._console_keys = console_keys if console else ()
        self._wandb_run = None
        if wandb_project is not None:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("wandb_project is set but wandb is not installed: pip install wandb") from e
            self._wandb_run = wandb.init(project=wandb_project, name=self.run_dir.name, dir=self.run_dir)

    def log(self, step: int, metrics: dict[str, float | int | torch.Tensor]) -> None:
        """Record one step's scalars (one-element tensors are read with .item(), which syncs a GPU)."""
        clash = [k for k in RESERVED if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the record's own fields")
        values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}

        # Flushed per line: a crash loses at most the step being written, and `tail -f` shows progress.
        self._file.write(json.dumps({"step": step, "wall_time": time.time(), **values}) + "\n")
        self._file.flush()
        if self._tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                # A resumed run starts below steps an earlier process already logged: purge_step hides those,
                # matching read_metrics, instead of drawing two curves over the same steps.
                self._writer = SummaryWriter(self.run_dir / "tb", purge_step=step)
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        shown = [f"{k} {_fmt(values[k])}" for k in self._console_keys if k in values]
        if shown:
            tqdm.write(f"step {step} | " + " | ".join(shown))  # prints above an active progress bar

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()


def read_metrics(run_dir) -> list[dict]:
    """The records of metrics.jsonl in step order; where steps were logged twice (resume), the later copy wins."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: no metrics were logged in {run_dir}")
    lines = path.read_text().splitlines(keepends=True)
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                break  # the writer is mid-line (a live run) or crashed there
            raise ValueError(f"{path}:{number} is not a JSON record: {line[:80]!r}") from None
        while rows and rows[-1]["step"] >= row["step"]:
            rows.pop()
        rows.append(row)
    return rows


def peak_memory_mib() -> float:
    """Peak memory of this process so far: CUDA tensors on the current GPU if there is one, else host RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


class Timer:
    """Wall seconds per named phase, summed over its `with timer("generation"): ...` blocks; one Timer per step.

    On a GPU the phase boundaries synchronize, so asynchronous kernels are charged to the phase that launched
    them rather than to whichever phase next waits on the GPU.
    """

    def __init__(self):
        self._totals = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        _cuda_sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _cuda_sync()
            self._totals[phase] += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        """{"time/<phase>": seconds}, in the order the phases first ran."""
        return {f"time/{phase}": seconds for phase, seconds in self._totals.items()}


@contextmanager
def outputs_progress(outputs: dict, desc: str, poll_s: float = 1.0):
    """A progress bar, with ETA, over named files that other processes write as they finish (the pipeline's stage
    records): it counts those that exist, checked every `poll_s` seconds in a thread, and shows the first name still
    missing. Off when stderr is no terminal (tqdm's disable=None); while it is on, this process's printed lines
    appear above it instead of on its line."""
    paths = {name: Path(path) for name, path in outputs.items()}

    def count() -> tuple[int, str]:
        missing = [name for name, path in paths.items() if not path.exists()]
        return len(paths) - len(missing), missing[0] if missing else ""

    done, current = count()
    bar = tqdm(total=len(paths), initial=done, desc=desc, unit="stage", disable=None, postfix=current)
    if bar.disable:
        yield
        return
    stop = threading.Event()

    def watch():
        while not stop.wait(poll_s):
            n, name = count()
            bar.update(n - bar.n)
            bar.set_postfix_str(name)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        with redirect_stdout(_LinesAbove(sys.stdout, bar)):
            yield
    finally:
        stop.set()
        thread.join()
        bar.update(count()[0] - bar.n)
        bar.close()


class _LinesAbove:
    """A stdout that, for each whole line written, lifts `bar` off the terminal, writes the line, and draws the bar
    again below it (tqdm.write cannot: it clears bars only when writing to sys.stdout itself, which this replaces)."""

    def __init__(self, out, bar):
        self.out, self.bar, self.pending = out, bar, ""

    def write(self, text: str) -> int:
        lines, _, self.pending = (self.pending + text).rpartition("\n")
        if lines or _:
            with self.bar.get_lock():
                self.bar.clear()
                self.out.write(lines + "\n")
                self.out.flush()
                self.bar.refresh()
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def plot_metrics(run_dir, keys: list[str] | None = None, out=None) -> Path:
    """Draw each key's curve against step in its own subplot of one PNG (default run_dir/curves.png).

    keys=None plots every metric of the run. Noisy curves (RL rewards) also get an exponential moving average.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    logged = sorted({k for row in rows for k in row if k not in RESERVED})
    keys = keys or logged
    unknown = [k for k in keys if k not in logged]
    if unknown:
        raise KeyError(f"{unknown} not in {Path(run_dir) / METRICS_FILE}; it has {logged}")

    cols = min(len(keys), 3)
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps = [row["step"] for row in rows if key in row]
        values = [row[key] for row in rows if key in row]
        ax.plot(steps, values, color="tab:blue", alpha=0.35 if len(values) >= 10 else 1, linewidth=1)
        if len(values) >= 10:
            ax.plot(steps, _ema(values), color="tab:blue", linewidth=1.8)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(Path(run_dir).resolve().name)
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _ema(values: list[float], decay: float = 0.9) -> list[float]:
    smoothed, average = [], values[0]
    for v in values:
        average = decay * average + (1 - decay) * v
        smoothed.append(average)
    return smoothed


def _fmt(x: float) -> str:
    """Short and fixed-point where possible: 12345 -> "12345", 0.5312 -> "0.531", 0.0000123 -> "1.23e-05"."""
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _cuda_sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _drop_partial_last_line(path: Path) -> None:
    # A crash mid-write leaves a line without its newline; appending after it would glue two records together.
    with path.open("rb+") as f:
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
