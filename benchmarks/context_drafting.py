"""Drafts from the context and stepping aside, side by side on the reference target: plain decoding, DSpark,
transformers' prompt lookup, and DSpark with lookup drafting and stepping aside (both lookup policies), with
the trained drafter (an untrained one without --drafter), plus stepping aside alone with an untrained
drafter (tau ~1).
Interleaved per prompt, so load drift on a shared CPU hits every method alike; speeds are against plain
decoding of the same prompts.

    python benchmarks/context_drafting.py --drafter path/to/drafter --limit 3 --max-new-tokens 96
    # stepping aside with an untrained drafter against plain decoding, as in benchmarks/README.md
    python benchmarks/context_drafting.py --methods step_aside_untrained --limit 10 --max-new-tokens 128 \
        --temperatures 0 1 --threads 1 --name step_aside_untrained
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
from pathlib import Path

import torch

from dspark_hf.generation.small_batch_linear import SmallBatchLinears
from dspark_hf.hardware import cpu_description
from dspark_hf.modeling_dspark import DSparkForCausalLM
from dspark_hf.reference.benchmarking import encode_chat_prompt, json_safe, run_interleaved, timed_generate
from dspark_hf.reference.target import load_reference_target
from dspark_hf.scheduling.cost_profile import profile_cost
from dspark_hf.training.data import load_prompts

DATASETS = ("gsm8k", "mt-bench", "humaneval")
COMBINED = {"lookup_drafting": True, "step_aside": True}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", help="trained DSpark drafter folder (omit: untrained drafter only)")
    parser.add_argument("--limit", type=int, default=3, help="prompts per dataset")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--methods", nargs="+", help="run only these methods (plain always runs), e.g. step_aside_untrained"
    )
    parser.add_argument(
        "--small-batch-linears",
        action="store_true",
        help="run every method, plain decoding included, inside SmallBatchLinears (dspark_hf.generation)",
    )
    parser.add_argument("--name", default="context_drafting")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    target, tokenizer = load_reference_target()
    # Every method, plain decoding and the cost profile included, in the same runtime.
    with SmallBatchLinears(target) if args.small_batch_linears else contextlib.nullcontext():
        measure(args, target, tokenizer)


def measure(args: argparse.Namespace, target, tokenizer) -> None:
    untrained = DSparkForCausalLM.from_target(target, tokenizer=tokenizer).eval()
    # DSpark and the combined method with the trained drafter (the untrained one without --drafter);
    # stepping aside alone with the untrained drafter.
    drafters = {"untrained": untrained}
    if args.drafter:
        drafters = {"trained": DSparkForCausalLM.from_pretrained(args.drafter, dtype=torch.float32).eval()}
    block = max(d.config.block_size for d in [untrained, *drafters.values()])
    profile = profile_cost(target, max_tokens=block + 1, context_length=256, repeats=5, show_progress=False)
    for drafter in [untrained, *drafters.values()]:
        drafter.set_cost_profile(profile)

    def assisted(name: str, drafter: DSparkForCausalLM, options: dict, do_sample: bool):
        def run(index: int, ids: torch.Tensor):
            drafter.attach_target(target)
            try:
                with drafter.verification_options(**options):
                    return timed_generate(
                        name,
                        index,
                        target,
                        ids,
                        assistant_model=drafter,
                        max_new_tokens=args.max_new_tokens,
                        do_sample=do_sample,
                        seed=index,
                    )
            finally:
                drafter.detach_target()

        return run

    def unassisted(name: str, do_sample: bool, **kwargs):
        return lambda index, ids: timed_generate(
            name,
            index,
            target,
            ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=do_sample,
            seed=index,
            **kwargs,
        )

    load = os.getloadavg()
    results = {
        "machine": {"cpu": cpu_description(), "threads": args.threads, "load_average_start": load},
        "cost_profile_ms": [round(1000 * s, 2) for s in profile.seconds_per_step],
        "config": vars(args),
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "runs": {},
    }
    for temperature in args.temperatures:
        do_sample = temperature > 0
        methods = {
            "plain": unassisted("plain", do_sample),
            "prompt_lookup": unassisted("prompt_lookup", do_sample, prompt_lookup_num_tokens=10),
        }
        for label, drafter in drafters.items():
            methods[f"dspark_{label}"] = assisted(f"dspark_{label}", drafter, {}, do_sample)
            methods[f"combined_{label}"] = assisted(f"combined_{label}", drafter, COMBINED, do_sample)
            methods[f"combined_expected_rate_{label}"] = assisted(
                f"combined_expected_rate_{label}",
                drafter,
                {**COMBINED, "lookup_policy": "expected_rate"},
                do_sample,
            )
        methods["step_aside_untrained"] = assisted(
            "step_aside_untrained", untrained, {"step_aside": True}, do_sample
        )
        if args.methods:
            unknown = set(args.methods) - set(methods)
            if unknown:
                raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {sorted(methods)}")
            methods = {name: run for name, run in methods.items() if name == "plain" or name in args.methods}
        for dataset in DATASETS:
            prompts = [encode_chat_prompt(tokenizer, p) for p in load_prompts(dataset, limit=args.limit)]
            runs = run_interleaved(methods, prompts)
            plain = {r.prompt_index: r for r in runs["plain"]}
            summary = {}
            for name, method_runs in runs.items():
                ratios = [r.tokens_per_s / plain[r.prompt_index].tokens_per_s for r in method_runs]
                accepted = sum(sum(r.accepted) for r in method_runs)
                rounds = sum(r.rounds for r in method_runs)
                sources: dict[str, dict] = {}
                for r in method_runs:
                    for source, entry in r.sources.items():
                        total = sources.setdefault(source, {"rounds": 0, "drafted": 0, "accepted": 0})
                        for key in total:
                            total[key] += entry[key]
                summary[name] = {
                    "tau": (accepted + rounds) / rounds if rounds else None,
                    "speed_vs_plain_median": statistics.median(ratios),
                    "speed_vs_plain_total": sum(plain[r.prompt_index].seconds for r in method_runs)
                    / sum(r.seconds for r in method_runs),
                    "tokens_per_s": statistics.median(r.tokens_per_s for r in method_runs),
                    "identical_to_plain": None
                    if do_sample
                    else all(r.output_ids == plain[r.prompt_index].output_ids for r in method_runs),
                    "sources": sources,
                }
                print(
                    f"T={temperature} {dataset:10s} {name:34s} tau {summary[name]['tau'] or 0:5.2f} "
                    f"speed {summary[name]['speed_vs_plain_total']:5.2f}x  {sources}",
                    flush=True,
                )
            results["runs"][f"{dataset}/T{temperature:g}"] = summary
            write(results, args)  # after every dataset: a long run on a shared CPU keeps what it measured
    print(f"wrote {write(results, args)}")


def write(results: dict, args: argparse.Namespace) -> Path:
    results["machine"]["load_average_end"] = os.getloadavg()
    path = Path(args.output_dir) / f"{args.name}.json"
    path.write_text(json.dumps(json_safe(results), indent=1) + "\n")
    return path


if __name__ == "__main__":
    main()
