"""On CPU, keep freed memory in the process for the next step instead of handing it back to the kernel.

glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh mapping and unmaps it on free,
so each step's large buffers (the LM head's and the embedding's weight-sized gradients, the logits chunks) arrive
as untouched pages again, and every 4 KiB page costs a page fault on first write. On the 180M-parameter benchmark
model (2 x 8 x 64 tokens, fp32) that was ~250,000 faults per training phase (970 MiB of pages), 1.5-2.5 s of
system time across the two cores. With mmap off and trimming off, freed blocks stay in the heap and the next
step reuses them: 76,000 faults, and the training phase ran 6.6-7.2 s instead of 7.4-7.8 s. The price: the
process's resident set no longer shrinks after a step, and heap fragmentation raised the step's peak by
~250 MiB (4.9 against 4.6 GB).

PyTorch's CUDA caching allocator does the same for GPU memory; its CPU allocator has no cache, hence this.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (process-wide, from now on); False where it is not glibc.

    Call it once the libraries are loaded: loading one can set malloc's options again (importing torch does)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # no new mappings: large blocks come from the heap too; and the heap's free top is kept up to 2 GiB
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
