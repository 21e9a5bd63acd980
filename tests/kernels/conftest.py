"""Shared inputs and tolerances for the kernel tests (fp32 results from fp32/bf16/fp16 logits)."""

import pytest
import torch

# (atol, rtol) for outputs computed in fp32 from logits of this dtype, against the fp32 reference on the same
# (upcast) logits; gradients are written back in the logits dtype, hence the looser low-precision rows.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-5, rtol=1e-5),
}
GRAD_TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
DTYPES = list(TOLERANCES)
BACKENDS = ["torch", "triton"]


def make_logits(N, V, dtype, seed=0, scale=3.0, extreme=False):
    """Random logits [N, V]; `extreme` adds rows at +-1e4 and scattered -inf entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g) * scale
    if extreme:
        x[0] = torch.where(torch.rand(V, generator=g) < 0.5, -1e4, 1e4)
        x[1, ::7] = float("-inf")
        x[2, 1:] = float("-inf")  # all mass on token 0
    return x.to(dtype)


def make_ids(N, V, seed=0):
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed + 1))
    ids[0], ids[-1] = V - 1, 0
    ids[2] = 0
    return ids


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def assert_close(actual, expected, tol, what=""):
    torch.testing.assert_close(actual.float(), expected.float(), **tol, msg=lambda m: f"{what}: {m}")
