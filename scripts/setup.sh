#!/usr/bin/env bash
# Sets up .venv on a fresh CPU machine: the CPU build of torch, the kernels package, fastgrpo.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --dev    # + tests, benchmarks, and the reference implementations (TRL, Liger)
# On a CUDA machine install a CUDA torch instead and `pip install -e kernels -e ".[cuda]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# 2.13.0 is the CPU build that lies on this machine's disk; any other pin pulls a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e kernels -e ".${extras}" torch==2.13.0
