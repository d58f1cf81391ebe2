#!/usr/bin/env bash
# The SmolLM2-135M-Instruct reference drafters, their scaling curve and the benchmark behind the README.
#
# DSpark (vanilla Markov head, the quickstart's recipe: warm start from the target, Muon for the draft
# layers' matrices) and the DFlash ablation (DeepSpec's DFlash recipe: no Markov or confidence head, CE 1.0 /
# L1 0.0, with the same warm start and optimizer) train on the same data with the same wall-clock budget,
# side by side, one CPU thread each, each with its own target-feature cache (epochs after the first skip the
# target). Every budget trains a fresh drafter whose learning rate anneals to that budget's end, then
# evaluates it on held-out prompts (5 per dataset x 64 new tokens, greedy).
#
#   bash benchmarks/reference_drafter.sh                         # budgets 5 10 20 40: ~85 min, then
#                                                              # calibration (~3 min) and the benchmark of
#                                                              # the 40-minute drafters (60-90 min)
#   bash benchmarks/reference_drafter.sh --max_train_minutes 40  # one budget (~50 min), then the same
#                                                              # calibration and benchmark of it
#   bash benchmarks/reference_drafter.sh --max_train_minutes 40 --no_benchmark  # the training only
#
# A finished budget (its results.json exists) is not retrained, so an interrupted run resumes.
set -euo pipefail

budgets=(5 10 20 40)
benchmark=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --max_train_minutes | --max-train-minutes) budgets=("$2"); shift 2 ;;
        --no_benchmark | --no-benchmark) benchmark=0; shift ;;
        *) echo "usage: $0 [--max_train_minutes MINUTES] [--no_benchmark]" >&2; exit 2 ;;
    esac
done

runs=outputs/reference
mkdir -p "$runs"
for minutes in "${budgets[@]}"; do
    for recipe in dspark dflash; do
        dir="$runs/$recipe-${minutes}min"
        [[ -f "$dir/results.json" ]] && continue
        echo "training $recipe for $minutes min -> $dir (log: $dir.log)"
        dspark quickstart --output_dir "$dir" --recipe "$recipe" --max_train_minutes "$minutes" --threads 1 \
            --target_cache_dir "$dir-target-cache" --eval_prompts_per_set 5 --max_new_tokens 64 > "$dir.log" 2>&1 &
    done
    wait
done

# tau per dataset against training minutes: benchmarks/results/smollm2_scaling.{json,png}
python benchmarks/scaling_curve.py --runs "$runs"
[[ $benchmark == 1 ]] || exit 0

largest="${budgets[-1]}"
# Confidence temperatures (STS; 8 GSM8K + 8 MT-Bench prompts that the benchmark does not use, 128 tokens
# each) and the target's cost profile for confidence scheduling, one thread, with the small-batch kernels
# that the benchmark decodes with.
OMP_NUM_THREADS=1 dspark calibrate "$runs/dspark-${largest}min/drafter" --profile_cost --small_batch_linears

# Side-by-side benchmark, interleaved prompt by prompt, against plain fp32 / bf16 (the same small-batch
# kernels for every method), prompt lookup and the combined method (lookup drafting + stepping aside); beside
# it on the other core, stepping aside with an untrained drafter against plain decoding. One thread each.
python benchmarks/run_benchmark.py --drafter "$runs/dspark-${largest}min/drafter" \
    --dflash-drafter "$runs/dflash-${largest}min/drafter" --name smollm2_reference \
    --datasets gsm8k mt-bench humaneval --limit 10 --max-new-tokens 128 --temperatures 0 1 --threads 1 \
    --small-batch-linears &
python benchmarks/context_drafting.py --methods step_aside_untrained --limit 10 --max-new-tokens 128 \
    --temperatures 0 1 --threads 1 --small-batch-linears --name step_aside_untrained &
wait
