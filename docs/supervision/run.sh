# Outcome vs process supervision vs a learned PRM (static, or with iterative updates) in R1 stage 2, tiny default.
#   bash docs/supervision/run.sh [OUT]      # ~2 hours on a busy 2-core machine; results in OUT/*/eval.json
#   VARIANTS="prm_acc prm_acc_strict" bash docs/supervision/run.sh     # some of the rows
# One cold start (configs/sft_tiny.yaml, 200 steps) and one PRM (configs/prm_tiny.yaml from the cold start) for all
# runs; each variant trains 60 GRPO steps (16 prompts x 8) from the cold start with RL seeds 0-2, then is scored on
# 200 held-out prompts (data.split_of keeps them out of training), k=4.
set -eu
OUT=${1:-runs/supervision}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p $OUT
[ -d $OUT/base ] || $PY -m fastgrpo.tiny $OUT/base
[ -d $OUT/cold/checkpoints/step-00000200 ] || $PY -m fastgrpo.sft configs/sft_tiny.yaml model.path=$OUT/base log.run_dir=$OUT/cold
COLD=$OUT/cold/checkpoints/step-00000200
[ -d $OUT/prm/final ] || $PY -m fastgrpo.prm configs/prm_tiny.yaml model.path=$COLD log.run_dir=$OUT/prm
STEPS="rewards.step_pattern='(?<=\d) (?=\d)|</think>'"
COMMON="data.source=builtin:arithmetic data.max_prompt_length=64 generation.num_generations=8
  generation.max_completion_length=48 loss.loss_type=dapo loss.eps_low=0.2 loss.eps_high=0.28 train.steps=60
  train.prompts_per_step=16 train.micro_batch_tokens=4096 train.lr=2e-4 log.save_every=60 log.tensorboard=false
  generation.kv_cache_gib=0.2"
PRM="rewards.funcs=[process_reward_model,format] rewards.weights=[1.0,0.5] rewards.process_reward_model=$OUT/prm/final"
ITER="rewards.reward_model_updates.every=10 rewards.reward_model_updates.steps=5
  rewards.reward_model_updates.pairs_per_step=32 rewards.reward_model_updates.labeler=arithmetic_steps
  rewards.reward_model_updates.lr=1e-3"
# unlabeled=0: a step the labeler does not recognize is a wrong one (without it, the PRM never sees its gamed text
# labelled)
STRICT="$ITER rewards.reward_model_updates.unlabeled=0.0"
PRM_ACC="rewards.funcs=[process_reward_model,accuracy,format] rewards.weights=[1.0,1.0,0.5]
  rewards.process_reward_model=$OUT/prm/final"
for seed in 0 1 2; do
  for variant in ${VARIANTS:-outcome process prm prm_iter prm_strict prm_acc prm_acc_strict}; do
    run=$OUT/$variant-$seed
    [ -f $run/eval.json ] && continue
    case $variant in
      outcome) args="rewards.funcs=[accuracy,format] rewards.weights=[1.0,0.5]" ;;
      process) args="rewards.funcs=[arithmetic_steps,format] rewards.weights=[1.0,0.5]" ;;
      prm) args="$PRM" ;;
      prm_iter) args="$PRM $ITER" ;;
      prm_strict) args="$PRM $STRICT" ;;
      prm_acc) args="$PRM_ACC" ;;
      prm_acc_strict) args="$PRM_ACC $STRICT" ;;
    esac
    # shellcheck disable=SC2086
    if [ $variant = outcome ]; then
      $PY -m fastgrpo.grpo model.path=$COLD log.run_dir=$run train.seed=$seed $COMMON $args
    else
      $PY -m fastgrpo.grpo model.path=$COLD log.run_dir=$run train.seed=$seed $COMMON $args "$STEPS"
    fi
    $PY -m fastgrpo.evaluate $run/checkpoints/step-00000060 k=4 data.source=builtin:arithmetic data.eval_examples=200 \
      max_completion_length=48 out=$run/eval.json
  done
done
[ -f $OUT/cold.json ] || $PY -m fastgrpo.evaluate $COLD k=4 data.source=builtin:arithmetic data.eval_examples=200 \
  max_completion_length=48 out=$OUT/cold.json
