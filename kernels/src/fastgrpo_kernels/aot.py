"""Ahead-of-time compilation of every kernel, for real GPUs, on a machine without one.

    python -m fastgrpo_kernels.aot            # sm_80 and sm_90; prints registers and spills per variant

The interpreter (TRITON_INTERPRET=1) accepts code the real compiler rejects, so the test suite runs this in
a subprocess without it: a kernel that only works in the interpreter fails here. Registers and spills come
from running Triton's bundled ptxas on the generated PTX.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

ARCHS = (80, 90)
LOGITS_DTYPES = ("fp32", "bf16", "fp16")
VOCABS = (128, 1271, 151936)  # together they reach every launch config of the logits kernels
GROUP_SIZES = (4, 16, 64)


@dataclass
class Variant:
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int

    @property
    def label(self):
        flags = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        types = ",".join(sorted({v for v in self.signature.values() if v != "constexpr"}))
        return f"{self.kernel.__name__}[{flags}; warps={self.num_warps}; {types}]"


def variants() -> list[Variant]:
    from . import advantages, logprobs

    out = []
    configs = sorted({logprobs.launch_config(V) for V in VOCABS})
    for dtype in LOGITS_DTYPES:
        for block, warps in configs:
            for with_entropy in (False, True):
                flags = {"WITH_ENTROPY": with_entropy, "BLOCK_V": block}
                fwd = {"logits_ptr": f"*{dtype}", "ids_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
                       "entropy_ptr": "*fp32", "stride_logits": "i32", "V": "i32", "inv_temperature": "fp32"}
                bwd = {"logits_ptr": f"*{dtype}", "dlogits_ptr": f"*{dtype}", "ids_ptr": "*i64", "lse_ptr": "*fp32",
                       "entropy_ptr": "*fp32", "dlogp_ptr": "*fp32", "dentropy_ptr": "*fp32", "stride_logits": "i32",
                       "stride_dlogits": "i32", "V": "i32", "inv_temperature": "fp32"}
                for kernel, sig in ((logprobs._logprob_fwd_kernel, fwd), (logprobs._logprob_bwd_kernel, bwd)):
                    out.append(Variant(kernel, {**sig, **{k: "constexpr" for k in flags}}, flags, warps))
    for G in GROUP_SIZES:
        for scale in (0, 1, 2):
            flags = {"SCALE": scale, "BLOCK_G": G}
            sig = {"rewards_ptr": "*fp32", "advantages_ptr": "*fp32", "batch_std_ptr": "*fp32", "G": "i32",
                   "eps": "fp32", "SCALE": "constexpr", "BLOCK_G": "constexpr"}
            out.append(Variant(advantages._group_advantages_kernel, sig, flags, 4))
    return out


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch_name}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def compile_all(archs=ARCHS):
    """Compile every variant for every arch; yields (label, arch, registers, spill bytes). Raises on failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    for v in variants():
        for arch in archs:
            src = ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps})
            if not compiled.asm.get("cubin"):
                raise RuntimeError(f"{v.label} produced no cubin for sm_{arch}")
            regs, spills = _ptxas_report(compiled.asm["ptx"], arch)
            yield v.label, arch, regs, spills


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    args = parser.parse_args()
    print(f"{'kernel variant':<100} {'arch':>5} {'regs':>5} {'spill B':>8}")
    for label, arch, regs, spills in compile_all(args.arch):
        print(f"{label:<100} sm_{arch:<3} {regs:>5} {spills:>8}", flush=True)


if __name__ == "__main__":
    main()
