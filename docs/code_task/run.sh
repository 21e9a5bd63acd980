# The built-in code task: held-out pass rate of a cold-started tiny model before and after GRPO with the sandboxed
# code reward, three RL seeds.
#   bash docs/code_task/run.sh [OUT]      # ~1 hour on a busy 2-core machine; results in OUT/*.json
# The cold start is configs/sft_code_tiny.yaml (300 SFT steps on the train split's reference solutions); GRPO is
# configs/grpo_code_tiny.yaml from it (fraction-of-asserts reward). Held out: the 100 eval-split problems
# (data.split_of: none is a training problem), 8 samples each at temperature 1, all asserts or nothing.
set -eu
OUT=${1:-runs/code_task}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p $OUT
[ -d $OUT/base ] || $PY -m fastgrpo.tiny $OUT/base
SFT=$OUT/sft/checkpoints/step-00000300
[ -d $SFT ] || $PY -m fastgrpo.sft configs/sft_code_tiny.yaml model.path=$OUT/base log.run_dir=$OUT/sft log.tensorboard=false
evaluate() {  # CHECKPOINT OUT.json
  [ -f $2 ] || $PY -m fastgrpo.evaluate $1 data.source=builtin:code 'rewards.funcs=[code]' 'rewards.weights=[1.0]' \
    rewards.code.scoring=all k=8 temperature=1.0 top_p=1.0 max_completion_length=64 out=$2
}
evaluate $SFT $OUT/sft.json
for seed in ${SEEDS:-0 1 2}; do
  run=$OUT/grpo-$seed
  [ -d $run/checkpoints/step-00000060 ] || $PY -m fastgrpo.grpo configs/grpo_code_tiny.yaml model.path=$SFT \
    log.run_dir=$run train.seed=$seed data.seed=$seed train.steps=60 log.save_every=60 train.lr=${LR:-2e-4} \
    log.tensorboard=false generation.kv_cache_gib=0.2
  evaluate $run/checkpoints/step-00000060 $OUT/grpo-$seed.json
done
