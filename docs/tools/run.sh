# GRPO with the calculator tool vs without it, on the tiny default's multiplication task (builtin:multiply: 2-digit
# x 2-digit, 4-digit products). ~50 minutes on the shared 2-core machine (cold start ~15, GRPO and evaluations ~35);
# results in docs/tools/RESULTS.md.
#   bash docs/tools/run.sh [OUT]      # results in OUT/*/eval.json, table by docs/tools/table.py
# One cold start (configs/sft_tools_tiny.yaml: demonstrations that call the calculator and that answer directly);
# each condition trains 40 GRPO steps (8 prompts x 8 episodes) from it with RL seeds 0-2 and is scored on 200
# held-out prompts (data.split_of keeps them out of training), k=4: "tools" with the calculator described in the
# prompt and run, "direct" with neither (the same budget of steps, prompts and samples).
set -eu
OUT=${1:-runs/tools}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p $OUT
[ -d $OUT/base ] || $PY -m fastgrpo.tiny $OUT/base
[ -d $OUT/cold/checkpoints/step-00001000 ] || $PY -m fastgrpo.sft configs/sft_tools_tiny.yaml model.path=$OUT/base \
  log.run_dir=$OUT/cold
COLD=$OUT/cold/checkpoints/step-00001000
LEN="generation.max_completion_length=160"
COMMON="data.source=builtin:multiply data.max_prompt_length=64 generation.num_generations=8 $LEN
  rewards.funcs=[accuracy] rewards.weights=[1.0] tools.max_turns=3 loss.loss_type=dapo train.steps=40
  train.prompts_per_step=8 train.micro_batch_tokens=4096 train.lr=2e-4 log.save_every=40 log.tensorboard=false"
EVAL="k=4 data.source=builtin:multiply data.eval_examples=200 max_completion_length=160 tools.max_turns=3"
for condition in tools direct; do
  case $condition in
    tools) tools="tools.funcs=[calculator]" ;;
    direct) tools="tools.funcs=[]" ;;
  esac
  [ -f $OUT/cold-$condition.json ] || $PY -m fastgrpo.evaluate $COLD $EVAL $tools out=$OUT/cold-$condition.json
  for seed in 0 1 2; do
    run=$OUT/$condition-$seed
    [ -f $run/eval.json ] && continue
    # shellcheck disable=SC2086
    $PY -m fastgrpo.grpo model.path=$COLD log.run_dir=$run train.seed=$seed $COMMON $tools
    $PY -m fastgrpo.evaluate $run/checkpoints/step-00000040 $EVAL $tools out=$run/eval.json
  done
done
$PY docs/tools/table.py $OUT
