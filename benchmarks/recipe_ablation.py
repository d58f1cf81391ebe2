"""Equal-budget recipe ablation on the reference target: each variant trains a fresh drafter for the same
wall-clock budget (the learning rate annealed over it) on the same vendored on-policy data, then scores
teacher-forced acceptance per block position and expected tau on the 100 held-out on-policy rows.

    # two variants side by side, one thread each (~23 min for a 20-minute budget)
    python benchmarks/recipe_ablation.py --variant base --minutes 20 --threads 1 &
    python benchmarks/recipe_ablation.py --variant ce_warmup --minutes 20 --threads 1 &
    wait
    python benchmarks/recipe_ablation.py --summarize     # the table in benchmarks/README.md

Every variant is a set of changes to the quickstart's options
(`dspark_hf.reference.quickstart.QuickstartOptions`): round one changed one option at a time of the recipe
before it, round two one option at a time of the recipe after round one (`current`). Results land in
`benchmarks/results/ablation/<variant>[_seed<N>].json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from dspark_hf.reference.quickstart import (
    QuickstartOptions,
    held_out_acceptance,
    train_quickstart_drafter,
    training_precision,
)
from dspark_hf.reference.target import load_reference_target

RESULTS = Path(__file__).resolve().parent / "results" / "ablation"
# The quickstart's recipe before the first round of this ablation; round-one variants change one thing of it.
ROUND_ONE_BASE = {
    "layer_init": "random",
    "matrix_optimizer": "adamw",
    "ce_warmup_fraction": 0.0,
    "markov_head_lr_multiplier": 1.0,
    "confidence_detach_backbone": False,
    "num_anchors": 64,
    "bf16": False,
}
# The quickstart's recipe before round two (which made warm start and Muon the defaults).
ROUND_TWO_BASE = {"layer_init": "random", "matrix_optimizer": "adamw"}
# Each variant's full change to today's `QuickstartOptions` defaults.
VARIANTS: dict[str, dict] = {
    "base": ROUND_ONE_BASE,
    "ce_warmup": {**ROUND_ONE_BASE, "ce_warmup_fraction": 0.25},
    "markov_lr_x10": {**ROUND_ONE_BASE, "markov_head_lr_multiplier": 10.0},
    "confidence_detached": {**ROUND_ONE_BASE, "confidence_detach_backbone": True},
    "anchors_256": {**ROUND_ONE_BASE, "num_anchors": 256},
    "block_4": {**ROUND_ONE_BASE, "block_size": 4},
    "bf16": {**ROUND_ONE_BASE, "bf16": True},
    # the two winners of the single changes together
    "markov_lr_x10_bf16": {**ROUND_ONE_BASE, "markov_head_lr_multiplier": 10.0, "bf16": True},
    "dflash_recipe": {**ROUND_ONE_BASE, "recipe": "dflash"},
    "dflash_same_recipe": {**ROUND_ONE_BASE, "recipe": "dflash_same_recipe"},
    # round two: the quickstart's recipe before it (random layers, AdamW), then one change at a time
    "current": ROUND_TWO_BASE,
    "warm_start": {**ROUND_TWO_BASE, "layer_init": "target"},
    "muon": {**ROUND_TWO_BASE, "matrix_optimizer": "muon"},
    "warm_start_muon": {},
    "warm_start_lr_2e-3": {**ROUND_TWO_BASE, "layer_init": "target", "learning_rate": 2e-3},
    "warm_start_muon_lr_2e-3": {"learning_rate": 2e-3},
    "one_layer": {"num_hidden_layers": 1},
    "float32": {"bf16": False},
}


def run_name(variant: str, seed: int) -> str:
    return variant if seed == 0 else f"{variant}_seed{seed}"


def run_variant(name: str, minutes: float, threads: int, seed: int) -> dict:
    torch.set_num_threads(threads)
    run = run_name(name, seed)
    options = QuickstartOptions(
        output_dir=f"outputs/ablation/{run}", max_train_minutes=minutes, threads=threads, seed=seed
    )
    options = dataclasses.replace(options, **VARIANTS[name])
    bf16, _ = training_precision(options)
    target, tokenizer = load_reference_target(dtype=torch.bfloat16 if bf16 else torch.float32)
    started = time.perf_counter()
    drafter, trainer = train_quickstart_drafter(target, tokenizer, options)
    trained = time.perf_counter() - started
    drafter.save_pretrained(Path(options.output_dir) / "drafter")
    result = {
        "variant": name,
        "seed": seed,
        "change": VARIANTS[name],
        "options": dataclasses.asdict(options),
        "steps": trainer.state.global_step,
        "train_minutes": trained / 60,
        "held_out": held_out_acceptance(trainer, tokenizer, options),
        "load_average": os.getloadavg(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{run}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def summarize() -> str:
    rows = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]
    order = {name: i for i, name in enumerate(VARIANTS)}
    rows.sort(key=lambda r: order.get(r["variant"], len(order)))
    lines = [
        "| variant | seed | change | steps | expected tau | acceptance per position (1..7) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        held = row["held_out"]
        per_position = " ".join(
            f"{held[f'acceptance_{k}']:.2f}" for k in range(1, 8) if f"acceptance_{k}" in held
        )
        change = ", ".join(f"{k}={v}" for k, v in row["change"].items()) or "(defaults of its day)"
        lines.append(
            f"| {row['variant']} | {row.get('seed', 0)} | {change} | {row['steps']} | "
            f"{held['expected_tau']:.3f} | {per_position} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="Seed of initialisation and data order.")
    parser.add_argument("--summarize", action="store_true")
    args = parser.parse_args()
    if args.summarize:
        print(summarize())
    elif args.variant:
        print(json.dumps(run_variant(args.variant, args.minutes, args.threads, args.seed), indent=2))
    else:
        parser.error("pass --variant NAME or --summarize")


if __name__ == "__main__":
    main()
