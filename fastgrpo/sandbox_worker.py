"""The program that runs inside each sandbox worker (stdlib only: sandbox.py passes this file's source to
`python -I -S -c`, so nothing of the trainer's is importable or even visible here).

A worker is one long-lived interpreter. It reads jobs from its stdin, one JSON line each, and answers each with
one JSON line on its stdout:

    {"code": str, "tests": [str], "kind": "assert"}                       -> {"passed": [bool], "status": str}
    {"code": str, "tests": [[stdin, stdout]], "kind": "stdio"}
    {"code": str, "tests": [], "kind": "run"}              -> {"passed": [], "status": str, "stdout": str, "stderr": str}

Each job gets a fresh directory (its only writable place) and forked children, so no interpreter starts per
program: the "assert" kind runs the program once, then each test statement in its namespace; "stdio" runs the
program once per case with the case's input as stdin and compares stdout (trailing whitespace ignored). A child sets
its resource limits, then (when the worker runs as root) drops to the worker's own unprivileged uid, so that the
process-count limit holds (root is exempt from it) and nothing the root user owns is writable. All children of a job
share one wall-clock deadline; afterwards every process the job left behind is killed.
"""

import builtins
import functools
import gc
import json
import os
import resource
import select
import shutil
import signal
import sys
import time

# Imported once here, so that a program importing them pays nothing in its forked child.
import bisect, collections, heapq, itertools, math, re, string  # noqa: E401,F401

RESULTS_FD = 3  # where a child writes its test results; the program's own output goes to files


def main():
    settings = json.loads(sys.argv[1])
    jobs_in, answers_out = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.chdir(settings["root"])
    # Children fork from here. The first compile() of a process costs ~2 ms of one-time setup: paid once, here. Frozen
    # objects are never scanned by a child's collector, which would write to (and so copy) the worker's heap pages.
    _assert_harness("def f(x):\n    return x\n", ["assert f(1) == 1"], "warm-up", lambda line: None)
    open(os.devnull, "w").close()  # and so does the first text file
    gc.freeze()
    answers_out.write(b"ready\n")
    answers_out.flush()
    for count, line in enumerate(iter(jobs_in.readline, b"")):
        answer = run_job(json.loads(line), os.path.join(settings["root"], f"job{count}"), settings)
        answers_out.write(json.dumps(answer).encode() + b"\n")
        answers_out.flush()


def run_job(job, jobdir, settings):
    """{"passed": one bool per test, "status": "ok" | "timeout" | "error" | "killed by <signal>"}."""
    os.mkdir(jobdir, 0o700)
    if settings["uid"] is not None:
        os.chown(jobdir, settings["uid"], settings["uid"])
    deadline = time.monotonic() + settings["timeout_s"]
    try:
        if job["kind"] == "assert":
            return _run_asserts(job, jobdir, settings, deadline)
        if job["kind"] == "run":
            return _run_program(job, jobdir, settings, deadline)
        return _run_stdio(job, jobdir, settings, deadline)
    finally:
        _kill_leftovers(settings)
        shutil.rmtree(jobdir, ignore_errors=True)


def _run_asserts(job, jobdir, settings, deadline):
    results = os.path.join(jobdir, ".results")
    status = _run_child(jobdir, settings, deadline, None, results,
                        lambda report: _assert_harness(job["code"], job["tests"], job["nonce"], report))
    passed = [False] * len(job["tests"])
    for line in _head(results, 1 << 16).splitlines():  # a program may have written here too: only nonce lines count
        fields = line.split()
        if len(fields) == 3 and fields[0] == job["nonce"].encode() and fields[2] == b"1":
            index = int(fields[1]) if fields[1].isdigit() else -1
            if 0 <= index < len(passed):
                passed[index] = True
    return {"passed": passed, "status": status}


def _head(path, size):
    """The first `size` bytes of a file a child writes; none if it was killed before creating it."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        return b""


def _assert_harness(code, tests, nonce, report):
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    # a program that fails, or exits, before the tests passes none of them (the child exits 1: status "error")
    exec(compile(code, "solution.py", "exec"), namespace)
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"test{i}.py", "exec"), namespace)
            report(f"{nonce} {i} 1\n")
        except BaseException:
            report(f"{nonce} {i} 0\n")


def _run_stdio(job, jobdir, settings, deadline):
    passed, status = [], "ok"
    for i, (given, expected) in enumerate(job["tests"]):
        stdin = os.path.join(jobdir, f".stdin{i}")
        with open(stdin, "w") as f:
            f.write(given)
        case_status = _run_child(jobdir, settings, deadline, stdin, None, lambda report: _stdio_harness(job["code"]))
        out = _head(os.path.join(jobdir, ".stdout"), settings["max_output_bytes"] + 1).decode(errors="replace")
        passed.append(case_status == "ok" and _same_output(out, expected))
        status = case_status if status == "ok" else status
    return {"passed": passed, "status": status}


def _run_program(job, jobdir, settings, deadline):
    """The program once, stdin empty: its status and (the heads of) what it wrote to stdout and stderr."""
    status = _run_child(jobdir, settings, deadline, None, None, lambda report: _traced_harness(job["code"]))
    read = lambda name: _head(os.path.join(jobdir, name), settings["max_output_bytes"]).decode(errors="replace")  # noqa: E731
    return {"passed": [], "status": status, "stdout": read(".stdout"), "stderr": read(".stderr")}


def _traced_harness(code):
    try:
        _stdio_harness(code)
    except BaseException:
        import traceback

        traceback.print_exc(limit=-1)  # the program's own frame: what a model can act on
        sys.stderr.flush()
        raise


def _stdio_harness(code):
    exec(compile(code, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    sys.stdout.flush()


def _same_output(out, expected):
    lines = lambda s: [line.rstrip() for line in s.rstrip().splitlines()]  # noqa: E731
    return lines(out) == lines(expected)


def _run_child(jobdir, settings, deadline, stdin, results, harness):
    """Fork a child that runs `harness(report)` in `jobdir` under the limits; wait for it until `deadline`.
    Returns "ok" (exit 0), "timeout", "error" (nonzero exit) or "killed by <signal>"."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return "timeout"
    pid = os.fork()
    if pid == 0:
        try:
            _enter_child(jobdir, settings, stdin, results)
            me = os.getpid()
            # a process the program forks runs the rest of this harness too: only the child itself may report
            harness(lambda line: os.getpid() == me and os.write(RESULTS_FD, line.encode()))
            os._exit(0)
        except BaseException:
            os._exit(1)
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], remaining)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, code = os.waitpid(pid, 0)
    try:
        os.killpg(pid, signal.SIGKILL)  # what the child forked and left in its session
    except (ProcessLookupError, PermissionError):
        pass
    if not ready:
        return "timeout"
    if os.WIFSIGNALED(code):
        return f"killed by {signal.Signals(os.WTERMSIG(code)).name}"
    return "ok" if os.WEXITSTATUS(code) == 0 else "error"


def _enter_child(jobdir, settings, stdin, results):
    """In the forked child: a process group of its own (setsid would cost ~1.6 ms here), a lower priority, the job
    directory as cwd,
    stdin / stdout / stderr / results on fds 0-3 and no other descriptor of the worker's, the resource limits, then
    the unprivileged uid."""
    os.setpgid(0, 0)
    os.nice(10)  # a spinning program must not starve its worker (its timeout) or the trainer of CPU
    os.chdir(jobdir)
    fds = [os.open(stdin or os.devnull, os.O_RDONLY),
           os.open(".stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
           os.open(".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
           os.open(results or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)]
    moved = [os.dup(fd) for fd in fds]  # above 3, so that dup2 below never overwrites one not yet moved
    for target, fd in enumerate(moved):
        os.dup2(fd, target)
    os.closerange(RESULTS_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    sys.stdin, sys.stdout, sys.stderr = (open(0, "r", closefd=False), open(1, "w", closefd=False),
                                         open(2, "w", closefd=False))
    cpu = max(1, int(settings["cpu_s"] + 0.999))
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, settings["memory_bytes"]),
                         (resource.RLIMIT_NPROC, settings["max_processes"]),
                         (resource.RLIMIT_FSIZE, settings["max_output_bytes"]),
                         (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    if settings["uid"] is not None:
        os.setgroups([])
        os.setgid(settings["uid"])
        os.setuid(settings["uid"])


def _kill_leftovers(settings):
    """Kill every process a job left (a program's forks, daemons): with kill(-1), which signals every process it may
    at once (no fork completes meanwhile), so a fork bomb cannot outrun it. In the worker's own pid namespace
    (bubblewrap) the worker sends it (every process there but pid 1 and itself); without one, a helper as the job's uid
    (when it has one: the trainer runs as root), so that it reaches only that uid's processes."""
    if settings["pid_namespace"]:
        others = lambda: [p for p in _pids() if p not in (1, os.getpid())]  # noqa: E731
        kill_all = _kill_every_other
    elif settings["uid"] is not None:
        others = lambda: [p for p in _pids() if _uid_of(p) == settings["uid"]]  # noqa: E731
        kill_all = functools.partial(_as_uid, settings["uid"], _kill_every_other)
    else:
        return
    for _ in range(100):
        if not others():
            return
        kill_all()
        _reap()
        time.sleep(0.001)


def _kill_every_other():
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:  # there was none
        pass


def _as_uid(uid, action):
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            action()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _pids():
    """Live (not zombie) processes visible here."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    state = f.read().rpartition(b")")[2].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if state != b"Z":
                pids.append(int(name))
    return pids


def _uid_of(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def _reap():
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


if __name__ == "__main__":
    main()
