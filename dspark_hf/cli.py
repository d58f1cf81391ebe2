"""The `dspark` command line.

Every subcommand's arguments are dataclass fields parsed by transformers' `HfArgumentParser`, spelled with
underscores (`--max_new_tokens`; the dashed spelling is accepted too). A subcommand is its dataclasses plus
`_run_<name>(args)`, which calls the library function that does the work.

Errors a user can fix (bad flags, missing or malformed files, a missing optional package: the library's
ValueErrors, `InputError`s among them, OSErrors and ImportErrors) are printed as one line, `dspark <command>:
<what is wrong>`, with exit code 2; a check that finds faults exits with 1 and an interrupted command with
130, after a line that says how to resume. Any other exception is a bug and shows its traceback;
`dspark --debug` or `DSPARK_DEBUG=1` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from transformers import HfArgumentParser

DEBUG_ENV_VAR = "DSPARK_DEBUG"
EXIT_FAULTS = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2), pointing at `--help` for the
    usage instead of printing it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(HfArgumentParser, _OneLineErrorParser):
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


class CommandExit(SystemExit):
    """Exit with `code` once the message is on stderr; `str()` is the message, for callers of `main`."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _fail(command: str, message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print `message` as one line naming the command and exit with `code`."""
    line = f"dspark {command}: {' '.join(message.split())}"
    print(line, file=sys.stderr)
    raise CommandExit(line, code)


def _command_line(argv: list[str], flag: str | None = None) -> str:
    """The shell command that ran `argv`, with `flag` appended unless given already."""
    words = [*argv, *([flag] if flag and flag not in argv else [])]
    return shlex.join(["dspark", *words])


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
    from .errors import InputError, read_json_file
    from .hub.push import push_folder

    options = _dataclass_from_args(PushArguments, args)
    results = read_json_file(options.results, "--results file") if options.results else None
    if results is not None and not isinstance(results, dict):
        raise InputError(
            f"--results file {options.results} holds a JSON {type(results).__name__}; expected an object."
        )
    commit = push_folder(options.folder, options.repo_id, private=options.private or None, results=results)
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
    dst = convert_checkpoint(options.src, options.dst, to=options.format, verifier=options.verifier)
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
    from .errors import check_model_source
    from .formats.registry import load_config
    from .modeling_dspark import DSparkForCausalLM

    options = _dataclass_from_args(CheckArguments, args)
    check_model_source(options.target, "target")
    load_config(options.drafter)  # a missing, malformed or non-drafter folder fails before the target loads
    target = AutoModelForCausalLM.from_pretrained(options.target, dtype="auto").eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(options.target)
    except (OSError, ValueError):
        tokenizer = None
        print("warning: the target folder has no tokenizer; the mask token is checked on the probe only.")
    drafter = DSparkForCausalLM.from_pretrained(options.drafter, verifier=target).eval()
    report = check_drafter(target, drafter, tokenizer, max_new_tokens=options.max_new_tokens)
    print(report.summary())
    if report.faults:
        _fail("check", f"structural fault: {report.faults[0]}", EXIT_FAULTS)


# ---- dspark train ------------------------------------------------------------------------------------------


def _run_train(args: argparse.Namespace) -> None:
    from .training.arguments import DSparkTrainingArguments
    from .training.workflow import TrainScriptArguments, train_drafter

    script_args = _dataclass_from_args(TrainScriptArguments, args)
    training_args = _dataclass_from_args(DSparkTrainingArguments, args)
    metrics = train_drafter(script_args, training_args)
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


# ---- interruption ------------------------------------------------------------------------------------------


def _last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


def _train_resumption(args: argparse.Namespace, argv: list[str]) -> str:
    checkpoint = _last_checkpoint(args.output_dir)
    if checkpoint is None:
        return f"no checkpoint in {args.output_dir} yet; rerun to start again: {_command_line(argv)}"
    return f"saved {checkpoint}; resume with: {_command_line(argv, '--resume')}"


def _quickstart_resumption(args: argparse.Namespace, argv: list[str]) -> str:
    from .reference.quickstart import checkpoint_dir

    checkpoint = _last_checkpoint(checkpoint_dir(args.output_dir))
    if checkpoint is None:
        return f"no training checkpoint yet; rerun to start again: {_command_line(argv)}"
    return f"saved {checkpoint}; resume with: {_command_line(argv, '--resume')}"


def _data_resumption(args: argparse.Namespace, argv: list[str]) -> str:
    command = _command_line(argv)
    return f"the answers finished so far are in {args.output}; resume with the same command: {command}"


# ---- the command -------------------------------------------------------------------------------------------


def _commands() -> dict[str, tuple[str, tuple[type, ...], dict]]:
    """Per subcommand: its help, its argument dataclasses and any parser defaults (`func` runs it,
    `resumption` says how to resume it after an interruption)."""
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
            "Train a DSpark drafter for a target on chat data (default: the quickstart's target and data). "
            "Ctrl-C saves a checkpoint after the current step; --resume continues from it.",
            (TrainScriptArguments, DSparkTrainingArguments),
            {"func": _run_train, "resumption": _train_resumption, "output_dir": "dspark-drafter"},
        ),
        "quickstart": (
            "The main job: train a DSpark drafter for SmolLM2-135M-Instruct on the bundled data and compare "
            "assisted against plain decoding. Ctrl-C while training saves a checkpoint; --resume continues.",
            (QuickstartOptions,),
            {"func": _run_quickstart, "resumption": _quickstart_resumption},
        ),
        "data": (
            "Build on-policy training data: the reference target's greedy and sampled answers to the "
            "training prompt pool (resumable).",
            (OnPolicyDataArguments,),
            {"func": _run_data, "resumption": _data_resumption},
        ),
        "calibrate": (
            "Fit the confidence head's per-position temperatures (sequential temperature scaling) on "
            "held-out prompts, and optionally profile the target's cost for confidence scheduling.",
            (CalibrateArguments,),
            {"func": _run_calibrate},
        ),
    }


def _debugging(args: argparse.Namespace) -> bool:
    return args.debug or os.environ.get(DEBUG_ENV_VAR, "").lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> None:
    """Run `dspark` with `argv` (default: the process's arguments); see the module doc for the exit codes."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _OneLineErrorParser(
        prog="dspark",
        description="DSpark speculative decoding for transformers. Flags are spelled with underscores "
        "(--max_new_tokens); dashes work too. Exit codes: 0 done, 1 a check found faults, 2 bad arguments "
        "or input (one line on stderr says which), 130 interrupted.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"Show the traceback of any error, not only of bugs (also {DEBUG_ENV_VAR}=1).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_subcommand_parser)
    for name, (help, dataclass_types, defaults) in _commands().items():
        subparsers.add_parser(
            name, help=help, description=help, dataclass_types=dataclass_types
        ).set_defaults(**defaults)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        resumption: Callable | None = getattr(args, "resumption", None)
        message = f"interrupted; {resumption(args, argv)}" if resumption else "interrupted."
        _fail(args.command, message, EXIT_INTERRUPTED)
    except (ValueError, OSError, ImportError) as err:  # unusable arguments, data, files or environment
        if _debugging(args):
            raise
        _fail(args.command, str(err) or type(err).__name__)


if __name__ == "__main__":
    main()
