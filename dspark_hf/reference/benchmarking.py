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
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..generation.target_tap import (
    accepted_per_round,
    round_conditional_acceptance,
    round_tau,
    sequence_cache,
)
from ..hardware import synchronize


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
    target_forwards: int = 0
    target_seconds: float = 0.0
    sources: dict[str, dict] = field(default_factory=dict)  # per draft source: rounds, tau, acceptance

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
    target_time_share: float = math.nan
    mean_verified_tokens: float = math.nan  # tokens the target scores per round: drafts + 1

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def encode_chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """[1, L] input ids of a single user turn with the generation prompt of the chat template."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


class ForwardLog:
    """While active, records every forward of `model`: its cache length before the call, how many tokens it
    was given, and the wall time spent inside it.

    Every decoding method that verifies drafts (transformers' assisted generation, prompt lookup, DFlash)
    runs one target forward per round on [last committed token, drafts], after cropping the target's cache
    to all committed tokens but the last. So the target's forwards alone give each round's drafted and
    accepted counts, whatever produced the drafts; plain decoding comes out as rounds of 0 drafts.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.calls: list[tuple[int, int]] = []  # (cache length before the forward, input tokens)
        self.seconds = 0.0
        self._started = 0.0
        self._handles: list = []
        self._device = next(model.parameters()).device

    def __enter__(self) -> ForwardLog:
        self._handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        length = input_ids.shape[-1] if input_ids is not None else kwargs["inputs_embeds"].shape[-2]
        cache = sequence_cache(kwargs)
        self.calls.append((cache.get_seq_length() if cache is not None else 0, length))
        synchronize(self._device)
        self._started = time.perf_counter()

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        synchronize(self._device)
        self.seconds += time.perf_counter() - self._started

    def rounds(self, final_length: int) -> tuple[list[int], list[int]]:
        """Drafted and accepted tokens (bonus excluded) of each verification round, i.e. of every forward
        after the prefill, for a batch-1 generation whose output has `final_length` tokens."""
        committed = [past + 1 for past, _ in self.calls[1:]]
        drafted = [tokens - 1 for _, tokens in self.calls[1:]]
        return drafted, accepted_per_round(committed, final_length)


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
    """Generate once and time it, logging the target's forwards. Drafted/accepted counts per round come from
    the DSpark assistant's own statistics when it has them, otherwise from the target's forwards."""
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
    if do_sample:
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
    if assistant_model is not None:
        kwargs["assistant_model"] = assistant_model
    attention_mask = torch.ones_like(input_ids)
    with ForwardLog(target) as forwards, torch.inference_mode():
        synchronize(target.device)
        start = time.perf_counter()
        output = target.generate(input_ids, attention_mask=attention_mask, **kwargs)
        synchronize(target.device)
        seconds = time.perf_counter() - start
    new = output[0, input_ids.shape[1] :].tolist()
    run = PromptRun(
        method,
        prompt_index,
        len(new),
        seconds,
        new,
        target_forwards=len(forwards.calls),
        target_seconds=forwards.seconds,
    )
    stats = getattr(assistant_model, "last_stats", None)
    if stats is not None:
        run.rounds, run.accepted, run.drafted = stats.rounds, list(stats.accepted), list(stats.drafted)
        run.draft_seconds = stats.draft_time_s
        run.sources = {source: entry.to_dict() for source, entry in stats.by_source().items()}
    else:
        run.drafted, run.accepted = forwards.rounds(output.shape[1])
        run.rounds = len(run.accepted)
    return run


def conditional_acceptance(runs: Sequence[PromptRun], block_size: int) -> list[float]:
    """Per block position k: rounds accepting draft k over rounds that drafted k and all tokens before it."""
    drafted = [d for run in runs for d in run.drafted]
    accepted = [a for run in runs for a in run.accepted]
    return round_conditional_acceptance(drafted, accepted, block_size)


def summarize(
    runs: Sequence[PromptRun], baseline: Sequence[PromptRun], block_size: int | None = None
) -> MethodSummary:
    """Summarise `runs` of one method against `baseline` runs of the same prompts (matched by index).

    `draft_time_share` is the drafter's own measured time over the total (NaN when no run measured one);
    `target_time_share` the time inside target forwards over the total."""
    base = {r.prompt_index: r for r in baseline}
    ratios = [r.tokens_per_s / base[r.prompt_index].tokens_per_s for r in runs if r.prompt_index in base]
    rounds = sum(r.rounds for r in runs)
    seconds = sum(r.seconds for r in runs)
    return MethodSummary(
        tau=round_tau([a for r in runs for a in r.accepted]),
        tokens_per_s=statistics.median(r.tokens_per_s for r in runs),
        speedup_vs_plain=statistics.median(ratios) if ratios else math.nan,
        draft_time_share=sum(r.draft_seconds for r in runs) / seconds
        if any(r.draft_seconds for r in runs)
        else math.nan,
        conditional_acceptance=conditional_acceptance(runs, block_size) if block_size and rounds else [],
        per_prompt_speedup=ratios,
        prompts=len(runs),
        new_tokens=sum(r.new_tokens for r in runs),
        target_time_share=sum(r.target_seconds for r in runs) / seconds
        if any(r.target_forwards for r in runs)
        else math.nan,
        mean_verified_tokens=1 + sum(sum(r.drafted) for r in runs) / rounds if rounds else math.nan,
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


def json_safe(value: object) -> object:
    """NaN/inf -> null (JSON has no NaN) and floats rounded to 5 decimals, recursively."""
    if isinstance(value, float):
        return round(value, 5) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


__all__ = [
    "json_safe",
    "PromptRun",
    "MethodSummary",
    "ForwardLog",
    "encode_chat_prompt",
    "timed_generate",
    "conditional_acceptance",
    "summarize",
    "run_interleaved",
]
