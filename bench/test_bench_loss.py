"""pytest-benchmark entry for the loss-level cases at a small shape, in process (time only; memory needs the
fresh processes of `python bench/run.py`).

    pytest bench/ --benchmark-only

pyproject's addopts pass --benchmark-skip and testpaths=["tests"], so plain `pytest` never runs these.
"""

import pytest
import torch

import bench_loss
from harness import Skip

SMALL = dict(B=4, T=64, H=128, V=8192)  # N=256: each case takes milliseconds, not seconds
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", list(bench_loss.IMPLS))
def test_loss_step(benchmark, impl):
    try:
        step = bench_loss.build(impl, **SMALL, device=DEVICE)
    except Skip as why:
        pytest.skip(str(why))

    def full_step():
        for p in step.params:
            p.grad = None
        step.backward(step.forward())
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(SMALL, device=DEVICE, tokens=step.tokens, flops=step.flops)
    benchmark.pedantic(full_step, rounds=5, iterations=1, warmup_rounds=1)
