#!/usr/bin/env bash
# The SmolLM2-135M-Instruct reference drafters and the benchmark behind the README's numbers.
# Same code as the quickstart, longer budget. Both drafters train at the same time, one CPU thread each, so
# they get the same 40-minute wall-clock budget on a 2-core machine (~45 min each including evaluation).
set -euo pipefail

# DSpark (vanilla Markov head) and the DFlash ablation with DeepSpec's DFlash recipe (no Markov head, no
# confidence head, CE 1.0 / L1 0.0; `--recipe dflash_same_recipe` keeps DSpark's loss instead). The
# learning rate anneals over the 40-minute budget.
dspark quickstart --output-dir outputs/reference --max-train-minutes 40 --threads 1 \
    --eval-prompts-per-set 1 --max-new-tokens 32 &
dspark quickstart --output-dir outputs/dflash --recipe dflash --max-train-minutes 40 \
    --threads 1 --eval-prompts-per-set 1 --max-new-tokens 32 &
wait

# Confidence temperatures (STS) and the target's cost profile for confidence scheduling (~30 s).
dspark calibrate outputs/reference/drafter --prompts-per-set 3 --max-new-tokens 64 --profile-cost

# Side-by-side benchmark, interleaved prompt by prompt (~25 s per prompt and temperature).
python benchmarks/run_benchmark.py --drafter outputs/reference/drafter --dflash-drafter outputs/dflash/drafter \
    --name smollm2_reference --datasets gsm8k mt-bench humaneval --limit 5 --max-new-tokens 96 \
    --temperatures 0 1 --threads 2
