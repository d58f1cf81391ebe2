"""Throughput of on-policy regeneration (`dspark_hf.data.regenerate_responses`): batched against one by one,
in float32 and bfloat16, on the reference target.

Each configuration answers the same pool prompts greedily with a fixed number of new tokens (no early stop,
so every configuration generates the same tokens' worth of work) and reports generated tokens per second.
Configurations run one after another in this process, in an interleaved order.

    python benchmarks/regeneration_throughput.py --threads 2
    # ~6 min on 2 idle CPU cores; results in benchmarks/results/regeneration_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from dspark_hf.data import load_onpolicy_rows, regenerate_responses
from dspark_hf.onpolicy import cpu_has_native_bf16
from dspark_hf.reference_target import load_reference_target


def measure(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> float:
    """Generated tokens per second answering `prompts` in batches of `batch_size`."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        regenerate_responses(
            prompts,
            model,
            tokenizer,
            Path(tmp) / "answers.jsonl",
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            min_new_tokens=max_new_tokens,
            show_progress=False,
        )
        seconds = time.perf_counter() - start
    return len(prompts) * max_new_tokens / seconds


def cpu_description() -> dict:
    """CPU model and whether it multiplies bfloat16 natively: the dtype ranking depends on it."""
    model_names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return {
        "model": model_names[0] if model_names else platform.processor(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
    }


def write_results(args: argparse.Namespace, runs: list[dict]) -> None:
    """Rewrite the results file after every configuration, so a stopped run keeps what it measured."""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "command": " ".join(["python", *sys.argv]),
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "cpu": cpu_description(),
        "load_average": os.getloadavg(),
        "runs": runs,
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=64, help="prompts per batched configuration")
    parser.add_argument("--one-by-one-prompts", type=int, default=4, help="prompts at batch size 1")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/regeneration_throughput.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # One copy per dtype: casting one model back and forth would round the float32 weights.
    models = {dtype: load_reference_target(dtype=getattr(torch, dtype)) for dtype in args.dtypes}
    prompts = [row["prompt"] for row in load_onpolicy_rows()[: args.prompts]]
    runs = []
    for batch_size in args.batch_sizes:
        for dtype in args.dtypes:
            model, tokenizer = models[dtype]
            subset = prompts[: args.one_by_one_prompts] if batch_size == 1 else prompts
            # One small untimed batch first, so one-off allocations are not timed.
            measure(model, tokenizer, subset[:batch_size], batch_size, 8)
            tokens_per_s = measure(model, tokenizer, subset, batch_size, args.max_new_tokens)
            runs.append(
                {
                    "batch_size": batch_size,
                    "dtype": dtype,
                    "prompts": len(subset),
                    "tokens_per_s": tokens_per_s,
                }
            )
            print(json.dumps(runs[-1]), flush=True)
            write_results(args, runs)


if __name__ == "__main__":
    main()
