"""The `dspark` command line. Each subcommand is one `_add_<name>_command(subparsers)` function below."""

from __future__ import annotations

import argparse


def _demo(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from . import DSparkForCausalLM

    torch.manual_seed(args.seed)
    target = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    drafter = DSparkForCausalLM.from_target(target, num_hidden_layers=2, markov_rank=16).eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states
        features = torch.cat([hidden[i + 1] for i in drafter.config.target_layer_ids], dim=-1)
        block_size = drafter.config.block_size
        block = torch.full((1, block_size), drafter.config.mask_token_id)
        block[0, 0] = ids[0, -1]
        positions = torch.arange(ids.shape[1] - 1 + block_size).unsqueeze(0)
        out = drafter(block, features[:, :-1], positions)
    print(
        f"drafter config: {drafter.config.num_hidden_layers} layers, block {block_size}, "
        f"{drafter.config.markov_head_type} Markov head of rank {drafter.config.markov_rank}, "
        f"target layers {drafter.config.target_layer_ids}"
    )
    print(f"parallel draft of one block (argmax of base logits): {out.base_logits.argmax(-1).tolist()[0]}")


def _add_demo_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="Build a drafter for a tiny random target and draft one block."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_demo)


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
        "folder", help="Drafter folder (native or DeepSpec layout; published in the native one)."
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
            dst = convert_checkpoint(args.src, args.dst, to=args.to)
        except ValueError as err:
            raise SystemExit(f"dspark convert: {err}") from err
        layout = detect_layout(dst)
        deepspec_dir, native_dir = (dst, args.src) if layout == "deepspec" else (args.src, dst)
        config = DSparkConfig.from_pretrained(dst)
        print(f"Wrote the {layout}-layout checkpoint to {dst}.\n")
        print(f'transformers: import dspark_hf; AutoModel.from_pretrained("{native_dir}")\n')
        print(serving_instructions(config, deepspec_dir))

    parser = subparsers.add_parser(
        "convert",
        help="Convert a drafter between DeepSpec's layout (served by vLLM/SGLang) and the native one.",
    )
    parser.add_argument("src", help="Drafter folder to convert.")
    parser.add_argument("dst", help="Output folder.")
    parser.add_argument(
        "--to",
        choices=["native", "deepspec"],
        help="Output layout (default: the other layout than the source's).",
    )
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dspark", description="DSpark speculative decoding for transformers."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo_command(subparsers)
    _add_push_command(subparsers)
    _add_convert_command(subparsers)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
