"""Every GPU path of the package on one CUDA device, in a few minutes and without downloads.

A randomly initialised Qwen3-style target with a real-size vocabulary (151,936 tokens) stands in for a real
one: what is checked is that each path runs on the device, how often drafting waits for the host, and how
much memory a training step takes, not how good the drafts are.

    python examples/gpu_smoke.py --output_dir outputs/gpu_smoke        # one CUDA GPU, about 3 minutes
    python examples/gpu_smoke.py --output_dir /tmp/smoke --tiny        # any machine, tiny sizes (the tests)

Sections, each reported in `gpu_smoke.json`:
- shrinking-batch decoding of a left-padded batch whose first row ends early;
- a bfloat16 drafter in `target.generate`: greedy (the first divergence from plain decoding is reported, not
  asserted: bfloat16 verification of several tokens may round differently from one token at a time),
  sampling, a confidence threshold, confidence scheduling with a cost profile measured on this device, a
  draft vocabulary, lookup drafting with stepping aside; on CUDA under
  `torch.cuda.set_sync_debug_mode("warn")`, counting the host synchronisations per drafting round;
- two trainer steps (bfloat16 autocast over float32 master weights, gradient checkpointing, a draft
  vocabulary) recording `torch.cuda.max_memory_allocated`;
- a save / reload round trip of the trained drafter.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import HfArgumentParser, Qwen3Config, Qwen3ForCausalLM

from dspark_hf import DSparkForCausalLM, DSparkTrainer, DSparkTrainingArguments
from dspark_hf.generation.batched_decoding import decode_shrinking_batch
from dspark_hf.scheduling.cost_profile import profile_cost


@dataclass
class SmokeOptions:
    """What `gpu_smoke.py` runs; `--tiny` shrinks every size so that it runs on a CPU in seconds."""

    output_dir: str = field(metadata={"help": "Where gpu_smoke.json goes."})
    tiny: bool = field(default=False, metadata={"help": "Tiny sizes, on the CPU unless a GPU is present."})
    vocab_size: int = field(default=151_936, metadata={"help": "The target's vocabulary (Qwen3's)."})
    hidden_size: int = field(default=1024, metadata={"help": "The target's width."})
    num_hidden_layers: int = field(default=8, metadata={"help": "The target's depth."})
    draft_layers: int = field(default=2, metadata={"help": "The drafter's depth."})
    max_new_tokens: int = field(default=96, metadata={"help": "New tokens per drafting run."})
    row_tokens: int = field(default=2048, metadata={"help": "Tokens per training row."})
    num_anchors: int = field(default=512, metadata={"help": "Anchors per training row."})
    train_batch_size: int = field(default=2, metadata={"help": "Training rows per step."})
    draft_vocab_size: int = field(
        default=32_768, metadata={"help": "Draft vocabulary when drafting/training."}
    )

    def __post_init__(self):
        if self.tiny:
            self.vocab_size, self.hidden_size, self.num_hidden_layers, self.draft_layers = 512, 64, 4, 1
            self.max_new_tokens, self.row_tokens, self.num_anchors, self.draft_vocab_size = 24, 64, 8, 256
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(
                f"draft_vocab_size {self.draft_vocab_size} exceeds vocab_size {self.vocab_size}."
            )


def random_target(options: SmokeOptions, device: torch.device) -> Qwen3ForCausalLM:
    """A seeded random Qwen3-style target in bfloat16 (16 query / 8 key-value heads, MLP 3x wide)."""
    heads = 4 if options.tiny else 16
    config = Qwen3Config(
        vocab_size=options.vocab_size,
        hidden_size=options.hidden_size,
        intermediate_size=3 * options.hidden_size,
        num_hidden_layers=options.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=options.hidden_size // heads,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    target = Qwen3ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    # Sharper next-token distributions than a random init gives, closer to a trained LM's.
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)
    return target


def prompts(options: SmokeOptions, count: int, length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(count * 1000 + length)
    return torch.randint(2, options.vocab_size, (count, length), generator=generator).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shrinking_batch(target: Qwen3ForCausalLM, options: SmokeOptions, device: torch.device) -> dict:
    """Row 0's end-of-sequence token is the token it produces third, so it leaves the batch early."""
    ids = prompts(options, 4, 16, device)
    mask = torch.ones_like(ids)
    ids[1:, :4], mask[1:, :4] = 0, 0  # left padding on the other rows
    new = options.max_new_tokens
    first = target.generate(ids[:1], attention_mask=mask[:1], do_sample=False, max_new_tokens=3)
    eos = int(first[0, -1])
    start = time.perf_counter()
    answers = decode_shrinking_batch(target, ids, mask, max_new_tokens=new, eos_token_ids=[eos])
    synchronize(device)
    return {
        "answer_lengths": [len(answer) for answer in answers],
        "first_row_ended_early": len(answers[0]) < new and answers[0][-1] == eos,
        "seconds": time.perf_counter() - start,
    }


def new_drafter(target: Qwen3ForCausalLM, options: SmokeOptions, dtype: torch.dtype) -> DSparkForCausalLM:
    """A drafter warm-started from the target; id 1, which the random prompts never hold, is its mask."""
    return DSparkForCausalLM.from_target(
        target, dtype=dtype, num_hidden_layers=options.draft_layers, layer_init="target", mask_token_id=1
    )


def first_divergence(reference: torch.Tensor, other: torch.Tensor) -> int | None:
    """The first index where two token sequences differ (None when identical)."""
    length = min(reference.shape[-1], other.shape[-1])
    differs = (reference[..., :length] != other[..., :length]).flatten().nonzero()
    if differs.numel():
        return int(differs[0])
    return None if reference.shape[-1] == other.shape[-1] else length


def drafting(target: Qwen3ForCausalLM, options: SmokeOptions, device: torch.device) -> dict:
    """Each drafting mode once on the same prompt; host synchronisations counted per round on CUDA."""
    drafter = new_drafter(target, options, torch.bfloat16).to(device)
    drafter.eval().attach_target(target)
    block = drafter.config.block_size
    drafter.set_cost_profile(profile_cost(target, max_tokens=block + 1, repeats=3, show_progress=False))
    ids = prompts(options, 1, 32, device)
    new = options.max_new_tokens
    plain = target.generate(ids, do_sample=False, max_new_tokens=new)
    modes = {
        "greedy": ({}, False),
        "sampling": ({}, True),
        "threshold": ({"confidence_threshold": 0.5}, False),
        "scheduling": ({"confidence_scheduling": True}, False),
        "draft_vocab": ({"draft_vocab": True}, False),
        "lookup_step_aside": ({"lookup_drafting": True, "step_aside": True}, False),
    }
    report = {"cost_profile_ms": [round(1000 * s, 3) for s in drafter.cost_profile.seconds_per_step]}
    defaults = drafter.generation_config.to_dict()
    for name, (settings, do_sample) in modes.items():
        for key in ("confidence_threshold", "confidence_scheduling", "lookup_drafting", "step_aside"):
            setattr(drafter.generation_config, key, defaults.get(key))
        drafter.set_draft_vocab(
            torch.arange(options.draft_vocab_size) if settings.pop("draft_vocab", 0) else None
        )
        for key, value in settings.items():
            setattr(drafter.generation_config, key, value)
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                start = time.perf_counter()
                out = target.generate(ids, assistant_model=drafter, do_sample=do_sample, max_new_tokens=new)
                synchronize(device)
                seconds = time.perf_counter() - start
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        stats = drafter.last_stats
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        report[name] = {
            "new_tokens": out.shape[-1] - ids.shape[-1],
            "rounds": stats.rounds,
            "tau": stats.tau,
            "sources": {source: s.rounds for source, s in stats.by_source().items()},
            "host_syncs_per_round": syncs / max(stats.rounds, 1) if device.type == "cuda" else None,
            "seconds": seconds,
        }
        if not do_sample:
            report[name]["first_divergence_from_plain"] = first_divergence(plain, out)
    return report


def training(target: Qwen3ForCausalLM, options: SmokeOptions, device: torch.device, output_dir: Path) -> dict:
    """Two steps at bfloat16 autocast over float32 masters, gradient checkpointing and a draft vocabulary,
    then a save / reload round trip."""
    drafter = new_drafter(target, options, torch.float32)
    drafter.set_draft_vocab(torch.arange(options.draft_vocab_size))
    ids = prompts(options, 2 * options.train_batch_size, options.row_tokens, torch.device("cpu"))
    prompt_tokens = options.row_tokens // 8
    loss_mask = [0] * prompt_tokens + [1] * (options.row_tokens - prompt_tokens)
    dataset = Dataset.from_list([{"input_ids": row, "loss_mask": loss_mask} for row in ids.tolist()])
    args = DSparkTrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        per_device_train_batch_size=options.train_batch_size,
        max_steps=2,
        num_anchors=options.num_anchors,
        bf16=True,
        use_cpu=device.type == "cpu",
        gradient_checkpointing=True,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = DSparkTrainer(model=drafter, target_model=target, args=args, train_dataset=dataset)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.train()
    synchronize(device)
    seconds = time.perf_counter() - start
    saved = output_dir / "drafter"
    trainer.save_model(str(saved))
    reloaded = DSparkForCausalLM.from_pretrained(saved, dtype=torch.float32)
    mismatched = [
        name
        for name, p in drafter.named_parameters()
        if not torch.equal(reloaded.get_parameter(name).cpu(), p.detach().float().cpu())
    ]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "steps": trainer.state.global_step,
        "losses": losses,
        "parameter_dtypes": sorted({str(p.dtype) for p in drafter.parameters() if p.requires_grad}),
        "max_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "seconds": seconds,
        "reload_exact": not mismatched,
        "reload_mismatches": mismatched,
        "draft_vocab_after_reload": reloaded.draft_vocab_ids is not None,
    }


def run(options: SmokeOptions) -> dict:
    if not options.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_smoke.py: no CUDA device; pass --tiny to run the tiny sizes on this machine.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = random_target(options, device)
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "options": asdict(options),
    }
    start = time.perf_counter()
    report["shrinking_batch"] = shrinking_batch(target, options, device)
    report["drafting"] = drafting(target, options, device)
    with tempfile.TemporaryDirectory(dir=output_dir) as scratch:
        report["training"] = training(target, options, device, Path(scratch))
    report["elapsed_s"] = time.perf_counter() - start
    (output_dir / "gpu_smoke.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    (options,) = HfArgumentParser(SmokeOptions).parse_args_into_dataclasses(args=argv)
    report = run(options)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
