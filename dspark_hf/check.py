"""`check_drafter`: catch what silently breaks a drafter before serving or training it against a target.

A drafter wired to the wrong target still runs: decoding stays lossless (the target verifies every token), it
is just never accepted. So the faults that matter are checked explicitly: vocabulary and hidden sizes, the
target layers read, the copies of the target's embedding and LM head, a mask token that text never produces,
dtypes; then a teacher-forced probe measures acceptance per block position on the target's own greedy
continuations, which exposes what the structure cannot (untrained weights, features of the wrong layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .generation.target_tap import LayerFeatures, decoder_layers, target_compatibility_faults
from .modeling_dspark import DSparkForCausalLM
from .reference.benchmarking import encode_chat_prompt

# A trained drafter's first position is accepted far more often; below this it is untrained or misaligned.
MIN_FIRST_POSITION_ACCEPTANCE = 0.1


@dataclass
class DrafterCheckReport:
    """What `check_drafter` found.

    faults: structural faults (each names its cause); the drafter must not be used with this target.
    warnings: findings that do not break decoding but cost speed (e.g. a weak probe).
    passed: the checks that passed, by name.
    acceptance: teacher-forced greedy acceptance per block position (slot k drafts the token at anchor +
        k + 1, conditioned on the target's true previous tokens); None when faults stopped the probe.
    conditional_acceptance: acceptance at position k among blocks whose positions < k were all accepted.
    num_blocks: blocks the probe drafted.
    """

    faults: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    acceptance: list[float] | None = None
    conditional_acceptance: list[float] | None = None
    num_blocks: int = 0

    @property
    def ok(self) -> bool:
        return not self.faults

    def summary(self) -> str:
        lines = [f"ok: {name}" for name in self.passed]
        lines += [f"FAULT: {fault}" for fault in self.faults]
        lines += [f"warning: {warning}" for warning in self.warnings]
        if self.acceptance is not None:
            per_position = ", ".join(f"{a:.2f}" for a in self.acceptance)
            conditional = ", ".join(f"{a:.2f}" for a in self.conditional_acceptance or [])
            lines.append(f"probe ({self.num_blocks} blocks): acceptance per block position {per_position}")
            lines.append(f"probe: conditional acceptance {conditional}")
        return "\n".join(lines)


def _mask_token_fault(
    mask_id: int, tokenizer: PreTrainedTokenizerBase | None, sequences: list[torch.Tensor]
) -> str | None:
    """Why `mask_id` is a token the target sees in real inputs, or None when it is safely reserved."""
    if tokenizer is not None:
        added = tokenizer.added_tokens_decoder.get(mask_id)
        if mask_id < len(tokenizer) and not (added is not None and added.special):
            token = tokenizer.convert_ids_to_tokens(mask_id)
            return (
                f"mask_token_id {mask_id} is the ordinary text token {token!r}: the drafter cannot tell its "
                "mask slots from real context (reserve an unused special token)."
            )
        used = {
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            tokenizer.unk_token_id,
        }
        if getattr(tokenizer, "chat_template", None):
            conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
            used.update(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False))
        if mask_id in used:
            return (
                f"mask_token_id {mask_id} ({tokenizer.convert_ids_to_tokens(mask_id)!r}) is a token the "
                "tokenizer or chat template emits (BOS/EOS/PAD/UNK or a template token)."
            )
    count = sum(int((ids == mask_id).sum()) for ids in sequences)
    if count:
        return (
            f"mask_token_id {mask_id} occurs {count} times in the probe's prompts and target continuations."
        )
    return None


def _tensor_fault(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> str | None:
    if ours.shape != theirs.shape:
        return f"{name} has shape {tuple(ours.shape)}, the target's has {tuple(theirs.shape)}."
    theirs = theirs.to(device=ours.device, dtype=ours.dtype)
    if torch.equal(ours, theirs):
        return None
    diff = float((ours.float() - theirs.float()).abs().max())
    return f"{name} differs from the target's (max abs diff {diff:.3g}): a foreign or modified copy."


def _structural_checks(
    target: PreTrainedModel, drafter: DSparkForCausalLM, report: DrafterCheckReport
) -> None:
    faults = target_compatibility_faults(drafter.config, target)
    report.faults += faults
    if faults:
        return
    config = drafter.config
    report.passed.append(f"vocab_size {config.vocab_size}, hidden_size {config.hidden_size}")
    report.passed.append(
        f"target_layer_ids {config.target_layer_ids} within the target's {len(decoder_layers(target))} layers"
    )
    for name, ours, theirs in (
        ("embed_tokens", drafter.embed_tokens.weight, target.get_input_embeddings().weight),
        ("lm_head", drafter.lm_head.weight, target.get_output_embeddings().weight),
    ):
        fault = _tensor_fault(name, ours.detach(), theirs.detach())
        if fault:
            report.faults.append(fault)
        else:
            report.passed.append(f"{name} equal to the target's")
    if drafter.dtype != target.dtype:
        report.warnings.append(
            f"dtype: drafter {drafter.dtype}, target {target.dtype}; features are cast to the drafter's."
        )
    else:
        report.passed.append(f"dtype {drafter.dtype}")


def _probe_sequences(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: Sequence[str] | Sequence[Sequence[int]] | None,
    max_new_tokens: int,
) -> list[torch.Tensor]:
    """[1, T] prompt + the target's greedy continuation, per prompt."""
    if prompts is None:
        if tokenizer is not None:
            from .training.data import load_prompts

            prompts = load_prompts("gsm8k", "eval", limit=2) + load_prompts("mt-bench", "eval", limit=1)
        else:
            vocab = target.config.get_text_config(decoder=True).vocab_size
            generator = torch.Generator().manual_seed(0)
            prompts = [torch.randint(0, vocab, (8,), generator=generator).tolist() for _ in range(3)]
    device = target.device
    sequences = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("Text prompts need the target's tokenizer.")
            if getattr(tokenizer, "chat_template", None):
                ids = encode_chat_prompt(tokenizer, prompt)
            else:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        else:
            ids = torch.tensor([list(prompt)])
        ids = ids.to(device)
        out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)  # fmt: skip
        sequences.append((out, ids.shape[1]))
    return sequences


@torch.no_grad()
def _probe(
    target: PreTrainedModel, drafter: DSparkForCausalLM, sequences, report: DrafterCheckReport
) -> None:
    """Teacher-forced greedy acceptance: at every anchor in the continuation, the drafter's argmax at slot k
    against the target's greedy token at anchor + k + 1, with the true previous tokens fed to the heads."""
    config = drafter.config
    block_size, vocab_ids = config.block_size, getattr(drafter, "draft_vocab_ids", None)
    hits = []
    with LayerFeatures(target, config.target_layer_ids) as capture:
        for sequence, prompt_length in sequences:
            target(sequence)
            features = capture.concatenated()
            for p in range(prompt_length - 1, sequence.shape[1] - block_size):
                block = torch.full((1, block_size), config.mask_token_id, device=sequence.device)
                block[0, 0] = sequence[0, p]
                positions = torch.arange(p + block_size, device=sequence.device)[None]
                prev = sequence[:, p : p + block_size]
                out = drafter(block, features[:, :p], positions, prev, vocab_ids=vocab_ids)
                drafted = out.logits[0].argmax(-1)
                drafted = drafted if vocab_ids is None else vocab_ids[drafted]
                hits.append(drafted == sequence[0, p + 1 : p + 1 + block_size])
    if not hits:
        report.warnings.append("probe: the continuations are too short to draft a block.")
        return
    hits = torch.stack(hits).float()
    survived = torch.cumprod(torch.cat([torch.ones_like(hits[:, :1]), hits[:, :-1]], dim=1), dim=1)
    report.num_blocks = hits.shape[0]
    report.acceptance = hits.mean(0).tolist()
    report.conditional_acceptance = [
        float((hits[:, k] * survived[:, k]).sum() / survived[:, k].sum()) if survived[:, k].sum() else 0.0
        for k in range(block_size)
    ]
    if report.acceptance[0] < MIN_FIRST_POSITION_ACCEPTANCE:
        report.warnings.append(
            f"probe: first-position acceptance {report.acceptance[0]:.2f} < {MIN_FIRST_POSITION_ACCEPTANCE}: "
            "the drafter is untrained or misaligned with this target (e.g. trained on other layers)."
        )


def check_drafter(
    target: PreTrainedModel,
    drafter: DSparkForCausalLM,
    tokenizer: PreTrainedTokenizerBase | None = None,
    prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 32,
) -> DrafterCheckReport:
    """Check `drafter` against `target` (and its `tokenizer`, for the mask-token check), then probe its
    acceptance on `prompts` (texts or token ids; default: three bundled eval prompts, or random ids without a
    tokenizer) continued greedily by the target for `max_new_tokens` tokens.

    Structural faults stop before the probe. Nothing is modified; target and drafter stay in eval mode.
    """
    report = DrafterCheckReport()
    _structural_checks(target, drafter, report)
    if report.faults:
        return report
    was_training = drafter.training, target.training
    drafter.eval()
    target.eval()
    try:
        sequences = _probe_sequences(target, tokenizer, prompts, max_new_tokens)
        fault = _mask_token_fault(drafter.config.mask_token_id, tokenizer, [s for s, _ in sequences])
        if fault:
            report.faults.append(fault)
            return report
        report.passed.append(f"mask_token_id {drafter.config.mask_token_id} is never emitted in text")
        _probe(target, drafter, sequences, report)
    finally:
        drafter.train(was_training[0])
        target.train(was_training[1])
    return report


__all__ = ["DrafterCheckReport", "check_drafter", "MIN_FIRST_POSITION_ACCEPTANCE"]
