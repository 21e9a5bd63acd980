#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the pure-Python wheels that scripts/gpu_check.sh needs and the GPU image lacks
# (Python 3.12, torch 2.11, triton 3.6, transformers 5.17 there; no network). Run it where PyPI is reachable:
#   bash scripts/gpu_wheels.sh
# The wheels travel to the GPU machine only when the device call carries them (carry: [".whl"]); the working tree
# and the wheels together must stay under the device's 64 MiB limit, checked here.
#
# What each is for (versions: those the dev venv tests with):
#   liger-kernel        the loss benchmark's Liger baselines (triton_grpo_loss, LigerFusedLinearGRPOLoss) and
#                       tests/kernels/test_parity.py's Liger cases
#   omegaconf           fastgrpo.config (every trainer entry point)
#   datasets, dill, multiprocess   fastgrpo.data's built-in prompts (the GRPO step)
# Not brought: vllm and flash-attn (hundreds of MiB of CUDA builds, far over the limit), so CUDA vLLM generation and
# flash-attn varlen attention stay unverified there; TRL and math-verify (the step uses neither).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(liger-kernel==0.8.5 omegaconf==2.4.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
LIMIT_MIB=64
DEST=.whl

rm -rf "$DEST"
mkdir -p "$DEST"
# pure Python: the "any" platform tag matches, so no --platform list is needed; --no-deps because the image has the rest
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d "$DEST" "${WHEELS[@]}"
for whl in "$DEST"/*.whl; do
    case "$whl" in
        *-none-any.whl) ;;
        *) echo "gpu_wheels.sh: $whl is not a pure-Python wheel (it would not run on the GPU image)" >&2; exit 1 ;;
    esac
done

wheels_bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
# What a device call sends: tracked and untracked-not-ignored files, plus the carried .whl/
tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
total=$((wheels_bytes + tree_bytes))
ls -l "$DEST"
awk -v w="$wheels_bytes" -v t="$tree_bytes" -v l="$LIMIT_MIB" \
    'BEGIN { printf "wheels %.2f MiB + working tree %.2f MiB = %.2f MiB (limit %d MiB)\n", w / 2^20, t / 2^20, (w + t) / 2^20, l }'
if ((total > LIMIT_MIB * 1048576)); then
    echo "gpu_wheels.sh: over the device's ${LIMIT_MIB} MiB limit: drop a wheel or shrink the tree" >&2
    exit 1
fi
