"""What the target-feature cache saves per epoch: seconds per epoch of the quickstart's trainer over a few
epochs of the same rows, with `target_cache_dir` (epoch 1 fills it, later epochs read it) and without,
the two runs interleaved epoch by epoch so that machine load hits both alike.

    python benchmarks/target_cache_throughput.py --rows 32 --epochs 3 --threads 1
    # writes benchmarks/results/target_cache_throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dspark_hf.hardware import cpu_description
from dspark_hf.reference.quickstart import (
    QuickstartOptions,
    quickstart_drafter,
    training_arguments,
    training_precision,
)
from dspark_hf.reference.target import load_reference_target
from dspark_hf.training.data import build_dataset, reference_training_rows
from dspark_hf.training.trainer import DSparkTrainer

RESULTS = Path(__file__).resolve().parent / "results"


def epoch_seconds(options: QuickstartOptions, target, tokenizer, dataset, cache_dir: str | None) -> float:
    """Wall-clock seconds of one epoch over `dataset` (a fresh trainer; the cache folder persists)."""
    trainer = DSparkTrainer(
        model=quickstart_drafter(target, tokenizer, options),
        target_model=target,
        args=training_arguments(
            options,
            max_steps=-1,
            num_train_epochs=1,
            max_train_minutes=None,
            target_cache_dir=cache_dir,
            disable_tqdm=True,
            logging_steps=10_000,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=32, help="Training rows per epoch.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = dataclasses.replace(QuickstartOptions(), threads=args.threads)
    bf16, reason = training_precision(options)
    target, tokenizer = load_reference_target(dtype=torch.bfloat16 if bf16 else torch.float32)
    rows = reference_training_rows("train")[: args.rows]
    dataset = build_dataset(rows, tokenizer, max_length=options.max_length)
    cache_dir = tempfile.mkdtemp(prefix="dspark-target-cache-")
    timings: dict[str, list[float]] = {"online": [], "cached": []}
    try:
        for epoch in range(args.epochs):
            for mode in ("online", "cached"):
                seconds = epoch_seconds(
                    options, target, tokenizer, dataset, cache_dir if mode == "cached" else None
                )
                timings[mode].append(seconds)
                print(f"epoch {epoch + 1} {mode}: {seconds:.1f} s")
        cache_gb = sum(path.stat().st_size for path in Path(cache_dir).iterdir()) / 1024**3
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    steps = -(-len(dataset) // (options.per_device_train_batch_size * options.gradient_accumulation_steps))
    result = {
        "rows": len(dataset),
        "steps_per_epoch": steps,
        "epochs": args.epochs,
        "precision": "bfloat16" if bf16 else "float32",
        "precision_reason": reason,
        "seconds_per_epoch": timings,
        "speedup_per_epoch": [
            online / cached for online, cached in zip(timings["online"], timings["cached"])
        ],
        "cache_gb": cache_gb,
        "cache_gb_per_row": cache_gb / len(dataset),
        "threads": args.threads,
        "cpu": cpu_description(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "target_cache_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
