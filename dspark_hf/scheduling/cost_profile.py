"""The target's verification cost: `profile_cost` measures the target's forward time for 1..N new tokens
once per machine and returns a `CostProfile` that saves to a small JSON. Confidence scheduling weighs a
draft's expected return against this cost."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..generation.target_tap import cache_keyword
from ..hardware import synchronize


@dataclass
class CostProfile:
    """Target forward time per number of verified tokens, measured once per machine by `profile_cost`.

    Args:
        seconds_per_step (`list[float]`): element `B - 1` is the median time of one target forward over B new
            tokens (the anchor plus B - 1 drafts) on a cache of `context_length` tokens.
        context_length (`int`): tokens already in the target's cache while timing.
        metadata (`dict`): how and where it was measured (machine, threads, dtype, date, versions).
    """

    seconds_per_step: list[float]
    context_length: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.seconds_per_step = [float(s) for s in self.seconds_per_step]
        if not self.seconds_per_step or not all(math.isfinite(s) and s > 0 for s in self.seconds_per_step):
            raise ValueError(f"seconds_per_step must be non-empty and positive, got {self.seconds_per_step}.")

    @property
    def max_tokens(self) -> int:
        return len(self.seconds_per_step)

    @property
    def device_type(self) -> str | None:
        """The device type the target ran on while profiled ("cpu", "cuda", ...; None if not recorded)."""
        device = self.metadata.get("device")
        return None if device is None else torch.device(device).type

    def check_device(self, device: torch.device | str) -> None:
        """Raise a ValueError when the profile was measured on another device type than `device`: a CPU cost
        curve says nothing about a GPU's."""
        device_type = torch.device(device).type
        if self.device_type is not None and self.device_type != device_type:
            raise ValueError(
                f"The target's cost profile was measured on {self.device_type}, but the target runs on "
                f"{device_type}: profile it there (`profile_cost(target)` with the target on {device_type})."
            )

    def seconds(self, num_tokens: int) -> float:
        """Seconds per target step at `num_tokens` verified tokens."""
        if not 1 <= num_tokens <= self.max_tokens:
            raise ValueError(f"The profile covers 1..{self.max_tokens} tokens, got {num_tokens}.")
        return self.seconds_per_step[num_tokens - 1]

    def sps(self, num_tokens: int) -> float:
        """Target steps per second SPS(B) at B = `num_tokens` verified tokens."""
        return 1.0 / self.seconds(num_tokens)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> CostProfile:
        return cls(**json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostProfile:
        return cls.from_json(Path(path).read_text())


@torch.inference_mode()
def profile_cost(
    target: torch.nn.Module,
    *,
    max_tokens: int = 16,
    context_length: int = 256,
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
    show_progress: bool = True,
) -> CostProfile:
    """Measure the target's forward time for 1..`max_tokens` new tokens on a cache of `context_length` tokens.

    Verification cost depends on the tokens per forward and on the cache length, so the cache is prefilled
    once with random tokens and every timed forward starts from that same length (the cache is cropped back
    after each one). Token counts are interleaved inside each repeat so machine-load drift hits all of them
    alike; the median over `repeats` is kept, then made non-decreasing in B (a running maximum): verifying
    one more token never really costs less, and a noisy dip would make the scheduler verify useless drafts.
    """
    if max_tokens < 1 or context_length < 1 or repeats < 1 or warmup < 0:
        raise ValueError("max_tokens, context_length and repeats must be >= 1 and warmup >= 0.")
    config = target.config
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and context_length + max_tokens > max_positions:
        raise ValueError(
            f"context_length + max_tokens = {context_length + max_tokens} exceeds the target's "
            f"max_position_embeddings ({max_positions})."
        )
    device = next(target.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vocab_size = config.get_text_config().vocab_size
    context = torch.randint(vocab_size, (1, context_length), generator=generator).to(device)
    new_tokens = torch.randint(vocab_size, (1, max_tokens), generator=generator).to(device)

    was_training = target.training
    target.eval()
    try:
        timings = _time_forwards(target, context, new_tokens, warmup, repeats, show_progress)
    finally:
        target.train(was_training)

    seconds, running_max = [], 0.0
    for samples in timings:
        running_max = max(running_max, statistics.median(samples))
        seconds.append(running_max)
    metadata = _profile_metadata(target, warmup, repeats)
    return CostProfile(seconds_per_step=seconds, context_length=context_length, metadata=metadata)


def _time_forwards(
    target: torch.nn.Module,
    context: torch.Tensor,
    new_tokens: torch.Tensor,
    warmup: int,
    repeats: int,
    show_progress: bool,
) -> list[list[float]]:
    """Per token count B = 1..len(new_tokens), the `repeats` timings of a forward over B new tokens on the
    cache of `context` (after `warmup` untimed rounds), token counts interleaved within each round."""
    from transformers import DynamicCache

    cache_kwarg = cache_keyword(target)
    device, max_tokens = context.device, new_tokens.shape[1]
    cache = DynamicCache(config=target.config)
    target(context, use_cache=True, **{cache_kwarg: cache})
    timings: list[list[float]] = [[] for _ in range(max_tokens)]
    with tqdm(
        total=(warmup + repeats) * max_tokens, desc="profiling target", disable=not show_progress
    ) as bar:
        for repeat in range(warmup + repeats):
            for num_tokens in range(1, max_tokens + 1):
                synchronize(device)
                start = time.perf_counter()
                target(new_tokens[:, :num_tokens], use_cache=True, **{cache_kwarg: cache})
                synchronize(device)
                elapsed = time.perf_counter() - start
                # A negative argument removes that many tokens in every transformers version we support.
                cache.crop(-num_tokens)
                if repeat >= warmup:
                    timings[num_tokens - 1].append(elapsed)
                bar.update()
    return timings


def _profile_metadata(target: torch.nn.Module, warmup: int, repeats: int) -> dict[str, Any]:
    """Where and how a profile was measured. No host name: the profile is stored in the drafter's config,
    which may be published."""
    from transformers import __version__ as transformers_version

    parameter = next(target.parameters())
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(parameter.device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "model": getattr(target.config, "name_or_path", "") or target.config.model_type,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "warmup": warmup,
        "repeats": repeats,
        "torch": torch.__version__,
        "transformers": transformers_version,
    }
