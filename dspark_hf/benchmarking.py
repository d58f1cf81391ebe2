"""Side-by-side decoding measurements, shared by `dspark quickstart` and `benchmarks/`.

This machine class is noisy, so methods are run interleaved prompt by prompt, and speed is reported as
medians and per-prompt ratios against plain decoding measured in the same run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class PromptRun:
    """One generation of one method on one prompt."""

    method: str
    prompt_index: int
    new_tokens: int
    seconds: float
    output_ids: list[int]
    rounds: int = 0
    accepted: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


@dataclass
class MethodSummary:
    """Aggregate of one method over a prompt set; speed relative to the plain baseline of the same run."""

    tau: float
    tokens_per_s: float
    speedup_vs_plain: float
    draft_time_share: float
    conditional_acceptance: list[float]
    per_prompt_speedup: list[float]
    prompts: int
    new_tokens: int

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def encode_chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """[1, L] input ids of a single user turn with the generation prompt of the chat template."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def timed_generate(
    method: str,
    prompt_index: int,
    target: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    do_sample: bool,
    seed: int = 0,
    assistant_model: PreTrainedModel | None = None,
    **generate_kwargs,
) -> PromptRun:
    """Generate once and time it; with a DSpark assistant, also collect its drafting statistics."""
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
    if do_sample:
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
    if assistant_model is not None:
        kwargs["assistant_model"] = assistant_model
    attention_mask = torch.ones_like(input_ids)
    start = time.perf_counter()
    with torch.inference_mode():
        output = target.generate(input_ids, attention_mask=attention_mask, **kwargs)
    seconds = time.perf_counter() - start
    new = output[0, input_ids.shape[1] :].tolist()
    run = PromptRun(method, prompt_index, len(new), seconds, new)
    stats = getattr(assistant_model, "last_stats", None)
    if stats is not None:
        run.rounds, run.accepted, run.drafted = stats.rounds, list(stats.accepted), list(stats.drafted)
        run.draft_seconds = stats.draft_time_s
    elif generate_kwargs.get("prompt_lookup_num_tokens"):
        run.rounds = 0  # transformers does not expose acceptance of prompt lookup
    return run


def conditional_acceptance(runs: Sequence[PromptRun], block_size: int) -> list[float]:
    """Per block position k: rounds accepting draft k over rounds that drafted k and all tokens before it."""
    reached = [0] * block_size
    passed = [0] * block_size
    for run in runs:
        for drafted, accepted in zip(run.drafted, run.accepted):
            for k in range(min(drafted, block_size)):
                if accepted >= k:
                    reached[k] += 1
                    passed[k] += accepted > k
    return [p / r if r else math.nan for p, r in zip(passed, reached)]


def summarize(
    runs: Sequence[PromptRun], baseline: Sequence[PromptRun], block_size: int | None = None
) -> MethodSummary:
    """Summarise `runs` of one method against `baseline` runs of the same prompts (matched by index)."""
    base = {r.prompt_index: r for r in baseline}
    ratios = [r.tokens_per_s / base[r.prompt_index].tokens_per_s for r in runs if r.prompt_index in base]
    rounds = sum(r.rounds for r in runs)
    tau = (sum(sum(r.accepted) for r in runs) + rounds) / rounds if rounds else math.nan
    seconds = sum(r.seconds for r in runs)
    return MethodSummary(
        tau=tau,
        tokens_per_s=statistics.median(r.tokens_per_s for r in runs),
        speedup_vs_plain=statistics.median(ratios) if ratios else math.nan,
        draft_time_share=sum(r.draft_seconds for r in runs) / seconds if rounds else math.nan,
        conditional_acceptance=conditional_acceptance(runs, block_size) if block_size and rounds else [],
        per_prompt_speedup=ratios,
        prompts=len(runs),
        new_tokens=sum(r.new_tokens for r in runs),
    )


def run_interleaved(
    methods: dict[str, Callable[[int, torch.Tensor], PromptRun]],
    prompts: Sequence[torch.Tensor],
    progress: Callable | None = None,
) -> dict[str, list[PromptRun]]:
    """Run every method on prompt 0, then every method on prompt 1, ... so that drifts in machine speed hit
    all methods alike; the order of methods rotates from prompt to prompt so none always runs first. Each
    method is a callable `(prompt_index, input_ids) -> PromptRun`."""
    names = list(methods)
    runs: dict[str, list[PromptRun]] = {name: [] for name in names}
    indices = range(len(prompts))
    for index in progress(indices) if progress else indices:
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(methods[name](index, prompts[index]))
    return runs


__all__ = [
    "PromptRun",
    "MethodSummary",
    "encode_chat_prompt",
    "timed_generate",
    "conditional_acceptance",
    "summarize",
    "run_interleaved",
]
