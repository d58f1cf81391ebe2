"""Train a DSpark drafter for a causal LM with `DSparkTrainer` (the Python API behind `dspark train`).

A short CPU run on the offline reference target (SmolLM2-135M-Instruct) and the quickstart's data, the
target's 2,589 vendored answers (add `--recipe dflash` for DeepSpec's DFlash recipe)::

    python examples/train_dspark.py --output_dir smollm2-dspark --max_steps 200 --num_anchors 64 \\
        --max_length 512 --num_draft_layers 2 --eval_rows 8

Your target and chat data (JSON lines of {"messages": [...]} or {"prompt", "response"}, ideally the target's
own answers, see `dspark_hf.training.data.regenerate_responses`), on several GPUs::

    accelerate launch examples/train_dspark.py --target Qwen/Qwen3-4B --dataset_path answers.jsonl \\
        --output_dir qwen3-4b-dspark --bf16 --num_train_epochs 10 --per_device_train_batch_size 4

Adapting an existing drafter to a fine-tuned target with LoRA (a few MB of adapter)::

    python examples/train_dspark.py --target my-finetuned-target --drafter qwen3-4b-dspark \\
        --dataset_path answers.jsonl --lora_r 16 --output_dir adapter

Every `DSparkTrainingArguments` / `TrainingArguments` flag is accepted; the workflow is
`dspark_hf.training.workflow.train_drafter`, which `dspark train` runs too.
"""

from __future__ import annotations

from transformers import HfArgumentParser

from dspark_hf import DSparkTrainingArguments
from dspark_hf.training.workflow import TrainScriptArguments, train_drafter

if __name__ == "__main__":
    parser = HfArgumentParser((TrainScriptArguments, DSparkTrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses()
    metrics = train_drafter(script_args, training_args)
    if metrics:
        print(f"held-out expected tau: {metrics['eval_expected_tau']:.2f}")
