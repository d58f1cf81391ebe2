"""The `dspark` command line.

Every subcommand's arguments are dataclass fields parsed by transformers' `HfArgumentParser`, spelled with
underscores (`--max_new_tokens`; the dashed spelling is accepted too). A subcommand is its dataclasses plus
`_run_<name>(args)`, which calls the library function that does the work.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from transformers import HfArgumentParser


class _CommandParser(HfArgumentParser):
    """`HfArgumentParser` in which a dataclass field with `positional` in its metadata is a positional
    argument (`dspark convert SRC DST`) rather than a `--flag`."""

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        if not field.metadata.get("positional"):
            HfArgumentParser._parse_dataclass_field(parser, field)
            return
        options = {k: v for k, v in field.metadata.items() if k != "positional"}
        parser.add_argument(field.name, type=field.type, **options)


def _positional(help: str) -> dataclasses.Field:
    return field(metadata={"positional": True, "help": help})


def _subcommand_parser(dataclass_types=(), **kwargs) -> _CommandParser:
    return _CommandParser(dataclass_types, **kwargs)


def _dataclass_from_args(options: type, args: argparse.Namespace):
    """The dataclass `options` from the parsed flags."""
    return options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options) if f.init})


# ---- dspark push -------------------------------------------------------------------------------------------


@dataclass
class PushArguments:
    folder: str = _positional("Drafter folder (any layout dspark_hf loads; published in the native one).")
    repo_id: str = _positional("Hub repo id, e.g. my-org/dspark-qwen3-4b.")
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    results: str | None = field(
        default=None,
        metadata={
            "help": 'JSON file of measured results for the card: {"<dataset>": {"tau": ..., "speedup": ...}, '
            '"command": "..."}.'
        },
    )


def _run_push(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .hub.push import push_folder

    options = _dataclass_from_args(PushArguments, args)
    results = json.loads(Path(options.results).read_text()) if options.results else None
    try:
        commit = push_folder(
            options.folder, options.repo_id, private=options.private or None, results=results
        )
    except ValueError as err:
        raise SystemExit(f"dspark push: {err}") from err
    print(f"Published {options.folder} to {commit.repo_url.url} ({commit.commit_url})")


# ---- dspark convert ----------------------------------------------------------------------------------------


def _layouts() -> list[str]:
    from .formats.registry import LAYOUTS

    return list(LAYOUTS)


@dataclass
class ConvertArguments:
    src: str = _positional("Drafter folder to convert.")
    dst: str = _positional("Output folder.")
    format: str | None = field(
        default=None,
        metadata={
            "help": "Output layout (default: deepspec for a native folder, native for the others).",
            "choices": _layouts(),
            "aliases": ["--to"],
        },
    )
    verifier: str | None = field(
        default=None,
        metadata={
            "help": "Target model folder or Hub id: recorded as the verifier of a speculators export, and "
            "the source of the embedding / LM head a speculators checkpoint omits (default: the drafter's "
            "recorded target)."
        },
    )


def _run_convert(args: argparse.Namespace) -> None:
    from .formats.convert import convert_checkpoint
    from .formats.registry import detect_layout, get_format, load_config

    options = _dataclass_from_args(ConvertArguments, args)
    try:
        dst = convert_checkpoint(options.src, options.dst, to=options.format, verifier=options.verifier)
    except ValueError as err:
        raise SystemExit(f"dspark convert: {err}") from err
    written = get_format(detect_layout(dst))
    print(f"Wrote the {written.name}-layout checkpoint to {dst}.\n")
    print(f"transformers: {written.loading_instruction(dst)}\n")
    served = dst if written.served_by_engines else options.src
    print(get_format(detect_layout(served)).serving_instructions(load_config(dst), served))


# ---- dspark check ------------------------------------------------------------------------------------------


@dataclass
class CheckArguments:
    target: str = _positional("Target model folder or Hub id (with its tokenizer).")
    drafter: str = _positional("Drafter folder or Hub id (any layout dspark_hf loads).")
    max_new_tokens: int = field(default=32, metadata={"help": "Greedy target tokens per probe prompt."})


def _run_check(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .check import check_drafter
    from .modeling_dspark import DSparkForCausalLM

    options = _dataclass_from_args(CheckArguments, args)
    target = AutoModelForCausalLM.from_pretrained(options.target, dtype="auto").eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(options.target)
    except (OSError, ValueError):
        tokenizer = None
        print("warning: the target folder has no tokenizer; the mask token is checked on the probe only.")
    try:
        drafter = DSparkForCausalLM.from_pretrained(options.drafter, verifier=target).eval()
    except ValueError as err:
        raise SystemExit(f"dspark check: {err}") from err
    report = check_drafter(target, drafter, tokenizer, max_new_tokens=options.max_new_tokens)
    print(report.summary())
    if report.faults:
        raise SystemExit(f"dspark check: structural fault: {report.faults[0]}")


# ---- dspark train ------------------------------------------------------------------------------------------


def _run_train(args: argparse.Namespace) -> None:
    from .training.arguments import DSparkTrainingArguments
    from .training.workflow import TrainScriptArguments, train_drafter

    try:
        script_args = _dataclass_from_args(TrainScriptArguments, args)
        training_args = _dataclass_from_args(DSparkTrainingArguments, args)
        metrics = train_drafter(script_args, training_args)
    except ValueError as err:
        raise SystemExit(f"dspark train: {err}") from err
    tau = metrics.get("eval_expected_tau")
    held_out = f" (held-out expected tau {tau:.2f})" if tau else ""
    print(f"Saved the drafter to {training_args.output_dir}{held_out}")


# ---- dspark quickstart / data / calibrate ------------------------------------------------------------------


def _run_quickstart(args: argparse.Namespace) -> None:
    from .reference.quickstart import QuickstartOptions, run_quickstart

    run_quickstart(_dataclass_from_args(QuickstartOptions, args))


def _run_data(args: argparse.Namespace) -> None:
    import json

    from .reference.onpolicy import OnPolicyDataArguments, build_onpolicy_data, onpolicy_summary

    options = _dataclass_from_args(OnPolicyDataArguments, args)
    build_onpolicy_data(options)
    print(json.dumps(onpolicy_summary(options.output)))


@dataclass
class CalibrateArguments:
    drafter: str = _positional("Drafter folder; its config is updated in place unless --output_dir.")
    target: str | None = field(
        default=None,
        metadata={
            "help": "Target model folder or Hub id (default: the offline SmolLM2-135M-Instruct reference "
            "target)."
        },
    )
    prompts_per_set: int = field(
        default=8,
        metadata={
            "help": "Held-out prompts taken from the end of the GSM8K and of the MT-Bench eval sets each."
        },
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per prompt."})
    do_sample: bool = field(
        default=False,
        metadata={
            "help": "Record rounds of sampling at temperature 1 instead of greedy decoding (calibrate for "
            "the decoding mode you serve)."
        },
    )
    profile_cost: bool = field(
        default=False,
        metadata={
            "help": "Also time the target's forward for 1..block_size+1 tokens on this machine and store the "
            "profile in the config (needed by generation_config.confidence_scheduling)."
        },
    )
    profile_context_length: int = field(
        default=256, metadata={"help": "Cached tokens while profiling the target."}
    )
    small_batch_linears: bool = field(
        default=False,
        metadata={
            "help": "Profile the cost with dspark_hf.generation.small_batch_linear.SmallBatchLinears active "
            "(for generation that runs inside it: verifying a few tokens then costs about as much as one)."
        },
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Save the calibrated drafter here instead of in place."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling."})


def _run_calibrate(args: argparse.Namespace) -> None:
    from .training.workflow import calibrate_drafter

    options = _dataclass_from_args(CalibrateArguments, args)
    try:
        report = calibrate_drafter(
            options.drafter,
            options.target,
            prompts_per_set=options.prompts_per_set,
            max_new_tokens=options.max_new_tokens,
            do_sample=options.do_sample,
            profile_target_cost=options.profile_cost,
            profile_context_length=options.profile_context_length,
            profile_small_batch_linears=options.small_batch_linears,
            output_dir=options.output_dir,
            seed=options.seed,
        )
    except ValueError as err:
        raise SystemExit(f"dspark calibrate: {err}") from err
    mode = "sampling at temperature 1" if options.do_sample else "greedy decoding"
    count = options.prompts_per_set
    print(
        f"{report.rounds} rounds of {mode}, full block verified, on the last {count} GSM8K and the last "
        f"{count} MT-Bench eval prompts; prefix survival a_k raw -> STS:"
    )
    print(report.table)
    if report.seconds_per_step is not None:
        milliseconds = ", ".join(f"{1000 * s:.1f}" for s in report.seconds_per_step)
        print(f"target forward time for 1..{len(report.seconds_per_step)} tokens (ms): {milliseconds}")
    print(f"Saved the calibrated drafter config to {report.saved_config}.")


# ---- the command -------------------------------------------------------------------------------------------


def _commands() -> dict[str, tuple[str, tuple[type, ...], dict]]:
    """Per subcommand: its help, its argument dataclasses and any parser defaults."""
    from .reference.onpolicy import OnPolicyDataArguments
    from .reference.quickstart import QuickstartOptions
    from .training.arguments import DSparkTrainingArguments
    from .training.workflow import TrainScriptArguments

    return {
        "push": (
            "Publish a drafter folder to the Hugging Face Hub with its model card (safetensors files only).",
            (PushArguments,),
            {"func": _run_push},
        ),
        "convert": (
            "Convert a drafter between the checkpoint layouts of dspark_hf.formats (native, DeepSpec's "
            "served by vLLM and SGLang, speculators' served by vLLM).",
            (ConvertArguments,),
            {"func": _run_convert},
        ),
        "check": (
            "Check a drafter against its target before serving or training: sizes, target layers, the "
            "embedding / LM-head copies, the mask token, dtype, and a teacher-forced acceptance probe. Exit "
            "code 1 on a structural fault.",
            (CheckArguments,),
            {"func": _run_check},
        ),
        "train": (
            "Train a DSpark drafter for a target on chat data (default: the quickstart's target and data).",
            (TrainScriptArguments, DSparkTrainingArguments),
            {"func": _run_train, "output_dir": "dspark-drafter"},
        ),
        "quickstart": (
            "The main job: train a DSpark drafter for SmolLM2-135M-Instruct on the bundled data and compare "
            "assisted against plain decoding.",
            (QuickstartOptions,),
            {"func": _run_quickstart},
        ),
        "data": (
            "Build on-policy training data: the reference target's greedy and sampled answers to the "
            "training prompt pool (resumable).",
            (OnPolicyDataArguments,),
            {"func": _run_data},
        ),
        "calibrate": (
            "Fit the confidence head's per-position temperatures (sequential temperature scaling) on "
            "held-out prompts, and optionally profile the target's cost for confidence scheduling.",
            (CalibrateArguments,),
            {"func": _run_calibrate},
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dspark",
        description="DSpark speculative decoding for transformers. Flags are spelled with underscores "
        "(--max_new_tokens); dashes work too.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_subcommand_parser)
    for name, (help, dataclass_types, defaults) in _commands().items():
        subparsers.add_parser(
            name, help=help, description=help, dataclass_types=dataclass_types
        ).set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
