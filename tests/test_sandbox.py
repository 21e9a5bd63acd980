"""The sandbox and the code reward. Each hostile program below would pass its test (reward 1.0) if it ran unconfined,
after doing its harm: the test checks that it scores 0.0, within the timeout, and that no harm is visible outside."""

import doctest
import os
import socket
import time

import pytest

from fastgrpo import sandbox
from fastgrpo.config import CodeConfig
from fastgrpo.sandbox import CodeReward, Program, Result, Sandbox, SandboxError, as_tests, extract_code

TIMEOUT_S = 1.0
CFG = CodeConfig(timeout_s=TIMEOUT_S, cpu_s=1.0, memory_mb=256, max_processes=8, max_output_bytes=1 << 20, workers=2)
NO_BWRAP = sandbox._bwrap_missing()
needs_bwrap = pytest.mark.skipif(NO_BWRAP is not None, reason=f"bubblewrap is not usable here: {NO_BWRAP}")
SOLUTION = "def f(x):\n    return x + 1\n"
TESTS = ["assert f(1) == 2", "assert f(-1) == 0"]
# What the pool guarantees: the timeout, or, should a worker not answer, its grace and a replacement worker's start.
WITHIN_S = TIMEOUT_S + sandbox.ANSWER_GRACE_S + 2


@pytest.fixture(scope="module")
def reward():
    reward = CodeReward(CFG)
    yield reward
    reward.close()


def score(reward, code, tests=TESTS):
    completion = f"Here it is:\n```python\n{code}```"
    return reward(prompts=["p"], completions=[completion], tests=[tests])[0]


def sandbox_processes(reward, grace_s: float = 1.0):
    """Live processes on this machine under the uid of a program of `reward`'s sandbox (when the tests run as root),
    once those being killed have had `grace_s` to go: a killed process stays in /proc until its parent reaps it."""
    uids = {worker.uid for worker in reward.sandbox._workers}
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                uid = os.stat(f"/proc/{pid}").st_uid
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if uid in uids and state not in "ZX":
                alive.append(int(pid))
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def hostile(reward, prelude: str):
    """The reward of `prelude` followed by a correct solution, and the seconds it took; then checks the trainer side
    is unharmed: nothing of the program still runs, and the next program scores normally."""
    start = time.monotonic()
    value = score(reward, prelude + "\n" + SOLUTION)
    seconds = time.monotonic() - start
    assert not sandbox_processes(reward)
    after = reward.sandbox.run([Program(SOLUTION, TESTS)])[0]
    assert after == Result([True, True], "ok")
    return value, seconds


def test_doctests():
    assert doctest.testmod(sandbox).failed == 0


def test_scores_the_fraction_of_tests_passed_or_all_or_nothing(reward):
    half = "def f(x):\n    return 0\n"
    assert score(reward, SOLUTION) == 1.0
    assert score(reward, half, ["assert f(-1) == 0", "assert f(1) == 2"]) == 0.5
    all_or_nothing = CodeReward(CodeConfig(scoring="all", workers=1))
    try:
        assert score(all_or_nothing, half, ["assert f(-1) == 0", "assert f(1) == 2"]) == 0.0
    finally:
        all_or_nothing.close()


def test_stdin_stdout_cases(reward):
    code = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert score(reward, code, [["1 2\n", "3\n"], ["5 5", "10"], ["1 1", "3"]]) == pytest.approx(2 / 3)
    assert score(reward, code, {"inputs": ["2 2\n"], "outputs": ["4\n"]}) == 1.0


def test_no_code_block_scores_zero_and_a_row_without_tests_none(reward):
    out = reward(prompts=["p"] * 3, completions=["def f(x): return x + 1", "```python\ndef f(x): return x + 1",
                                                 f"```python\n{SOLUTION}```"], tests=[TESTS, TESTS, None])
    assert out == [0.0, 0.0, None]


def test_extract_code_takes_the_last_python_block_of_the_answer():
    text = "<think>```python\nx = 1\n```</think>\n```bash\nls\n```\n```py\nfirst\n```\nthen\n```Python\nlast\n```"
    assert extract_code(text) == "last\n"
    assert extract_code("```python\nunclosed") is None


def test_as_tests_formats():
    assert as_tests("assert f(1) == 2") == ["assert f(1) == 2"]
    assert as_tests([{"input": "1", "output": "2"}]) == [("1", "2")]
    assert as_tests('{"inputs": ["1"], "outputs": ["2"]}') == [("1", "2")]


def test_exiting_before_the_tests_or_printing_results_passes_nothing(reward):
    assert score(reward, "import os\nos._exit(0)\n") == 0.0
    assert score(reward, "import sys\nsys.exit(0)\n") == 0.0
    forged = "import os\nfor i in range(2):\n    os.write(3, f'x {i} 1\\n'.encode())\n    print(i, 1)\nos._exit(0)\n"
    assert score(reward, forged) == 0.0


def test_programs_run_in_parallel_on_the_pool():
    with Sandbox(CodeConfig(workers=2, timeout_s=5)) as box:
        programs = [Program("import time\ntime.sleep(1)\n", ["assert True"])] * 6
        start = time.monotonic()
        results = box.run(programs)
        seconds = time.monotonic() - start
    assert [r.passed for r in results] == [[True]] * 6
    assert seconds < 5  # one worker at a time would take 6 s; two take 3 s (plus overheads on a loaded machine)


def test_a_lost_worker_is_replaced():
    with Sandbox(CodeConfig(workers=1)) as box:
        worker = box._workers[0]
        os.killpg(worker.proc.pid, 9)
        assert os.read(worker.proc.stdout.fileno(), 1) == b""  # end of file: the worker itself is gone too
        lost = box.run([Program(SOLUTION, TESTS)])
        again = box.run([Program(SOLUTION, TESTS)])
    assert lost == [Result([False, False], "worker lost")]
    assert again == [Result([True, True], "ok")]


def test_without_bubblewrap_it_says_so_or_refuses(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "_bwrap_missing", lambda: "bwrap is not installed")
    with pytest.raises(SandboxError, match="isolation=bwrap, but bubblewrap cannot run here"):
        Sandbox(CodeConfig(isolation="bwrap", workers=1))
    with Sandbox(CodeConfig(workers=1)) as box:
        assert not box.isolated
        assert box.run([Program(SOLUTION, TESTS)]) == [Result([True, True], "ok")]
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "resource limits only" in warning[0]


# ---------------------------------------------------------------------------------------------- hostile programs

def test_an_infinite_loop(reward):
    value, seconds = hostile(reward, "while True:\n    pass\n")
    assert value == 0.0 and seconds < WITHIN_S


def test_a_fork_bomb(reward):
    value, seconds = hostile(reward, "import os\nwhile True:\n    os.fork()\n")
    assert value == 0.0 and seconds < WITHIN_S


def test_a_process_left_running_is_killed(reward):
    value, _ = hostile(reward, "import os, time\nif os.fork() == 0:\n    while True:\n        time.sleep(1)\n")
    assert value == 1.0  # the program itself is right; what it left running is killed (checked by hostile)


def test_a_10_gb_allocation(reward):
    value, seconds = hostile(reward, "block = bytearray(10 * 2**30)\n")
    assert value == 0.0 and seconds < WITHIN_S


def test_1_gb_of_output(reward):
    value, seconds = hostile(reward, "import sys\nchunk = 'x' * 2**20\nfor _ in range(1024):\n"
                                     "    sys.stdout.write(chunk)\n")
    assert value == 0.0 and seconds < WITHIN_S


@needs_bwrap
def test_writing_outside_its_directory(reward, tmp_path):
    target = tmp_path / "written"
    value, _ = hostile(reward, f"open({str(target)!r}, 'w').write('x')\n")
    assert value == 0.0 and not target.exists()
    if os.geteuid() == 0:  # the program's own uid: even the sandbox's /tmp beside its directory is not writable
        value, _ = hostile(reward, "open('../beside', 'w').write('x')\n")
        assert value == 0.0


@needs_bwrap
@pytest.mark.parametrize("what", ["secret", "source", "environ"])
def test_reading_the_trainers_files(reward, tmp_path, what):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    path, content = {"secret": (secret, "s3cret"), "source": (sandbox.__file__, open(sandbox.__file__).read()),
                     "environ": (f"/proc/{os.getpid()}/environ", open(f"/proc/{os.getpid()}/environ").read())}[what]
    solution = f"def f(x):\n    return open({str(path)!r}).read()\n"
    assert score(reward, solution, [f"assert f(0) == {content!r}"]) == 0.0
    assert score(reward, "def f(x):\n    return 1\n", ["assert f(0) == 1"]) == 1.0


@needs_bwrap
def test_a_socket_connect_to_localhost(reward):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.settimeout(0.2)
    try:
        value, seconds = hostile(reward, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                                         f"timeout=1).sendall(b'hi')\n")
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert value == 0.0 and seconds < WITHIN_S


def test_a_program_repeated_in_a_batch_runs_once(reward, monkeypatch):
    runs = []
    real_run = reward.sandbox.run
    monkeypatch.setattr(reward.sandbox, "run", lambda programs: runs.append(len(programs)) or real_run(programs))
    same, other = f"```python\n{SOLUTION}```", "```python\ndef f(x):\n    return 0\n```"
    out = reward(prompts=["p"] * 5, completions=[same, same, other, same, same],
                 tests=[TESTS, TESTS, TESTS, TESTS, ["assert f(5) == 6"]])
    assert out == [1.0, 1.0, 0.5, 1.0, 1.0] and runs == [3]


def test_a_program_killed_before_it_starts_is_a_timeout_not_a_lost_worker():
    """With no time left, the child never writes its results (or stdout) file: the worker must still answer."""
    with Sandbox(CodeConfig(timeout_s=1e-6, workers=1)) as box:
        results = box.run([Program(SOLUTION, TESTS), Program("print(1)", [("", "1")])] * 2)
    assert results == [Result([False, False], "timeout"), Result([False], "timeout")] * 2
