"""Train a DSpark drafter for a causal LM with `DSparkTrainer` (the Python API behind `dspark train`).

A short CPU run on the offline reference target (SmolLM2-135M-Instruct) and its vendored training answers::

    python examples/train_dspark.py --output_dir smollm2-dspark --max_steps 200 --num_anchors 64 \\
        --max_length 512 --num_draft_layers 2 --eval_rows 8

Your target and chat data (JSON lines of {"messages": [...]} or {"prompt", "response"}, ideally the target's
own answers, see `dspark_hf.data.regenerate_responses`), on several GPUs::

    accelerate launch examples/train_dspark.py --target Qwen/Qwen3-4B --dataset_path answers.jsonl \\
        --output_dir qwen3-4b-dspark --bf16 --num_train_epochs 10 --per_device_train_batch_size 4

Adapting an existing drafter to a fine-tuned target with LoRA (a few MB of adapter)::

    python examples/train_dspark.py --target my-finetuned-target --drafter qwen3-4b-dspark \\
        --dataset_path answers.jsonl --lora_r 16 --output_dir adapter

Every `DSparkTrainingArguments` / `TrainingArguments` flag is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from dspark_hf import DSparkForCausalLM, DSparkTrainer, DSparkTrainingArguments
from dspark_hf.data import build_dataset, load_reference_train_rows, read_jsonl
from dspark_hf.reference_target import load_reference_target

# The draft layers' projections and `fc`, which maps the target's features; the embedding and LM head are the
# target's and stay frozen. The confidence head is tiny, so it is trained in full.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc"]


@dataclass
class ScriptArguments:
    target: str | None = field(
        default=None, metadata={"help": "Target folder or Hub id; default: the offline SmolLM2-135M target."}
    )
    dataset_path: str | None = field(
        default=None, metadata={"help": "Chat rows (JSON lines); default: the reference target's answers."}
    )
    max_length: int = field(default=2048, metadata={"help": "Tokens per training sequence."})
    eval_rows: int = field(default=0, metadata={"help": "Rows held out for evaluation."})
    drafter: str | None = field(
        default=None, metadata={"help": "Start from this drafter instead of a new one."}
    )
    num_draft_layers: int | None = field(
        default=None, metadata={"help": "Layers of a new drafter (default 5)."}
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Block size of a new drafter (default 7)."}
    )
    lora_r: int = field(
        default=0, metadata={"help": "Train LoRA adapters of this rank (0: train all weights)."}
    )


def main(script_args: ScriptArguments, training_args: DSparkTrainingArguments) -> None:
    if script_args.target is None:
        target, tokenizer = load_reference_target()
    else:
        tokenizer = AutoTokenizer.from_pretrained(script_args.target)
        target = AutoModelForCausalLM.from_pretrained(script_args.target, dtype="auto")
    if script_args.dataset_path is not None:
        rows = read_jsonl(Path(script_args.dataset_path))
    elif script_args.target is None:
        rows = load_reference_train_rows()
    else:
        raise ValueError("--dataset_path is required with --target: chat rows answered by that target.")
    dataset = build_dataset(rows, tokenizer, max_length=script_args.max_length)
    eval_dataset = None
    if script_args.eval_rows:
        split = dataset.train_test_split(test_size=script_args.eval_rows, seed=training_args.seed)
        dataset, eval_dataset = split["train"], split["test"]

    if script_args.drafter is not None:
        drafter = DSparkForCausalLM.from_pretrained(script_args.drafter)
    else:
        shape = {"num_hidden_layers": script_args.num_draft_layers, "block_size": script_args.block_size}
        drafter = DSparkForCausalLM.from_target(
            target, tokenizer=tokenizer, **{k: v for k, v in shape.items() if v is not None}
        )

    peft_config = None
    if script_args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=script_args.lora_r,
            lora_alpha=2 * script_args.lora_r,
            target_modules=LORA_TARGET_MODULES,
            modules_to_save=["confidence_head"],
            task_type=None,
        )

    trainer = DSparkTrainer(
        model=drafter,
        target_model=target,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        print(f"held-out expected tau: {metrics['eval_expected_tau']:.2f}")


if __name__ == "__main__":
    main(*HfArgumentParser((ScriptArguments, DSparkTrainingArguments)).parse_args_into_dataclasses())
