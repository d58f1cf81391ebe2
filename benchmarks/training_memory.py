"""Vocabulary-sized tensors of one bf16 training step: what they are, their peak, and that peak at scale.

Every tensor an op creates whose last dimension is the vocabulary (or the draft vocabulary) is recorded by
`VocabularyTensorTracker`, with the bytes alive at any moment (a tensor lives until its storage is freed).
The step runs on a tiny random Qwen3-style target; the tensors alive at the peak are then scaled to a real
size by what their rows count: draft positions (anchors x block), distinct target positions, or a loss
chunk.

    python benchmarks/training_memory.py                      # 152k vocabulary, 4k tokens, 512 anchors
    python benchmarks/training_memory.py --output benchmarks/results/training_memory.json
"""

from __future__ import annotations

import argparse
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class TrackedTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass
class VocabularyTensorTracker(TorchDispatchMode):
    """Records the tensors ops create whose last dimension is one of `widths`, and the peak of their live
    bytes with the tensors alive at that peak. Views and in-place results add no storage and do not count."""

    widths: set[int]
    created: list[TrackedTensor] = field(default_factory=list)
    live_bytes: int = 0
    peak_bytes: int = 0
    at_peak: list[TrackedTensor] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()
        self._live: dict[int, TrackedTensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results live in an input's storage: no new memory.
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.dim()
                and tensor.shape[-1] in self.widths
                and tensor.untyped_storage().data_ptr() not in inputs
            ):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        tracked = TrackedTensor(tuple(tensor.shape), tensor.dtype, storage.nbytes())
        self.created.append(tracked)
        self._live[key] = tracked
        self.live_bytes += tracked.nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.at_peak = self.live_bytes, list(self._live.values())
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key).nbytes


def rows(tensor: TrackedTensor) -> int:
    """Rows of a [..., width] tensor."""
    count = 1
    for size in tensor.shape[:-1]:
        count *= size
    return count


@dataclass
class StepShape:
    """What the rows of a vocabulary-sized tensor can count in a training step."""

    vocab: int
    draft_rows: int  # anchors x block of the batch
    target_rows: int  # supervised tokens of the batch (bounds the distinct target positions)
    chunk_rows: int  # rows of one loss chunk
    hidden_size: int  # a weight's [hidden, vocab]
    markov_rank: int  # the Markov head's [rank, vocab]


def scaled_peak(at_peak: list[TrackedTensor], measured: StepShape, scaled: StepShape) -> dict[str, float]:
    """GB of the tensors alive at the peak at the `scaled` shape, split into activations and copies of
    weights ([hidden, vocab]): each tensor's rows are classified by what they count in the `measured` step
    (draft positions, hidden size, Markov rank, a loss chunk, else distinct target positions) and scaled
    with it; the width scales with the vocabulary."""
    total = {"activations_gb": 0.0, "weight_copies_gb": 0.0}
    for tensor in at_peak:
        count, kind = rows(tensor), "activations_gb"
        if count == measured.draft_rows:
            count = scaled.draft_rows
        elif count == measured.hidden_size:
            count, kind = scaled.hidden_size, "weight_copies_gb"
        elif count == measured.markov_rank:
            count, kind = scaled.markov_rank, "weight_copies_gb"
        elif count <= measured.chunk_rows:
            count = count * scaled.chunk_rows // measured.chunk_rows
        else:
            count = count * scaled.target_rows // measured.target_rows
        total[kind] += count * scaled.vocab * tensor.dtype.itemsize / 1e9
    return {name: round(value, 2) for name, value in total.items()}


def run_step(
    shape: StepShape, tokens: int, anchors: int, block: int, output_dir: str
) -> VocabularyTensorTracker:
    """One bf16 training step (float32 master weights) of a one-layer drafter on a random bfloat16
    Qwen3-style target, of one row of `tokens` whose last 7/8 are supervised, under the tracker."""
    from datasets import Dataset
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dspark_hf import DSparkForCausalLM
    from dspark_hf.training import loss
    from dspark_hf.training.arguments import DSparkTrainingArguments
    from dspark_hf.training.trainer import DSparkTrainer

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden_size, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=2 * tokens)  # fmt: skip
    target = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    drafter = DSparkForCausalLM.from_target(
        target, dtype=torch.float32, num_hidden_layers=1, block_size=block, markov_rank=shape.markov_rank,
        target_layer_ids=[0, 1], mask_token_id=shape.vocab - 1,
    )  # fmt: skip
    prompt = tokens - shape.target_rows
    row = {
        "input_ids": torch.randint(0, shape.vocab - 1, (tokens,)).tolist(),
        "loss_mask": [0] * prompt + [1] * shape.target_rows,
    }
    args = DSparkTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=1, max_steps=1, num_anchors=anchors, bf16=True,
        use_cpu=True, save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    dataset = Dataset.from_list([row])
    trainer = DSparkTrainer(model=drafter, target_model=target, args=args, train_dataset=dataset)
    chunk_elements = loss._CHUNK_ELEMENTS
    loss._CHUNK_ELEMENTS = shape.chunk_rows * shape.vocab
    try:
        with VocabularyTensorTracker({shape.vocab}) as tracker:
            trainer.train()
    finally:
        loss._CHUNK_ELEMENTS = chunk_elements
    return tracker


def step_shape(vocab: int, tokens: int, anchors: int, block: int, chunk_rows: int, hidden_size: int,
               markov_rank: int) -> StepShape:  # fmt: skip
    """The shape of a step over one row of `tokens` whose last 7/8 are supervised."""
    target_rows = tokens - tokens // 8
    draft_rows = min(anchors, target_rows - 1) * block
    return StepShape(vocab, draft_rows, target_rows, chunk_rows, hidden_size, markov_rank)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=151_936, help="Vocabulary to scale to (Qwen3's).")
    parser.add_argument("--tokens", type=int, default=4096, help="Tokens of the sequence to scale to.")
    parser.add_argument("--anchors", type=int, default=512)
    parser.add_argument("--block", type=int, default=7)
    parser.add_argument("--hidden-size", type=int, default=5120, help="Qwen3-14B's.")
    parser.add_argument("--markov-rank", type=int, default=256)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    import tempfile

    from dspark_hf.training.loss import _CHUNK_ELEMENTS

    small = {"tokens": 256, "anchors": 64, "block": args.block}
    measured = step_shape(4096, **small, chunk_rows=16, hidden_size=32, markov_rank=8)
    with tempfile.TemporaryDirectory() as output_dir:
        tracker = run_step(measured, output_dir=output_dir, **small)
    scaled = step_shape(args.vocab, args.tokens, args.anchors, args.block, _CHUNK_ELEMENTS // args.vocab,
                        args.hidden_size, args.markov_rank)  # fmt: skip
    report = {
        "measured": {**small, **vars(measured), "peak_bytes": tracker.peak_bytes,
                     "alive_at_peak": [[list(t.shape), str(t.dtype)] for t in tracker.at_peak]},
        "scaled": {**vars(scaled), "tokens": args.tokens, "anchors": args.anchors, "block": args.block,
                   **scaled_peak(tracker.at_peak, measured, scaled)},
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.output:
        args.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
