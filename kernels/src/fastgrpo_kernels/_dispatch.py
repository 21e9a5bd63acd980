"""Backend choice and small shared helpers.

Every op takes `backend=None | "triton" | "torch"`. None picks Triton for CUDA tensors and the chunked
PyTorch path for everything else. Naming "triton" for CPU tensors only works under TRITON_INTERPRET=1,
which is how the CPU test suite checks the kernels.
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the torch path needs nothing else
    HAS_TRITON = False

BACKENDS = ("triton", "torch")

# Default budget for one chunk of logits. CPU: every chunk's dW += dz^T h reads and writes all of dW (V x H),
# so small chunks turn that GEMM memory-bound; measured at N=2048, H=896, V=151,936 (fp32, 2 cores) the fused
# GRPO loss took 1.13-1.21x the three-matmul floor at 64 MiB, 1.02-1.09x at 128 MiB, 1.00-1.03x at 192 MiB
# (before the vocabulary tiles; with them, at N=1024, H=512: ~1.0x at 128 MiB and 256 MiB alike). 128 MiB keeps
# the op's extra memory (one chunk plus O(N) vectors) well under 256 MiB. CUDA: larger, because each chunk also
# pays ~30 small kernel launches for the O(chunk) loss math, which at 64 MiB (~220 rows of a 152k vocab) would
# cost a noticeable share of the GEMM time.
DEFAULT_CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 1024 * 2**20}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    if backend is None:
        return "triton" if HAS_TRITON and tensor.is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (correctness checks only)")
    return backend


def rows_per_chunk(n_rows: int, row_bytes: int, chunk_bytes: int | None, device: torch.device) -> int:
    budget = DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cpu"]) if chunk_bytes is None else chunk_bytes
    if budget <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return max(1, min(n_rows, budget // max(row_bytes, 1)))


def checked_ids(ids: torch.Tensor, V: int, op: str, keep: torch.Tensor | None = None) -> torch.Tensor:
    """ids [N] with every position outside `keep` ([N] bool) set to 0, after checking that the kept ids lie in [0, V).

    Masked positions may hold anything (-100, the Hugging Face label convention): no gather or kernel reads their id.
    A kept id outside the vocabulary is one ValueError naming the op, the same on every backend, instead of an index
    error, a silently wrapped negative index, or a Triton kernel reading out of bounds. Costs one O(N) reduction
    and one host sync (on CUDA).
    """
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{op}: token ids must be integers, got {ids.dtype}")
    if keep is not None:
        ids = torch.where(keep, ids, 0)
    bad = (ids < 0) | (ids >= V)
    if bad.any():
        where = int(bad.nonzero()[0, 0])
        hint = "only unmasked positions need real ids" if keep is not None else "this op has no mask: every id is read"
        raise ValueError(f"{op}: token id {int(ids[where])} at position {where} (flattened) is outside the vocabulary "
                         f"[0, {V}); {hint}")
    return ids


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
