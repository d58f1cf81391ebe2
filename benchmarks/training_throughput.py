"""Training throughput of `DSparkTrainer` on the reference target: supervised block positions per second,
peak memory, and held-out acceptance after the same positions, for several training paths in one run.

Every configuration trains a fresh drafter (seed 0) on the same fixed rows with the same anchors, in its
own process (so peak RSS is its own), one after another on an otherwise idle machine:

- `full_vocab`: logits over the whole 49,152-token vocabulary (`draft_vocab_training=False`);
- `draft_vocab`: logits over the broad-corpus draft vocabulary plus the batch's prompt tokens;
- `baseline` (with `--baseline-src DIR`): `full_vocab` run against another checkout of dspark_hf, e.g. the
  commit before draft-vocabulary training (`git worktree add /tmp/dspark_before <commit>`).

    python benchmarks/training_throughput.py --steps 30 --threads 2 --baseline-src /tmp/dspark_before
    # ~12 min on 2 idle CPU cores; results in benchmarks/results/training_throughput.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULT_PREFIX = "RESULT "
HELD_OUT_FILE = (
    Path(__file__).resolve().parents[1] / "dspark_hf" / "resources" / "smollm2_onpolicy_held_out.jsonl.gz"
)


def run_config(config: dict) -> dict:
    """Train and evaluate one configuration in this process; returns its measurements."""
    import torch
    from transformers import TrainerCallback

    from dspark_hf import DSparkForCausalLM, DSparkTrainer, DSparkTrainingArguments
    from dspark_hf.reference.target import load_reference_target
    from dspark_hf.training.data import build_dataset, load_reference_train_rows
    from dspark_hf.training.trainer import block_label_mask

    torch.set_num_threads(config["threads"])
    bf16 = config.get("precision") == "bf16"
    # bf16: the frozen target runs in bfloat16 weights, the drafter under bfloat16 autocast (fp32 masters).
    target, tokenizer = load_reference_target(dtype=torch.bfloat16 if bf16 else torch.float32)
    train = build_dataset(load_reference_train_rows(limit=config["train_rows"]), tokenizer, max_length=384)
    # Read from this checkout's file, so that a baseline checkout without it is scored on the same rows.
    held_out_lines = gzip.decompress(HELD_OUT_FILE.read_bytes()).decode().splitlines()
    held_out_rows = [json.loads(line) for line in held_out_lines[-config["eval_rows"] :]]
    held_out = build_dataset(held_out_rows, tokenizer, max_length=384)
    torch.manual_seed(0)
    shape = {"num_hidden_layers": 2, "block_size": 7, "markov_rank": 128}
    if bf16:
        shape["dtype"] = torch.float32
    drafter = DSparkForCausalLM.from_target(target, mask_token_id=config["mask_token_id"], **shape)
    extra = {}
    if config["path"] == "draft_vocab":
        from dspark_hf.training.draft_vocab import load_token_ranking, ranked_vocab

        ranking = load_token_ranking()
        drafter.set_draft_vocab(ranked_vocab(ranking, config["draft_vocab_size"], [tokenizer.eos_token_id]))
        extra["draft_vocab_training"] = True
    elif "draft_vocab_training" in DSparkTrainingArguments.__dataclass_fields__:
        extra["draft_vocab_training"] = False
    if bf16:
        extra.update(bf16=True, use_cpu=True)

    positions = []

    class CountingTrainer(DSparkTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                mask = block_label_mask(inputs["loss_mask"], inputs["anchors"], inputs["anchor_keep"], 7)
                positions.append(int(mask.sum()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    step_ends = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    args = DSparkTrainingArguments(
        output_dir=config["output_dir"],
        max_steps=config["steps"],
        num_anchors=config["num_anchors"],
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=2,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        **extra,
    )
    trainer = CountingTrainer(
        model=drafter,
        target_model=target,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    started = time.perf_counter()
    trainer.train()
    # The first step pays one-off allocations; time the others.
    timed_positions = sum(positions[2:])
    seconds = step_ends[-1] - step_ends[0]
    metrics = trainer.evaluate(held_out)
    return {
        **{k: config[k] for k in ("path", "num_anchors", "steps", "threads")},
        "precision": config.get("precision", "fp32"),
        "code": config.get("code", "this checkout"),
        "train_seconds": time.perf_counter() - started,
        "supervised_positions": sum(positions),
        "positions_per_s": timed_positions / seconds,
        "seconds_per_step": seconds / (len(step_ends) - 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "held_out": {
            k.removeprefix("eval_"): v
            for k, v in metrics.items()
            if k.startswith(("eval_acceptance", "eval_expected_tau", "eval_l1", "eval_ce"))
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-anchors", type=int, nargs="+", default=[64])
    parser.add_argument("--paths", nargs="*", default=["full_vocab", "draft_vocab"])
    parser.add_argument(
        "--precisions",
        nargs="*",
        default=["fp32"],
        choices=["fp32", "bf16"],
        help="bf16: bfloat16 target weights and bfloat16 autocast for the drafter (draft_vocab path only).",
    )
    parser.add_argument("--draft-vocab-size", type=int, default=16384)
    parser.add_argument("--train-rows", type=int, default=120)
    parser.add_argument("--eval-rows", type=int, default=40)
    parser.add_argument(
        "--baseline-src", type=Path, help="Another dspark_hf checkout to measure as `baseline`."
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/training_throughput.json"))
    parser.add_argument("--run-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_config:
        print(RESULT_PREFIX + json.dumps(run_config(json.loads(args.run_config))))
        return

    common = {
        "steps": args.steps,
        "threads": args.threads,
        "draft_vocab_size": args.draft_vocab_size,
        "train_rows": args.train_rows,
        "eval_rows": args.eval_rows,
        "mask_token_id": 16,  # the reserved id `from_target(..., tokenizer=...)` picks, in every checkout
        "output_dir": "/tmp/dspark_throughput",
    }
    configs = []
    for anchors in args.num_anchors:
        if args.baseline_src:
            configs.append({**common, "path": "full_vocab", "num_anchors": anchors, "code": "baseline"})
        configs += [{**common, "path": p, "num_anchors": anchors} for p in args.paths]
        if "bf16" in args.precisions:
            configs.append({**common, "path": "draft_vocab", "num_anchors": anchors, "precision": "bf16"})
    results = []
    for config in configs:
        env = dict(os.environ)
        if config.get("code") == "baseline":
            env["PYTHONPATH"] = str(args.baseline_src.resolve())
            config["code"] = f"baseline checkout {args.baseline_src}"
        print(
            f"running {config['path']} ({config.get('code', 'this checkout')}), "
            f"{config['num_anchors']} anchors, {config.get('precision', 'fp32')}"
        )
        out = subprocess.run(
            [sys.executable, __file__, "--run-config", json.dumps(config)],
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if out.returncode or not lines:
            raise RuntimeError(f"configuration {config} failed:\n{out.stderr[-3000:]}")
        result = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
        print(json.dumps(result))
        results.append(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {"command": " ".join(["python", *sys.argv]), "load_average": os.getloadavg(), "runs": results},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
