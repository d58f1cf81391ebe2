"""The `dspark` command line. Each subcommand is `_add_<name>_command(subparsers)`, which declares its flags,
and `_run_<name>(args)`, which runs it (the work itself lives in library functions)."""

from __future__ import annotations

import argparse

from transformers import HfArgumentParser


def _run_push(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .hub import push_folder

    results = json.loads(Path(args.results).read_text()) if args.results else None
    try:
        commit = push_folder(args.folder, args.repo_id, private=args.private or None, results=results)
    except ValueError as err:
        raise SystemExit(f"dspark push: {err}") from err
    print(f"Published {args.folder} to {commit.repo_url.url} ({commit.commit_url})")


def _add_push_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="Publish a drafter folder to the Hugging Face Hub with its model card (safetensors files only).",
    )
    parser.add_argument(
        "folder", help="Drafter folder (native, DeepSpec or speculators layout; published in the native one)."
    )
    parser.add_argument("repo_id", help="Hub repo id, e.g. my-org/dspark-qwen3-4b.")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument(
        "--results",
        help='JSON file of measured results for the card: {"<dataset>": {"tau": ..., "speedup": ...}, '
        '"command": "..."}.',
    )
    parser.set_defaults(func=_run_push)


def _run_convert(args: argparse.Namespace) -> None:
    from .configuration_dspark import DSparkConfig
    from .convert import convert_checkpoint, detect_layout, serving_instructions

    try:
        dst = convert_checkpoint(args.src, args.dst, to=args.format, verifier=args.verifier)
    except ValueError as err:
        raise SystemExit(f"dspark convert: {err}") from err
    layout = detect_layout(dst)
    print(f"Wrote the {layout}-layout checkpoint to {dst}.\n")
    print(f'transformers: import dspark_hf; AutoModel.from_pretrained("{dst}")\n')
    served, served_layout = (dst, layout) if layout != "native" else (args.src, detect_layout(args.src))
    print(serving_instructions(DSparkConfig.from_pretrained(dst), served, served_layout))


def _add_convert_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="Convert a drafter between the native layout, DeepSpec's (served by vLLM and SGLang) and "
        "speculators' (served by vLLM).",
    )
    parser.add_argument("src", help="Drafter folder to convert.")
    parser.add_argument("dst", help="Output folder.")
    parser.add_argument(
        "--format",
        "--to",
        dest="format",
        choices=["native", "deepspec", "speculators"],
        help="Output layout (default: deepspec for a native folder, native for the others).",
    )
    parser.add_argument(
        "--verifier",
        help="Target model folder or Hub id: recorded as the verifier of a speculators export, and the "
        "source of the embedding / LM head a speculators checkpoint omits (default: the drafter's "
        "recorded target).",
    )
    parser.set_defaults(func=_run_convert)


def _run_check(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .check import check_drafter
    from .modeling_dspark import DSparkForCausalLM

    target = AutoModelForCausalLM.from_pretrained(args.target, dtype="auto").eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.target)
    except (OSError, ValueError):
        tokenizer = None
        print("warning: the target folder has no tokenizer; the mask token is checked on the probe only.")
    try:
        drafter = DSparkForCausalLM.from_pretrained(args.drafter, verifier=target).eval()
    except ValueError as err:
        raise SystemExit(f"dspark check: {err}") from err
    report = check_drafter(target, drafter, tokenizer, max_new_tokens=args.max_new_tokens)
    print(report.summary())
    if report.faults:
        raise SystemExit(f"dspark check: structural fault: {report.faults[0]}")


def _add_check_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "check",
        help="Check a drafter against its target before serving or training: sizes, target layers, the "
        "embedding / LM-head copies, the mask token, dtype, and a teacher-forced acceptance probe. Exit "
        "code 1 on a structural fault.",
    )
    parser.add_argument("target", help="Target model folder or Hub id (with its tokenizer).")
    parser.add_argument("drafter", help="Drafter folder or Hub id (native, DeepSpec or speculators layout).")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="Greedy target tokens per probe prompt."
    )
    parser.set_defaults(func=_run_check)


def _run_train(args: argparse.Namespace) -> None:
    from .training_args import DSparkTrainingArguments
    from .workflows import TrainScriptArguments, train_drafter

    try:
        script_args = _dataclass_from_args(TrainScriptArguments, args)
        training_args = _dataclass_from_args(DSparkTrainingArguments, args)
        metrics = train_drafter(script_args, training_args)
    except ValueError as err:
        raise SystemExit(f"dspark train: {err}") from err
    tau = metrics.get("eval_expected_tau")
    held_out = f" (held-out expected tau {tau:.2f})" if tau else ""
    print(f"Saved the drafter to {training_args.output_dir}{held_out}")


def _add_train_command(subparsers) -> None:
    from .training_args import DSparkTrainingArguments
    from .workflows import TrainScriptArguments

    parser = subparsers.add_parser(
        "train",
        help="Train a DSpark drafter for a target on chat data (default: the offline SmolLM2-135M target).",
        description="Every DSparkTrainingArguments / TrainingArguments field is a flag (e.g. --max_steps, "
        "--per_device_train_batch_size, --bf16, --report_to); dashes work in place of underscores.",
        dataclass_types=(TrainScriptArguments, DSparkTrainingArguments),
    )
    parser.set_defaults(output_dir="dspark-drafter", func=_run_train)


def _add_dataclass_arguments(parser: argparse.ArgumentParser, options: type) -> None:
    """One ``--flag`` per field of the dataclass ``options``, with its default and its ``help`` metadata."""
    import dataclasses
    import typing

    from transformers.hf_argparser import string_to_bool

    hints = typing.get_type_hints(options)
    for option in dataclasses.fields(options):
        # `X | None` parses as X; bools parse true/false/yes/no/1/0.
        hint = hints[option.name]
        kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        parser.add_argument(
            f"--{option.name.replace('_', '-')}",
            type=string_to_bool if kind is bool else kind,
            default=option.default,
            help=f"{option.metadata.get('help', '')} (default: {option.default})".lstrip(),
        )


def _dataclass_from_args(options: type, args: argparse.Namespace):
    import dataclasses

    fields = [option.name for option in dataclasses.fields(options) if option.init]
    return options(**{name: getattr(args, name) for name in fields})


def _run_quickstart(args: argparse.Namespace) -> None:
    from .quickstart import QuickstartOptions, run_quickstart

    run_quickstart(_dataclass_from_args(QuickstartOptions, args))


def _add_quickstart_command(subparsers) -> None:
    from .quickstart import QuickstartOptions

    parser = subparsers.add_parser(
        "quickstart",
        help="The main job: train a DSpark drafter for SmolLM2-135M-Instruct on the bundled data and compare "
        "assisted against plain decoding.",
    )
    _add_dataclass_arguments(parser, QuickstartOptions)
    parser.set_defaults(func=_run_quickstart)


def _run_data(args: argparse.Namespace) -> None:
    import json

    from .onpolicy import OnPolicyDataArguments, build_onpolicy_data, onpolicy_summary

    options = _dataclass_from_args(OnPolicyDataArguments, args)
    build_onpolicy_data(options)
    print(json.dumps(onpolicy_summary(options.output)))


def _add_data_command(subparsers) -> None:
    from .onpolicy import OnPolicyDataArguments

    parser = subparsers.add_parser(
        "data",
        help="Build on-policy training data: the reference target's greedy and sampled answers to the "
        "training prompt pool (resumable).",
    )
    _add_dataclass_arguments(parser, OnPolicyDataArguments)
    parser.set_defaults(func=_run_data)


def _run_calibrate(args: argparse.Namespace) -> None:
    from .workflows import calibrate_drafter

    try:
        report = calibrate_drafter(
            args.drafter,
            args.target,
            prompts_per_set=args.prompts_per_set,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            profile_target_cost=args.profile_cost,
            profile_context_length=args.profile_context_length,
            profile_small_batch_linears=args.small_batch_linears,
            output_dir=args.output_dir,
            seed=args.seed,
        )
    except ValueError as err:
        raise SystemExit(f"dspark calibrate: {err}") from err
    mode = "sampling at temperature 1" if args.do_sample else "greedy decoding"
    count = args.prompts_per_set
    print(
        f"{report.rounds} rounds of {mode}, full block verified, on the last {count} GSM8K and the last "
        f"{count} MT-Bench eval prompts; prefix survival a_k raw -> STS:"
    )
    print(report.table)
    if report.seconds_per_step is not None:
        milliseconds = ", ".join(f"{1000 * s:.1f}" for s in report.seconds_per_step)
        print(f"target forward time for 1..{len(report.seconds_per_step)} tokens (ms): {milliseconds}")
    print(f"Saved the calibrated drafter config to {report.saved_config}.")


def _add_calibrate_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="Fit the confidence head's per-position temperatures (sequential temperature scaling) on "
        "held-out prompts, and optionally profile the target's cost for confidence scheduling.",
    )
    parser.add_argument("drafter", help="Drafter folder; its config is updated in place unless --output-dir.")
    parser.add_argument(
        "--target",
        help="Target model folder or Hub id (default: the offline SmolLM2-135M-Instruct reference target).",
    )
    parser.add_argument(
        "--prompts-per-set",
        type=int,
        default=8,
        help="Held-out prompts taken from the end of the GSM8K and of the MT-Bench eval sets each.",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Tokens generated per prompt.")
    parser.add_argument(
        "--do-sample",
        action="store_true",
        help="Record rounds of sampling at temperature 1 instead of greedy decoding (calibrate for the "
        "decoding mode you serve).",
    )
    parser.add_argument(
        "--profile-cost",
        action="store_true",
        help="Also time the target's forward for 1..block_size+1 tokens on this machine and store the "
        "profile in the config (needed by generation_config.confidence_scheduling).",
    )
    parser.add_argument(
        "--profile-context-length", type=int, default=256, help="Cached tokens while profiling the target."
    )
    parser.add_argument(
        "--small-batch-linears",
        action="store_true",
        help="Profile the cost with dspark_hf.small_batch_linear.SmallBatchLinears active (for generation "
        "that runs inside it: verifying a few tokens then costs about as much as one).",
    )
    parser.add_argument("--output-dir", help="Save the calibrated drafter here instead of in place.")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_run_calibrate)


def _subcommand_parser(dataclass_types=None, **kwargs) -> argparse.ArgumentParser:
    """An `HfArgumentParser` for a subcommand that parses dataclasses (`train`), else a plain parser."""
    if dataclass_types is None:
        return argparse.ArgumentParser(**kwargs)
    return HfArgumentParser(dataclass_types, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dspark", description="DSpark speculative decoding for transformers."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_subcommand_parser)
    _add_push_command(subparsers)
    _add_convert_command(subparsers)
    _add_check_command(subparsers)
    _add_train_command(subparsers)
    _add_quickstart_command(subparsers)
    _add_data_command(subparsers)
    _add_calibrate_command(subparsers)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
