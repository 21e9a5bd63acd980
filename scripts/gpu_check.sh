#!/usr/bin/env bash
# The GPU acceptance run (issue 20; bench/gpu_check.py says what each part does), within 8 minutes on one H200:
#   bash scripts/gpu_wheels.sh      # first, where PyPI is reachable: the wheels the GPU image lacks, into .whl/
#   bash scripts/gpu_check.sh       # on the CUDA machine (no network); the device call carries .whl, timeout ~540 s
#   bash scripts/gpu_check.sh --dry-run [--out DIR]    # anywhere: every part at toy sizes on the CPU (CI runs it)
# Writes bench/GPU.md and bench/GPU.json (or DIR/); on the device machine also into $OUT, with each part's log.
# The device's copy of the tree has no .git: FASTGRPO_COMMIT=<hash> bash scripts/gpu_check.sh names the commit there.
# PYTHON picks the interpreter (default python3: the one holding PyTorch on the GPU image).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

dry_run=0
for arg in "$@"; do [[ $arg == --dry-run ]] && dry_run=1; done
# The dry run uses the environment it is given (CI's venv has these packages); the real run installs what travelled.
if ((dry_run == 0)) && compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check.sh: installed $(ls .whl | wc -l) wheels from .whl/ into $site"
fi
# fastgrpo and fastgrpo_kernels from this tree: the GPU image has neither installed
export PYTHONPATH="$PWD:$PWD/kernels/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" bench/gpu_check.py "$@"
