"""The train and calibrate workflows behind `dspark train`, `dspark calibrate` and `examples/train_dspark.py`.

Each is a library function over dataclass arguments, so the command line, the example script and notebooks
run the same code; the command line only parses flags into the dataclasses (with `HfArgumentParser`).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.trainer_utils import get_last_checkpoint

from ..errors import InputError, check_model_source
from ..formats.registry import NATIVE_LAYOUT, detect_layout
from ..generation.small_batch_linear import SmallBatchLinears
from ..hardware import cpu_has_native_bf16
from ..heads import MARKOV_HEADS
from ..modeling_dspark import DSparkForCausalLM
from ..reference.benchmarking import encode_chat_prompt
from ..reference.target import load_reference_target
from ..scheduling.calibration import calibrate_sts, format_calibration_table, record_calibration_rounds
from ..scheduling.cost_profile import profile_cost
from ..warm_start import LAYER_INITS
from .arguments import DSparkTrainingArguments
from .data import build_dataset, load_prompts, read_jsonl, reference_training_rows, regenerate_responses
from .interruption import train_saving_on_interrupt
from .recipes import RECIPES, get_recipe
from .trainer import DSparkTrainer, place_target

# The draft layers' projections and `fc`, which maps the target's features; the embedding and LM head are the
# target's and stay frozen. The confidence head is tiny, so it is trained in full.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc"]


@dataclass
class TrainScriptArguments:
    """What `dspark train` trains on and which drafter it trains; the rest is `DSparkTrainingArguments`."""

    target: str | None = field(
        default=None,
        metadata={"help": "Target model folder or Hub id; None: the offline SmolLM2-135M-Instruct target."},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "JSON-lines chat rows ({'messages': [...]} or {'prompt', 'response'}); required with "
            "--target. None with the reference target: the quickstart's data, its 2,589 vendored answers.",
            "aliases": ["--dataset_path"],
        },
    )
    regenerate: bool = field(
        default=False,
        metadata={
            "help": "Answer the rows' first user turns with the target first (drafters learn best on the "
            "target's own outputs); cached and resumable in OUTPUT_DIR/regenerated.jsonl."
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Answer length for --regenerate."})
    regenerate_batch_size: int = field(
        default=8,
        metadata={"help": "Prompts answered together by --regenerate (on a GPU, 64 or more)."},
    )
    max_length: int = field(default=2048, metadata={"help": "Tokens per training sequence."})
    eval_rows: int = field(default=0, metadata={"help": "Rows held out to evaluate acceptance at the end."})
    drafter: str | None = field(
        default=None, metadata={"help": "Continue from this drafter folder instead of a fresh drafter."}
    )
    num_hidden_layers: int | None = field(
        default=None,
        metadata={
            "help": "Draft layers of a fresh drafter; None: DSparkConfig's.",
            "aliases": ["--num-layers", "--num_draft_layers"],
        },
    )
    layer_init: str = field(
        default="random",
        metadata={
            "help": "How a fresh drafter's layers start: random, or target (copies of the target's last "
            "layers; dspark_hf.warm_start).",
            "choices": list(LAYER_INITS),
        },
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens drafted per block of a fresh drafter; None: DSparkConfig's."}
    )
    markov_rank: int | None = field(
        default=None,
        metadata={"help": "Markov head rank of a fresh drafter, 0 for plain DFlash; None: DSparkConfig's."},
    )
    markov_head_type: str | None = field(
        default=None,
        metadata={
            "help": "Markov head type of a fresh drafter; None: DSparkConfig's.",
            "choices": list(MARKOV_HEADS),
            "aliases": ["--markov-head"],
        },
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "A named recipe of dspark_hf.training.recipes: its drafter settings and loss weights win "
            "over the flags' (None: DSparkConfig's and DSparkTrainingArguments' own).",
            "choices": sorted(RECIPES),
        },
    )
    lora_r: int = field(
        default=0, metadata={"help": "Train LoRA adapters of this rank (0: train all weights)."}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Resume from the last checkpoint in --output_dir (or --resume_from_checkpoint's)."},
    )

    def __post_init__(self):
        if self.target is not None and self.dataset is None:
            raise ValueError("--dataset is required with --target (chat rows answered by that target).")
        if self.drafter is not None and self.drafter_overrides():
            raise ValueError(f"{sorted(self.drafter_overrides())} define a new drafter, not --drafter's.")
        if self.drafter is not None and self.recipe is not None and get_recipe(self.recipe).drafter:
            raise ValueError(f"--recipe {self.recipe} defines a new drafter, not --drafter's.")
        if self.regenerate_batch_size < 1:
            raise ValueError(f"--regenerate_batch_size must be >= 1, got {self.regenerate_batch_size}.")

    def drafter_overrides(self) -> dict[str, Any]:
        """The `DSparkConfig` fields given for a fresh drafter."""
        shape = {
            "num_hidden_layers": self.num_hidden_layers,
            "block_size": self.block_size,
            "markov_rank": self.markov_rank,
            "markov_head_type": self.markov_head_type,
        }
        return {name: value for name, value in shape.items() if value is not None}


def target_load_dtype() -> str | torch.dtype:
    """The dtype to load a target in: its checkpoint's ("auto") on a GPU or on a CPU that multiplies
    bfloat16 natively, float32 on a CPU that would emulate a bfloat16 checkpoint several times slower."""
    if torch.cuda.is_available() or cpu_has_native_bf16():
        return "auto"
    return torch.float32


def load_target(name_or_path: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The target in eval mode and its tokenizer; None loads the offline reference target. A local folder that
    is missing or malformed, or holds no tokenizer, raises an InputError."""
    if name_or_path is None:
        return load_reference_target()
    check_model_source(name_or_path, "target")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise InputError(f"target {name_or_path} has no usable tokenizer ({err}).") from err
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=target_load_dtype())
    return model.eval(), tokenizer


def _first_user_turn(row: dict) -> str:
    if "prompt" in row:
        return row["prompt"]
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def dataset_rows(script_args: TrainScriptArguments) -> list[dict]:
    """The chat rows of `--dataset`, by default the reference answers the quickstart trains on; an InputError
    for a dataset file that is missing, malformed or empty."""
    if script_args.dataset is None:
        return reference_training_rows("train")
    rows = read_jsonl(Path(script_args.dataset), "--dataset")
    if not rows:
        raise InputError(f"--dataset {script_args.dataset} holds no rows.")
    return rows


def training_rows(
    script_args: TrainScriptArguments,
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str,
    rows: list[dict] | None = None,
) -> list[dict]:
    """The chat rows to train on: `rows` (default: `dataset_rows`), answered anew by the target with
    `regenerate`.

    Under several processes (torchrun, accelerate launch) the main process regenerates while the others
    wait, then they read its answers from the cache: each answer is generated and written once. The wait
    counts against the process group's timeout (`--ddp_timeout`, 30 minutes by default)."""
    rows = dataset_rows(script_args) if rows is None else rows
    if not script_args.regenerate:
        return rows
    with PartialState().main_process_first():
        return regenerate_responses(
            [_first_user_turn(row) for row in rows],
            target,
            tokenizer,
            Path(output_dir) / "regenerated.jsonl",
            max_new_tokens=script_args.max_new_tokens,
            batch_size=script_args.regenerate_batch_size,
        )


def build_drafter(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: str | None = None,
    drafter: str | None = None,
    **config_overrides: Any,
) -> DSparkForCausalLM:
    """The drafter a run trains: the saved `drafter` folder loaded, or a fresh drafter for `target` with
    `config_overrides` (e.g. its shape) and the `recipe`'s drafter settings, which win.

    Its weights are float32 whatever the target's (unless `config_overrides` names a `dtype`): they are the
    master weights that mixed precision (`--bf16`) updates; the trainer holds the frozen copies of the
    target's weights in the compute dtype."""
    if drafter is not None:
        return DSparkForCausalLM.from_pretrained(drafter, dtype=torch.float32)
    settings = {"dtype": torch.float32, **config_overrides, **(get_recipe(recipe).drafter if recipe else {})}
    return DSparkForCausalLM.from_target(target, tokenizer=tokenizer, **settings)


def lora_config(rank: int) -> Any:
    """The PEFT LoRA config of `rank` over the draft layers and `fc` (None for rank 0: full training)."""
    if not rank:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=["confidence_head"],
        task_type=None,
    )


def with_recipe(training_args: DSparkTrainingArguments, recipe: str | None) -> DSparkTrainingArguments:
    """`training_args` with the named recipe's training settings (its loss weights), which win."""
    if recipe is None or not get_recipe(recipe).training:
        return training_args
    return dataclasses.replace(training_args, **get_recipe(recipe).training)


def _has_checkpoint(output_dir: str) -> bool:
    return Path(output_dir).is_dir() and get_last_checkpoint(output_dir) is not None


def train_drafter(
    script_args: TrainScriptArguments, training_args: DSparkTrainingArguments
) -> dict[str, float]:
    """Train a drafter as `dspark train` does, save it to `training_args.output_dir`, and return the held-out
    metrics (empty without `eval_rows`). `script_args.recipe`'s training settings win over `training_args`'.
    Raises a ValueError on unusable arguments or data; Ctrl-C saves a checkpoint to resume from
    (`script_args.resume`) and raises KeyboardInterrupt."""
    training_args = with_recipe(training_args, script_args.recipe)
    rows = dataset_rows(script_args)  # a bad dataset or drafter folder fails before the target loads
    if script_args.drafter is not None:
        check_model_source(script_args.drafter, "--drafter")
    resume = training_args.resume_from_checkpoint or script_args.resume or None
    if resume is True and not _has_checkpoint(training_args.output_dir):
        raise InputError(f"--resume: {training_args.output_dir} holds no checkpoint to resume from.")
    target, tokenizer = load_target(script_args.target)
    # Regeneration runs before the trainer places the target: on the accelerator, where there is one.
    target = place_target(target, training_args.device)
    rows = training_rows(script_args, target, tokenizer, training_args.output_dir, rows)
    try:
        dataset = build_dataset(rows, tokenizer, max_length=script_args.max_length)
    except ValueError as err:
        raise InputError(f"--dataset {script_args.dataset or 'default'}: {err}") from err
    eval_dataset = None
    if script_args.eval_rows:
        split = dataset.train_test_split(test_size=script_args.eval_rows, seed=training_args.seed)
        dataset, eval_dataset = split["train"], split["test"]
    trainer = DSparkTrainer(
        model=build_drafter(
            target,
            tokenizer,
            script_args.recipe,
            script_args.drafter,
            layer_init=script_args.layer_init,
            **script_args.drafter_overrides(),
        ),
        target_model=target,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(script_args.lora_r),
    )
    train_saving_on_interrupt(trainer, resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer.evaluate() if eval_dataset is not None else {}


@dataclass
class CalibrationReport:
    """What `calibrate_drafter` did, for the command line to print."""

    table: str
    rounds: int
    saved_config: Path
    seconds_per_step: list[float] | None = None


def calibration_prompts(prompts_per_set: int) -> list[str]:
    """The last rows of each eval set: the quickstart and the benchmarks evaluate on the first ones."""
    if prompts_per_set < 1:
        raise ValueError("--prompts_per_set must be >= 1.")
    return [text for name in ("gsm8k", "mt-bench") for text in load_prompts(name, "eval")[-prompts_per_set:]]


def _calibration_output(drafter: str, output_dir: str | None) -> tuple[Path, bool]:
    """Where the calibrated drafter goes, and whether that is the drafter's own folder (native only)."""
    output = Path(output_dir or drafter)
    in_place = output.resolve() == Path(drafter).resolve()
    layout = detect_layout(drafter)
    if in_place and layout != NATIVE_LAYOUT:
        raise ValueError(
            f"the drafter folder is in the {layout} layout, which the calibration would overwrite with a "
            "native config; pass --output_dir to save a native copy."
        )
    return output, in_place


def calibrate_drafter(
    drafter_path: str,
    target: str | None = None,
    *,
    prompts_per_set: int = 8,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    profile_target_cost: bool = False,
    profile_context_length: int = 256,
    profile_small_batch_linears: bool = False,
    output_dir: str | None = None,
    seed: int = 0,
) -> CalibrationReport:
    """Fit the confidence temperatures of the drafter at `drafter_path` on held-out prompts (full blocks
    verified), optionally profile the target's cost (with `SmallBatchLinears` active when
    `profile_small_batch_linears`, for generation that runs under it), and save the config (in place unless
    `output_dir`).
    Raises a ValueError on unusable arguments or too few rounds."""
    output, in_place = _calibration_output(drafter_path, output_dir)
    prompts = calibration_prompts(prompts_per_set)
    check_model_source(drafter_path, "drafter folder")  # before the target loads
    if target is not None:
        check_model_source(target, "target")
    target_model, tokenizer = load_target(target)
    # The target supplies the copies of its embedding and LM head that a saved drafter may omit.
    drafter = DSparkForCausalLM.from_pretrained(drafter_path, verifier=target_model).eval()
    drafter.attach_target(target_model)
    rounds = record_calibration_rounds(
        target_model,
        drafter,
        [encode_chat_prompt(tokenizer, prompt) for prompt in prompts],
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        seed=seed,
    )
    drafter.detach_target()
    temperatures = calibrate_sts(rounds, num_positions=drafter.config.block_size)
    drafter.config.confidence_temperatures = temperatures
    table = format_calibration_table(rounds, temperatures)
    report = CalibrationReport(table, len(rounds), output / "config.json")
    if profile_target_cost:
        runtime = SmallBatchLinears(target_model) if profile_small_batch_linears else nullcontext()
        with runtime:
            profile = profile_cost(
                target_model, max_tokens=drafter.config.block_size + 1, context_length=profile_context_length
            )
        profile.metadata["small_batch_linears"] = profile_small_batch_linears
        drafter.set_cost_profile(profile)
        report.seconds_per_step = list(profile.seconds_per_step)
    if in_place:  # the weights did not change; rewriting them would replace the files they are mapped from
        drafter.config.save_pretrained(output)
    else:
        drafter.save_pretrained(output)
    return report


__all__ = [
    "target_load_dtype",
    "TrainScriptArguments",
    "LORA_TARGET_MODULES",
    "load_target",
    "dataset_rows",
    "training_rows",
    "build_drafter",
    "with_recipe",
    "lora_config",
    "train_drafter",
    "CalibrationReport",
    "calibration_prompts",
    "calibrate_drafter",
]
