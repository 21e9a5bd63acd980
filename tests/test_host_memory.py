"""keep_freed_memory: a large buffer freed and allocated again comes back without page faults."""

import subprocess
import sys

import pytest

# Allocates, frees and allocates again a 256 MiB tensor (above glibc's mmap threshold) and prints the page faults
# that the second allocation's writes cost. mallopt is process-wide, hence a process of its own.
PROBE = """
import resource, sys, torch  # first: importing torch resets malloc's options
from fastgrpo.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.ones(64 * 2**20)  # allocated, written, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(64 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    pages = 256 * 2**20 // 4096
    assert faults("default") > pages // 2  # a fresh mapping: a fault per page written (or per huge page)...
    assert faults("keep") < pages // 50  # ...against the heap's own pages, already there
