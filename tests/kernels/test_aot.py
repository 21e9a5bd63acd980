"""Every Triton kernel, in every variant the package launches, compiles for sm_80 and sm_90 without a GPU."""

import os
import subprocess
import sys


def test_every_kernel_compiles_ahead_of_time():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter can't compile
    res = subprocess.run([sys.executable, "-W", "ignore", "-m", "fastgrpo_kernels.aot"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines()[1:]]
    from fastgrpo_kernels.aot import ARCHS, variants

    assert len(rows) == len(variants()) * len(ARCHS)
    for *_, arch, regs, spills in rows:
        assert arch in ("sm_80", "sm_90") and int(regs) > 0
        assert int(spills) == 0, f"register spills: {' '.join(_)}"
