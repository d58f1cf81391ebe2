"""The `dspark` command line. Each subcommand is one `_add_<name>_command(subparsers)` function below."""

from __future__ import annotations

import argparse


def _add_push_command(subparsers) -> None:
    def run(args: argparse.Namespace) -> None:
        import json
        from pathlib import Path

        from .hub import push_folder

        results = json.loads(Path(args.results).read_text()) if args.results else None
        try:
            commit = push_folder(args.folder, args.repo_id, private=args.private or None, results=results)
        except ValueError as err:
            raise SystemExit(f"dspark push: {err}") from err
        print(f"Published {args.folder} to {commit.repo_url.url} ({commit.commit_url})")

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
    parser.set_defaults(func=run)


def _add_convert_command(subparsers) -> None:
    def run(args: argparse.Namespace) -> None:
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
    parser.set_defaults(func=run)


def _add_check_command(subparsers) -> None:
    def run(args: argparse.Namespace) -> None:
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
    parser.set_defaults(func=run)


def _add_train_command(subparsers) -> None:
    from .heads import MARKOV_HEADS

    def run(args: argparse.Namespace) -> None:
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .data import build_dataset, load_reference_train_rows, read_jsonl, regenerate_responses
        from .modeling_dspark import DSparkForCausalLM
        from .reference_target import load_reference_target
        from .trainer import DSparkTrainer
        from .training_args import DSparkTrainingArguments

        def first_user_turn(row: dict) -> str:
            if "prompt" in row:
                return row["prompt"]
            return next(m["content"] for m in row["messages"] if m["role"] == "user")

        if args.target is None:
            target, tokenizer = load_reference_target()
            rows = read_jsonl(Path(args.dataset)) if args.dataset else load_reference_train_rows()
        elif args.dataset is None:
            raise SystemExit("dspark train: --dataset is required with --target (chat rows of that target).")
        else:
            tokenizer = AutoTokenizer.from_pretrained(args.target)
            target = AutoModelForCausalLM.from_pretrained(args.target, dtype="auto").eval()
            rows = read_jsonl(Path(args.dataset))
        if args.regenerate:
            rows = regenerate_responses(
                [first_user_turn(row) for row in rows],
                target,
                tokenizer,
                Path(args.output_dir) / "regenerated.jsonl",
                max_new_tokens=args.max_new_tokens,
            )
        try:
            dataset = build_dataset(rows, tokenizer, max_length=args.max_length)
        except ValueError as err:
            raise SystemExit(f"dspark train: {err}") from err
        eval_dataset = None
        if args.eval_rows:
            split = dataset.train_test_split(test_size=args.eval_rows, seed=args.seed)
            dataset, eval_dataset = split["train"], split["test"]

        drafter_overrides = {
            "num_hidden_layers": args.num_layers,
            "block_size": args.block_size,
            "markov_rank": args.markov_rank,
            "markov_head_type": args.markov_head,
        }
        drafter_overrides = {k: v for k, v in drafter_overrides.items() if v is not None}
        if args.drafter and drafter_overrides:
            raise SystemExit(
                f"dspark train: {sorted(drafter_overrides)} define a new drafter, not --drafter's."
            )
        if args.drafter:
            drafter = DSparkForCausalLM.from_pretrained(args.drafter)
        else:
            drafter = DSparkForCausalLM.from_target(target, tokenizer=tokenizer, **drafter_overrides)
        training_overrides = {
            "learning_rate": args.learning_rate,
            "num_anchors": args.num_anchors,
            "max_train_minutes": args.max_train_minutes,
        }
        training_args = DSparkTrainingArguments(
            output_dir=args.output_dir,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            bf16=args.bf16,
            activation_checkpointing=args.activation_checkpointing,
            logging_steps=args.logging_steps,
            save_steps=args.save_steps,
            save_total_limit=2,
            eval_strategy="steps" if eval_dataset is not None else "no",
            eval_steps=args.save_steps,
            report_to=args.report_to,
            seed=args.seed,
            **{k: v for k, v in training_overrides.items() if v is not None},
        )
        trainer = DSparkTrainer(
            model=drafter,
            target_model=target,
            args=training_args,
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
        )
        trainer.train(resume_from_checkpoint=args.resume)
        trainer.save_model()
        summary = trainer.evaluate() if eval_dataset is not None else {}
        tau = summary.get("eval_expected_tau")
        print(
            f"Saved the drafter to {args.output_dir}" + (f" (held-out expected tau {tau:.2f})" if tau else "")
        )

    parser = subparsers.add_parser(
        "train",
        help="Train a DSpark drafter for a target on chat data (default: the offline SmolLM2-135M target).",
    )
    data = parser.add_argument_group("target and data")
    data.add_argument(
        "--target",
        help="Target model folder or Hub id (default: the offline SmolLM2-135M-Instruct reference target).",
    )
    data.add_argument(
        "--dataset",
        help="JSON-lines chat rows ({'messages': [...]} or {'prompt', 'response'}); required with --target. "
        "Default with the reference target: its vendored training answers.",
    )
    data.add_argument(
        "--regenerate",
        action="store_true",
        help="Answer the rows' first user turns with the target first (drafters learn best on the target's "
        "own outputs); cached and resumable in OUTPUT_DIR/regenerated.jsonl.",
    )
    data.add_argument("--max-new-tokens", type=int, default=256, help="Answer length for --regenerate.")
    data.add_argument("--max-length", type=int, default=2048, help="Tokens per training sequence.")
    data.add_argument("--eval-rows", type=int, default=0, help="Rows held out to evaluate acceptance.")
    drafter = parser.add_argument_group("drafter (defaults: DSparkConfig's)")
    drafter.add_argument("--drafter", help="Continue from an existing drafter folder instead of a fresh one.")
    drafter.add_argument("--num-layers", type=int, help="Draft layers (default 5).")
    drafter.add_argument("--block-size", type=int, help="Tokens drafted per block (default 7).")
    drafter.add_argument(
        "--markov-rank", type=int, help="Markov head rank; 0 trains plain DFlash (default 256)."
    )
    drafter.add_argument("--markov-head", choices=list(MARKOV_HEADS), help="Markov head type.")
    training = parser.add_argument_group("training (defaults: DSparkTrainingArguments')")
    training.add_argument("--output-dir", default="dspark-drafter", help="Checkpoints and the final drafter.")
    training.add_argument("--epochs", type=float, default=10.0, help="Epochs (the paper's recipe: 10).")
    training.add_argument(
        "--max-steps", type=int, default=-1, help="Stop after this many steps (overrides epochs)."
    )
    training.add_argument("--batch-size", type=int, default=4, help="Sequences per device and step.")
    training.add_argument("--gradient-accumulation-steps", type=int, default=1)
    training.add_argument("--learning-rate", type=float, help="Peak learning rate (default 6e-4).")
    training.add_argument("--num-anchors", type=int, help="Blocks sampled per sequence (default 512).")
    training.add_argument(
        "--max-train-minutes",
        type=float,
        help="Wall-clock budget that ends training and that the learning-rate schedule follows.",
    )
    training.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (GPUs, recent CPUs).")
    training.add_argument("--activation-checkpointing", action="store_true", help="Recompute draft layers.")
    training.add_argument("--logging-steps", type=int, default=10)
    training.add_argument(
        "--save-steps", type=int, default=500, help="Steps between checkpoints (and evals)."
    )
    training.add_argument(
        "--resume",
        nargs="?",
        const=True,
        help="Resume from a checkpoint folder, or from the last one in --output-dir when given no value.",
    )
    training.add_argument("--report-to", default="none", help="Trackers (tensorboard, wandb, trackio, ...).")
    training.add_argument("--seed", type=int, default=42)
    parser.set_defaults(func=run)


def _add_dataclass_arguments(parser: argparse.ArgumentParser, options: type) -> None:
    """One ``--flag`` per field of the dataclass ``options``, with its default and its ``help`` metadata."""
    import dataclasses

    from transformers.hf_argparser import string_to_bool

    for option in dataclasses.fields(options):
        kind = type(option.default)
        parser.add_argument(
            f"--{option.name.replace('_', '-')}",
            type=string_to_bool if kind is bool else kind,
            default=option.default,
            help=f"{option.metadata.get('help', '')} (default: {option.default})".lstrip(),
        )


def _dataclass_from_args(options: type, args: argparse.Namespace):
    import dataclasses

    return options(**{option.name: getattr(args, option.name) for option in dataclasses.fields(options)})


def _add_quickstart_command(subparsers) -> None:
    from .quickstart import QuickstartOptions

    parser = subparsers.add_parser(
        "quickstart",
        help="The main job: train a DSpark drafter for SmolLM2-135M-Instruct on the bundled data and compare "
        "assisted against plain decoding.",
    )
    _add_dataclass_arguments(parser, QuickstartOptions)

    def run(args: argparse.Namespace) -> None:
        from .quickstart import run_quickstart

        run_quickstart(_dataclass_from_args(QuickstartOptions, args))

    parser.set_defaults(func=run)


def _add_data_command(subparsers) -> None:
    from .onpolicy import OnPolicyDataArguments

    parser = subparsers.add_parser(
        "data",
        help="Build on-policy training data: the reference target's greedy and sampled answers to the "
        "training prompt pool (resumable).",
    )
    _add_dataclass_arguments(parser, OnPolicyDataArguments)

    def run(args: argparse.Namespace) -> None:
        import json

        from .onpolicy import build_onpolicy_data, onpolicy_summary

        options = _dataclass_from_args(OnPolicyDataArguments, args)
        build_onpolicy_data(options)
        print(json.dumps(onpolicy_summary(options.output)))

    parser.set_defaults(func=run)


def _add_calibrate_command(subparsers) -> None:
    def run(args: argparse.Namespace) -> None:
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .benchmarking import encode_chat_prompt
        from .convert import detect_layout
        from .data import load_prompts
        from .modeling_dspark import DSparkForCausalLM
        from .reference_target import load_reference_target
        from .scheduling import (
            calibrate_sts,
            format_calibration_table,
            profile_cost,
            record_calibration_rounds,
        )

        output_dir = Path(args.output_dir or args.drafter)
        in_place = output_dir.resolve() == Path(args.drafter).resolve()
        try:
            layout = detect_layout(args.drafter)
        except ValueError as err:
            raise SystemExit(f"dspark calibrate: {err}") from err
        if in_place and layout != "native":
            raise SystemExit(
                f"dspark calibrate: the drafter folder is in the {layout} layout, which the calibration "
                "would overwrite with a native config; pass --output-dir to save a native copy."
            )
        if args.prompts_per_set < 1:
            raise SystemExit("dspark calibrate: --prompts-per-set must be >= 1.")
        if args.target is None:
            target, tokenizer = load_reference_target()
        else:
            tokenizer = AutoTokenizer.from_pretrained(args.target)
            target = AutoModelForCausalLM.from_pretrained(args.target, dtype="auto").eval()
        drafter = DSparkForCausalLM.from_pretrained(args.drafter).eval()

        # The last rows of each eval set: the quickstart and the benchmarks evaluate on the first ones.
        prompts = [
            text
            for name in ("gsm8k", "mt-bench")
            for text in load_prompts(name, "eval")[-args.prompts_per_set :]
        ]
        drafter.attach_target(target)
        rounds = record_calibration_rounds(
            target,
            drafter,
            [encode_chat_prompt(tokenizer, prompt) for prompt in prompts],
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            seed=args.seed,
        )
        drafter.detach_target()
        try:
            temperatures = calibrate_sts(rounds, num_positions=drafter.config.block_size)
        except ValueError as err:
            raise SystemExit(f"dspark calibrate: {err}") from err
        mode = "sampling at temperature 1" if args.do_sample else "greedy decoding"
        print(
            f"{len(rounds)} rounds of {mode}, full block verified, on the last {args.prompts_per_set} GSM8K "
            f"and the last {args.prompts_per_set} MT-Bench eval prompts; prefix survival a_k raw -> STS:"
        )
        print(format_calibration_table(rounds, temperatures))
        drafter.config.confidence_temperatures = temperatures
        if args.profile_cost:
            profile = profile_cost(
                target, max_tokens=drafter.config.block_size + 1, context_length=args.profile_context_length
            )
            drafter.set_cost_profile(profile)
            milliseconds = ", ".join(f"{1000 * s:.1f}" for s in profile.seconds_per_step)
            print(f"target forward time for 1..{profile.max_tokens} tokens (ms): {milliseconds}")
        if (
            in_place
        ):  # the weights did not change; rewriting them would replace the files they are mapped from
            drafter.config.save_pretrained(output_dir)
        else:
            drafter.save_pretrained(output_dir)
        print(f"Saved the calibrated drafter config to {output_dir / 'config.json'}.")

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
    parser.add_argument("--output-dir", help="Save the calibrated drafter here instead of in place.")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dspark", description="DSpark speculative decoding for transformers."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
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
