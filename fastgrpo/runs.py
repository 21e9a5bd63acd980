"""Run directories and the processes that write them: one writer per run dir, records that appear whole, stage
processes that die with their parent, and bad input reported in one line.

    lock_run_dir(run_dir)                 # first thing a trainer does: a second writer fails at once, naming the holder
    write_atomic(path, text)              # DONE.json, eval JSON: a reader sees the old file or the new, never half
    read_record(path, then)               # a JSON record; None, with a warning, when missing, empty or corrupt
    check_model_path(path, "model.path")  # a local path that does not exist fails now, not after the hub's retries
    proc = start_child(command, ...)      # dies when this process dies, however it dies; stop_child(proc) to stop

    if __name__ == "__main__":
        command_line(main)                # bad input: `error: <one line>` on stderr, exit 2; FASTGRPO_DEBUG=1 re-raises
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
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
