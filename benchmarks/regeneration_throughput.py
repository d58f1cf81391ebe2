"""Throughput of on-policy regeneration (`dspark_hf.training.data.regenerate_responses`) on the reference
target.

Fixed length: each configuration (batch size x dtype) answers the same prompts greedily with a fixed number
of new tokens (no early stop, so every configuration does the same work), batched against one by one, in
float32 and bfloat16; configurations run one after another in this process.

Natural length (`--natural-prompts N`): answers of real length (up to `--natural-max-new-tokens`, stopping
at end of sequence), where `model.generate` runs each batch until its longest answer ends and
`decode_shrinking_batch` drops each answer from the batch when it ends. The two alternate batch by batch on
the same left-padded batches; useful tokens (up to each answer's end) per second for each.

    python benchmarks/regeneration_throughput.py --threads 2
    # ~6 min on 2 idle CPU cores; results in benchmarks/results/regeneration_throughput.json
    python benchmarks/regeneration_throughput.py --threads 2 --batch-sizes --natural-prompts 64 \
        --dtypes float32 --output benchmarks/results/regeneration_natural_length.json   # ~10 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from dspark_hf.generation.batched_decoding import decode_shrinking_batch
from dspark_hf.hardware import cpu_description
from dspark_hf.reference.target import load_reference_target
from dspark_hf.training.data import load_onpolicy_rows, regenerate_responses


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


def answer_length(tokens: list[int], eos_id: int) -> int:
    """Tokens up to and including the first end-of-sequence token."""
    return tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)


def generate_answers(model, tokenizer, inputs, max_new_tokens: int) -> list[list[int]]:
    """`model.generate`: the batch runs until its longest answer ends."""
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return [row[inputs["input_ids"].shape[1] :] for row in out.tolist()]


def shrinking_answers(model, tokenizer, inputs, max_new_tokens: int) -> list[list[int]]:
    """`decode_shrinking_batch`: each answer leaves the batch when it ends."""
    return decode_shrinking_batch(
        model,
        inputs["input_ids"],
        inputs["attention_mask"],
        max_new_tokens=max_new_tokens,
        eos_token_ids=[tokenizer.eos_token_id],
    )


def measure_natural(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> dict:
    """Useful tokens per second of `model.generate` and of `decode_shrinking_batch` on the same batches,
    alternating which runs first, and how many greedy answers the two agree on."""
    decoders = {"generate": generate_answers, "shrinking": shrinking_answers}
    eos_id, seconds, tokens, agree = tokenizer.eos_token_id, dict.fromkeys(decoders, 0.0), 0, 0
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            for prompt in prompts[start : start + batch_size]
        ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        answers = {}
        for name in sorted(decoders, reverse=(start // batch_size) % 2 == 1):
            began = time.perf_counter()
            rows = decoders[name](model, tokenizer, inputs, max_new_tokens)
            seconds[name] += time.perf_counter() - began
            answers[name] = [row[: answer_length(row, eos_id)] for row in rows]
        tokens += sum(len(row) for row in answers["generate"])
        agree += sum(a == b for a, b in zip(answers["generate"], answers["shrinking"]))
    return {
        "prompts": len(prompts),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "useful_tokens": tokens,
        "identical_answers": agree,
        "tokens_per_s": {name: tokens / value for name, value in seconds.items()},
        "speedup": seconds["generate"] / seconds["shrinking"],
    }


def write_results(args: argparse.Namespace, runs: list[dict], natural: list[dict] | None = None) -> None:
    """Rewrite the results file after every configuration, so a stopped run keeps what it measured."""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "command": " ".join(["python", *sys.argv]),
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "cpu": cpu_description(),
        "load_average": os.getloadavg(),
        "runs": runs,
        "natural_length": natural or [],
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=64, help="prompts per batched configuration")
    parser.add_argument("--one-by-one-prompts", type=int, default=4, help="prompts at batch size 1")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--natural-prompts", type=int, default=0, help="prompts for the natural-length part")
    parser.add_argument("--natural-batch-size", type=int, default=32)
    parser.add_argument("--natural-max-new-tokens", type=int, default=512)
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/regeneration_throughput.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # One copy per dtype: casting one model back and forth would round the float32 weights.
    models = {dtype: load_reference_target(dtype=getattr(torch, dtype)) for dtype in args.dtypes}
    rows = load_onpolicy_rows()
    prompts = [row["prompt"] for row in rows[: args.prompts]]
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
    natural = []
    for dtype in args.dtypes if args.natural_prompts else []:
        model, tokenizer = models[dtype]
        pool = [row["prompt"] for row in rows[: args.natural_prompts]]
        natural.append(
            {
                "dtype": dtype,
                **measure_natural(
                    model, tokenizer, pool, args.natural_batch_size, args.natural_max_new_tokens
                ),
            }
        )
        print(json.dumps(natural[-1]), flush=True)
        write_results(args, runs, natural)


if __name__ == "__main__":
    main()
