"""fastgrpo_kernels as a wheel that stands alone: `python -m build kernels`, installed in a fresh virtual environment
that holds torch (with its own requirements) and triton and nothing else, runs every exported op there.

How the fresh environment gets torch, measured on the 2-core CI machine: a real `pip install torch==2.13.0 <wheel>`
took 85 s and 97 s in two runs, 1.9 GB (torch from the CPU build on disk, triton's 286 MB wheel and torch's
requirements from PyPI; the smoke test below passed in it on the torch backend), too slow to pay on every CI run. So
the environment is made with `venv --without-pip` and gets exactly the distributions that install would have put
there - torch, triton and the closure of their requirements, as this environment's metadata lists them - linked from
this environment's site-packages, one distribution at a time (not a .pth file or system site-packages, which would
expose everything here). pip (run from here with --python, so that pip itself is not in the environment) then
installs the wheel with --no-index: every requirement the wheel declares must be met by what is there, or the
install fails. fastgrpo, transformers and the rest of the trainer's dependencies are absent, which the smoke test
checks before it runs each op forward and backward on the CPU (the torch backend, every op's default there). Then
numpy is linked in too - Triton's interpreter imports it, though triton does not declare it, and nothing else needs
it - and the smoke test runs again under TRITON_INTERPRET=1 with the Triton backend beside the torch one, which must
agree.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import fastgrpo_kernels
import pytest
from packaging.metadata import Metadata
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # 21-67 s here by the load: the build, then two smoke runs

# Every name in fastgrpo_kernels.__all__ gets a check; the last line prints which ran, which the test compares with
# __all__, so a new export without a check here fails.
SMOKE = r'''
import importlib.util, json, sys, torch, fastgrpo_kernels as K
backends = sys.argv[1:]
absent = ("fastgrpo", "transformers", "vllm", "trl") + (() if "triton" in backends else ("numpy",))
for name in absent:
    assert importlib.util.find_spec(name) is None, f"{name} is importable in the wheel's environment"
assert K._dispatch.HAS_TRITON, "triton did not import"
torch.manual_seed(0)
B, T, V, H, G = 2, 5, 37, 16, 2
ids, mask = torch.randint(0, V, (B, T)), torch.ones(B, T)
mask[1, 3:] = 0
adv, old_logp = torch.tensor([1.0, -0.5]), -torch.rand(B, T) * 3
ran, results = set(), {}

def check(name, backend, fn, *leaves):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    if leaves:
        out.float().sum().backward()
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves), name
    assert torch.isfinite(out).all(), name
    results.setdefault(name, {})[backend] = (out.detach(), [x.grad for x in leaves])
    ran.add(name)

cfg = K.GRPOLossConfig(loss_type="dapo", beta=0.04)
ran.add("GRPOLossConfig")
logits, hidden, weight = torch.randn(B, T, V), torch.randn(B, T, H), torch.randn(V, H) * 0.1
ref_logp = old_logp - 0.1
for be in backends:
    check("selective_logprobs", be, lambda x: K.selective_logprobs(x, ids, backend=be), logits)
    check("grpo_loss", be, lambda x: K.grpo_loss(x, ids, adv, mask, old_logp, ref_logp, cfg, backend=be), logits)
    check("fused_linear_grpo_loss", be, lambda h, w: K.fused_linear_grpo_loss(h, w, ids, adv, mask, old_logp,
                                                                             ref_logp, cfg, backend=be), hidden, weight)
    check("fused_linear_logprobs", be, lambda h, w: K.fused_linear_logprobs(h, w, ids, backend=be), hidden, weight)
    check("fused_linear_cross_entropy", be, lambda h, w: K.fused_linear_cross_entropy(h, w, ids, mask, backend=be),
          hidden, weight)
    check("group_advantages", be, lambda: K.group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), G, backend=be))
# Forward only, by design: advantages and IS weights are constants of the loss.
check("process_advantages", "torch", lambda: K.process_advantages(torch.tensor([1.0, 0.0, 0.0]),
      torch.tensor([0, 2, 1]), torch.tensor([2, 1]), torch.tensor([3, 2]), group_size=2))
check("rollout_is_weights", "torch", lambda: K.rollout_is_weights(old_logp, old_logp - 0.2, mask, "sequence_mask"))
check("truncated_is_weights", "torch", lambda: K.truncated_is_weights(old_logp, old_logp - 0.2, mask))
for name, by_backend in results.items():
    if "triton" in by_backend:
        (a, ga), (b, gb) = by_backend["torch"], by_backend["triton"]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} forward: {m}")
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} backward: {m}")
print(json.dumps({"ran": sorted(ran), "all": sorted(K.__all__), "file": K.__file__}))
'''


def requirement_closure(names: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions `names` need, theirs included, with markers evaluated for this interpreter."""
    seen, todo, found = set(), list(names), []
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        found.append(dist)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def link_distributions(dists, site_packages: Path) -> None:
    """Each distribution's top-level files and folders (its RECORD's, scripts outside site-packages left out) as
    links in site_packages."""
    for dist in dists:
        tops = {p.parts[0] for p in dist.files or [] if p.parts[0] not in ("..", "__pycache__")}
        assert tops, f"{dist.metadata['Name']} lists no files (no RECORD): it cannot be linked"
        for top in tops:
            (site_packages / top).symlink_to(Path(dist.locate_file(top)))


def build(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "build", "kernels", "--outdir", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    (wheel,) = out.glob("fastgrpo_kernels-*.whl")
    assert len(list(out.glob("fastgrpo_kernels-*.tar.gz"))) == 1
    return wheel


def check_metadata(wheel: Path) -> None:
    """What an index needs: valid core metadata, a license expression with its text, version ranges on both
    dependencies, classifiers."""
    with zipfile.ZipFile(wheel) as z:
        info = next(n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Metadata.from_email(z.read(f"{info}/METADATA"), validate=True)
        assert "Apache License" in z.read(f"{info}/licenses/LICENSE").decode()
        assert not any(n.startswith(("fastgrpo/", "tests/")) for n in z.namelist())
    assert meta.license_expression == "Apache-2.0" and meta.license_files == ["LICENSE"]
    assert {r.name for r in meta.requires_dist} == {"torch", "triton"}
    for req in meta.requires_dist:
        assert {s.operator for s in req.specifier} == {">=", "<"}, f"{req}: needs a floor and a cap"
    assert str(meta.requires_python) == ">=3.10" and str(meta.version) == fastgrpo_kernels.__version__
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in meta.classifiers)


def test_the_wheel_installs_beside_torch_alone_and_runs_every_op(tmp_path):
    wheel = build(tmp_path / "dist")
    check_metadata(wheel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    link_distributions(requirement_closure(["torch", "triton"]), site_packages)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-cache-dir",
                    "--disable-pip-version-check", "--quiet", str(wheel)], check=True, capture_output=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    smoke(python, env, ["torch"], tmp_path)
    link_distributions(requirement_closure(["numpy"]), site_packages)
    smoke(python, {**env, "TRITON_INTERPRET": "1"}, ["torch", "triton"], tmp_path)


def smoke(python: Path, env: dict, backends: list[str], cwd: Path) -> None:
    done = subprocess.run([str(python), "-c", SMOKE, *backends], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ran"] == report["all"]
    assert Path(report["file"]).is_relative_to(cwd / "venv")
