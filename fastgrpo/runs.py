"""Run directories and the processes that write them: one writer per run dir, records that appear whole, stage
processes that die with their parent, and bad input reported in one line.

    lock_run_dir(run_dir)                 # first thing a trainer does: a second writer fails at once, naming the holder
    write_atomic(path, text)              # DONE.json, eval JSON: a reader sees the old file or the new, never half
    read_record(path, then)               # a JSON record; None, with a warning, when missing, empty or corrupt
    check_model_path(path, "model.path")  # a local path that does not exist fails now, not after the hub's retries
    proc = start_child(command, ...)      # dies when this process dies, however it dies; stop_child(proc) to stop
    print(training_summary("grpo", "fastgrpo.grpo", run_dir, history, ["reward/mean"], seconds))  # a run's last screen

    if __name__ == "__main__":
        command_line(main)                # bad input: `error: <one line>` on stderr, exit 2; FASTGRPO_DEBUG=1 re-raises
"""

from __future__ import annotations

import ctypes
import fcntl
import fnmatch
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from .config import ConfigError

LOCK_FILE = ".lock"
EXIT_BAD_INPUT = 2
STOP_GRACE_S = 30.0  # how long a stopped child gets to stop its own children (torchrun's workers) before SIGKILL


class RunError(RuntimeError):
    """A run that cannot go on (its run dir is in use, a stage failed or produced nothing); one line."""


# ----------------------------------------------------------------------------------------------------------
# One writer per run dir


_held: dict[Path, int] = {}  # run dir -> descriptor of its locked .lock, open until this process ends


def lock_run_dir(run_dir) -> None:
    """Hold run_dir/.lock for the rest of this process's life, or raise RunError naming the process that holds it.

    An exclusive fcntl.flock: the kernel drops it when the process dies, however it dies, so there is no stale lock
    to clean up. Taking it again in the same process is a no-op. Under torchrun rank 0 alone takes it (the ranks of
    one run must not lock each other out; the others write only into checkpoints that rank 0 creates).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key in _held:
        return
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        by = f"process {holder}" if holder.isdigit() else "another process"
        raise RunError(f"run dir {run_dir} is in use by {by} (it holds {run_dir / LOCK_FILE}): wait for it to end or "
                       f"stop it, or choose another run dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


# ----------------------------------------------------------------------------------------------------------
# Records


def write_atomic(path, text: str) -> None:
    """Write `text` to `path` so that a reader, or a crash at any moment, sees the old file or the new one whole:
    a temporary file in the same folder, fsynced, renamed over `path`, and the folder fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a write that failed (a full disk) leaves nothing behind
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_record(path, then: str) -> dict | None:
    """The JSON object in `path`, or None: when there is no file, and when it is empty or corrupt (a crash of a
    version that wrote it in place, a full disk), with a warning naming the file and `then`, what happens instead."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        problem = None if isinstance(record, dict) else f"holds a {type(record).__name__}, not a JSON object"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = "is empty" if not path.read_bytes().strip() else f"is not JSON ({_one_line(e)})"
    if problem is None:
        return record
    print(f"warning: {path} {problem}: {then}", file=sys.stderr, flush=True)
    return None


# ----------------------------------------------------------------------------------------------------------
# Model paths


def check_model_path(path: str, key: str) -> None:
    """Raise ConfigError naming `key` when `path` is no model folder here and cannot be a hub name either.

    transformers tries the hub for anything that is not a folder, with retries: ~50 s without network before it
    says so. A path that exists is left to transformers. Otherwise it fails here when it is not a hub repo id
    (absolute, ./ or ../, ~, more than one /), when its first folder exists here (runs/x: meant as local), or when
    the hub is off (HF_HUB_OFFLINE) and the name is not in the cache.
    """
    if Path(path).expanduser().exists():
        return
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ConfigError(f"{key}={path!r} does not exist") from None
    first = Path(path).parts[0]
    if len(Path(path).parts) > 1 and Path(first).is_dir():
        raise ConfigError(f"{key}={path!r} does not exist (read as a local path, since {first}/ exists here)")
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(path, "config.json"), str):
        raise ConfigError(f"{key}={path!r} is not a local folder, and not in the Hugging Face cache (HF_HUB_OFFLINE "
                          f"is set)")


# ----------------------------------------------------------------------------------------------------------
# Child processes that die with their parent


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def start_child(command: list[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(command) that the kernel sends SIGTERM when this process dies, even by SIGKILL (Linux).

    The child starts as `python -m fastgrpo.runs PARENT_PID COMMAND...`, which asks for that signal and then
    execs COMMAND, keeping its pid; so no code runs between fork and exec here (subprocess's preexec_fn is unsafe
    in a process with threads, and torch starts some). A launcher such as torchrun stops its workers on SIGTERM.
    """
    shim = [sys.executable, "-m", "fastgrpo.runs", str(os.getpid()), *command]
    return subprocess.Popen(shim, **popen_kwargs)


def stop_child(proc: subprocess.Popen) -> None:
    """SIGTERM, STOP_GRACE_S seconds to end (a launcher stops its workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _exec_dying_with(parent: int, command: list[str]) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the signal was asked for: it will never come
            sys.exit(f"error: the parent process {parent} ended before {command[0]} started")
    try:
        os.execvp(command[0], command)
    except OSError as e:  # e.g. a launcher that is not installed
        sys.exit(f"error: cannot run {command[0]}: {e.strerror}")


# ----------------------------------------------------------------------------------------------------------
# The end of a run: one screen saying where its output is, what its metrics did, and what to run next


def shell_command(module: str, *args, world_size: int = 1) -> str:
    """The shell line that runs `python -m module args...` (under torchrun on one node for several ranks), quoted
    so that it can be pasted as it is."""
    launcher = ["python"] if world_size == 1 else ["torchrun", "--nproc-per-node", str(world_size)]
    return shlex.join([*launcher, "-m", module, *map(str, args)])


def trend(history: list[dict], patterns) -> dict[str, str]:
    """{key: "first -> last"} for each logged key that matches one of `patterns` (fnmatch: "reward/*"), in the
    patterns' order: the mean over its first and over its last logged tenth of steps (at least one step, at most
    ten), since one RL step's reward is noise."""
    logged = list(dict.fromkeys(k for row in history for k in row))
    keys = dict.fromkeys(k for pattern in patterns for k in fnmatch.filter(logged, pattern))
    out = {}
    for key in keys:
        values = [row[key] for row in history if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
        if values:
            n = min(10, max(1, len(values) // 10))
            out[key] = f"{_short(sum(values[:n]) / n)} -> {_short(sum(values[-n:]) / n)}"
    return out


def summary(title: str, outputs: dict, metrics: dict, commands: dict) -> str:
    """The screen a run's main() prints last: the title, then its outputs (name: path), metrics (name: value or
    "first -> last") and the commands to run next (what: command line), each section aligned."""
    lines = [f"== {title} =="]
    for heading, section in (("output", outputs), ("metrics", metrics), ("next", commands)):
        if section:
            width = max(map(len, section))
            lines.append(f"{heading}:")
            lines += [f"  {name.ljust(width)}  {value}" for name, value in section.items()]
    return "\n".join(lines)


def training_summary(name: str, module: str, run_dir, history: list[dict], keys, seconds: float,
                     world_size: int = 1, eval_args: tuple = ()) -> str:
    """summary() of a trainer whose run dir holds checkpoints/ and config.yaml (fastgrpo.grpo, fastgrpo.sft): its
    latest checkpoint, the trend of `keys`, the command that trains it further (the same run dir resumes from the
    checkpoint) and the one that evaluates the checkpoint."""
    from .checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    steps = history[-1]["step"] + 1 if history else 0
    outputs = {"checkpoint": checkpoint or "none saved", "run dir": f"{run_dir} (config.yaml, metrics.jsonl)"}
    commands = {}
    if checkpoint is not None:
        commands["train further"] = shell_command(module, run_dir / "config.yaml", f"train.steps={2 * max(steps, 1)}",
                                                  world_size=world_size)
        commands["evaluate"] = shell_command("fastgrpo.evaluate", checkpoint, *eval_args)
    commands["plot"] = shlex.join(["python", "scripts/plot_run.py", str(run_dir)])
    title = f"{name}: {steps} steps, {seconds:.0f} s in this process"
    return summary(title, outputs, trend(history, keys), commands)


def model_summary(name: str, run_dir, result: dict, labels: dict, use_as: str) -> str:
    """summary() of a scorer's run (fastgrpo.reward_model, fastgrpo.prm): its final model and held-out eval,
    `labels` naming which of `result`'s values to show, the trend of its training loss and accuracy, and the
    override that makes a GRPO run score with it."""
    from .metrics import METRICS_FILE, read_metrics

    run_dir = Path(run_dir)
    history = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    outputs = {"model": run_dir / "final", "held-out eval": run_dir / "eval.json"}
    metrics = {label: _short(result[key]) for key, label in labels.items() if key in result}
    metrics.update({f"train {k}": v for k, v in trend(history, ["loss", "accuracy"]).items()})
    commands = {"score a GRPO run with it": f"add {use_as}={shlex.quote(str(run_dir / 'final'))} to its command line",
                "its config": run_dir / "config.yaml"}
    steps = history[-1]["step"] + 1 if history else 0
    return summary(f"{name}: {steps} steps", outputs, metrics, commands)


def evaluation_summary(results: dict, argv: list[str], out: str | None) -> str:
    """summary() of fastgrpo.evaluate: every score, where they were written, and the command that repeats it."""
    scores = {k: _short(v) for k, v in results.items() if isinstance(v, (int, float))}
    outputs = {"results": out} if out else {}
    return summary(f"evaluate: {results['model']}", outputs, scores,
                   {"repeat": shell_command("fastgrpo.evaluate", *argv)})


def dataset_summary(result: dict, cfg) -> str:
    """summary() of fastgrpo.rejection: the dataset, what was kept of what was sampled, the SFT command on it."""
    out = Path(cfg.out)
    counts = result.get("counts", {})
    metrics = {"rows": f"{result['rows']} ({result['reasoning_rows']} sampled, {result['general_rows']} general)",
               "prompts with a kept sample": result["prompts"],
               **{f"samples {reason}": n for reason, n in counts.items()}}
    commands = {"SFT on it": shell_command("fastgrpo.sft", f"model.path={cfg.model}", f"data.source={out}",
                                           f"log.run_dir={out.parent / 'sft'}")}
    return summary("rejection sampling", {"dataset": out, "summary": out.with_suffix(".summary.json")}, metrics,
                   commands)


def pipeline_summary(cfg, seconds: float) -> str:
    """summary() of a finished fastgrpo.pipeline run: RESULTS.md, the last policy stage's model, held-out pass@1
    and helpfulness from the base model to that stage, and the commands that rerun the pipeline (finished stages
    are skipped), rerun one stage alone and evaluate the model."""
    from .pipeline import MODULES, POLICY_STAGES, STAGES, finished, stage_dir

    run_dir = Path(cfg.run_dir)
    done = [s for s in STAGES if s in cfg.stages and finished(cfg, s)]
    last = next((s for s in reversed(POLICY_STAGES) if s in done), None)
    outputs = {"results": run_dir / "RESULTS.md", "plots": run_dir / "plots"}
    if last:
        outputs["model"] = f"{finished(cfg, last)['output']} ({last})"
    evals = [read_record(run_dir / "eval" / f"{s}.json", then="left out of the summary") for s in ["base", last]]
    metrics = {key: f"{_short(evals[0][key])} -> {_short(evals[1][key])} (base -> {last})"
               for key in ("pass@1", "helpfulness") if last and all(e and key in e for e in evals)}
    commands = {"rerun (skips finished stages)": shell_command("fastgrpo.pipeline", run_dir / "pipeline.yaml")}
    if done:
        commands[f"{done[-1]} alone"] = shell_command(MODULES[done[-1]], stage_dir(cfg, done[-1]) / "stage.yaml")
    if last:
        commands["evaluate the model"] = shell_command("fastgrpo.evaluate", finished(cfg, last)["output"])
    title = f"pipeline: {len(done)} of {len(cfg.stages)} stages done, {seconds / 60:.1f} min in this process"
    return summary(title, outputs, metrics, commands)


def _short(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


# ----------------------------------------------------------------------------------------------------------
# Command lines


def _user_errors() -> tuple[type[Exception], ...]:
    # Imported here: checkpoint and rewards import torch, which the child-process shim above must not wait for.
    from .checkpoint import CheckpointError
    from .rewards import RewardError

    return ValueError, OSError, RunError, CheckpointError, RewardError  # ValueError includes ConfigError


def command_line(main) -> None:
    """Run a command-line entry point, `main()`: an error of bad input (a config, a path, a file, a reward
    function) ends it with `error: <one line>` on stderr and exit code 2, no traceback; FASTGRPO_DEBUG=1 shows the
    traceback. Anything else propagates with its traceback, as a bug should."""
    try:
        main()
    except _user_errors() as e:
        if os.environ.get("FASTGRPO_DEBUG") == "1":
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    _exec_dying_with(int(sys.argv[1]), sys.argv[2:])
