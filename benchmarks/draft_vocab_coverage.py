"""Draft-vocabulary coverage: the share of the reference target's own greedy tokens that a draft vocabulary
can propose (a drafter restricted to a vocabulary can never be accepted on a token outside it).

Compares the vocabulary of the tokens seen in the bundled training answers (the quickstart's former choice)
with top-K vocabularies of the broad-corpus ranking (`dspark_hf/resources/smollm2_token_ranking.json.gz`),
each with and without the request's prompt tokens, on the first `--limit` evaluation prompts per dataset.

    python benchmarks/draft_vocab_coverage.py --limit 10 --max-new-tokens 128   # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dspark_hf.reference.benchmarking import encode_chat_prompt
from dspark_hf.reference.target import load_reference_target
from dspark_hf.training.data import build_dataset, load_prompts, load_reference_train_rows
from dspark_hf.training.draft_vocab import (
    frequency_ranked_vocab,
    load_token_ranking,
    ranked_vocab,
    vocab_coverage,
)

DATASETS = ("gsm8k", "mt-bench", "humaneval")


@torch.no_grad()
def greedy_outputs(target, tokenizer, prompts: list[str], max_new_tokens: int) -> list[tuple[list, list]]:
    """(prompt ids, generated ids) per prompt, greedy, one at a time (no padding effects)."""
    pairs = []
    for prompt in prompts:
        ids = encode_chat_prompt(tokenizer, prompt)
        out = target.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
        pairs.append((ids[0].tolist(), out[0, ids.shape[1] :].tolist()))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/draft_vocab_coverage.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target, tokenizer = load_reference_target()
    eos = [tokenizer.eos_token_id]
    train = build_dataset(load_reference_train_rows(), tokenizer, max_length=384)
    vocabs = {
        "training answers (all seen)": frequency_ranked_vocab(
            train["input_ids"], 49152, loss_masks=train["loss_mask"], always_include=eos
        )
    }
    ranking = load_token_ranking()
    for size in args.sizes:
        vocabs[f"broad ranking top {size}"] = ranked_vocab(ranking, size, always_include=eos)
    outputs = {
        name: greedy_outputs(
            target, tokenizer, load_prompts(name, "eval", limit=args.limit), args.max_new_tokens
        )
        for name in DATASETS
    }
    results = {}
    for label, vocab in vocabs.items():
        for with_prompt in (False, True):
            key = f"{label}{' + prompt' if with_prompt else ''}"
            row = {"vocab_size": int(vocab.numel())}
            for name, pairs in outputs.items():
                inside = total = 0
                for prompt_ids, generated in pairs:
                    ids = torch.cat([vocab, torch.tensor(prompt_ids)]).unique() if with_prompt else vocab
                    inside += vocab_coverage(ids, generated) * len(generated)
                    total += len(generated)
                row[name] = inside / total
            results[key] = row
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python benchmarks/draft_vocab_coverage.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in (("limit", args.limit), ("max_new_tokens", args.max_new_tokens))
        ),
        "draft_vocab_coverage": results,
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print("| draft vocabulary | ids | " + " | ".join(DATASETS) + " |")
    print("| --- | --- |" + " --- |" * len(DATASETS))
    for key, row in results.items():
        cells = " | ".join(f"{100 * row[name]:.1f} %" for name in DATASETS)
        print(f"| {key} | {row['vocab_size']} | {cells} |")


if __name__ == "__main__":
    main()
