"""Everything the drafter needs from the target's side, in one place for training and generation alike.

The drafter reads hidden states of the target's decoder layers, which stock transformers forwards do not hand
out to an assistant; forward hooks capture them (`LayerFeatures`), the same hooks at training and drafting
time so that both see identical features. Around them: decoder-layer discovery, the check that a drafter was
built for a target, the transformers versions whose assisted decoding these hooks were verified against, and
the accounting of verification rounds (tau, conditional acceptance) shared by generation and benchmarks.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from ..hardware import synchronize
from ..scheduling.calibration import CalibrationRound

# The versions whose `AssistedCandidateGenerator` / `_assisted_decoding` this module was verified against: the
# assistant's returned cache field is `past_key_values` in 5.23 and `cache` in 5.24 (both left as None here).
MIN_TRANSFORMERS_VERSION = "5.23"
MAX_TRANSFORMERS_VERSION = "5.25"  # exclusive


def check_transformers_version(version: str | None = None) -> None:
    """Raise a RuntimeError when transformers `version` (default: the installed one) is outside the verified
    range."""
    version = transformers.__version__ if version is None else version
    if not Version(MIN_TRANSFORMERS_VERSION) <= Version(version) < Version(MAX_TRANSFORMERS_VERSION):
        raise RuntimeError(
            f"DSpark assisted generation supports transformers>={MIN_TRANSFORMERS_VERSION},"
            f"<{MAX_TRANSFORMERS_VERSION} (it relies on how their assisted decoding calls the assistant); "
            f"found transformers {version}. Install a supported version, e.g. "
            f"pip install 'transformers>={MIN_TRANSFORMERS_VERSION},<{MAX_TRANSFORMERS_VERSION}'."
        )


def decoder_layers(target: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama/Qwen/Mistral-style causal LM (or of its decoder)."""
    decoder = target.get_decoder() if hasattr(target, "get_decoder") else target
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"Cannot find the decoder layers of {type(target).__name__}: expected `get_decoder().layers` to "
            "be an nn.ModuleList, as in Llama/Qwen/Mistral-style causal LMs."
        )
    return layers


def sequence_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a causal-LM forward was given (`cache` from transformers 5.24, `past_key_values` before)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def cache_keyword(model: nn.Module) -> str:
    """The forward's name for the KV cache: transformers 5.24 renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def target_compatibility_faults(config: PreTrainedConfig, target: PreTrainedModel) -> list[str]:
    """Why a drafter with `config` cannot read `target`: vocabulary and width differ, or the target layers it
    reads do not exist / the target has another depth than it was built for. Empty when compatible."""
    text = target.config.get_text_config(decoder=True)
    faults = [
        f"{name}: drafter {getattr(config, name)}, target {getattr(text, name)}."
        for name in ("vocab_size", "hidden_size")
        if getattr(config, name) != getattr(text, name)
    ]
    num_layers = len(decoder_layers(target))
    ids = list(config.target_layer_ids)
    if any(i < -1 or i >= num_layers for i in ids):
        faults.append(
            f"target_layer_ids {ids} are outside the target's layers [-1, {num_layers - 1}] (-1: embeddings)."
        )
    elif config.num_target_layers != num_layers:
        faults.append(
            f"num_target_layers: the drafter was built for a target with {config.num_target_layers} layers, "
            f"this one has {num_layers}."
        )
    return faults


def check_target_compatibility(drafter: PreTrainedModel, target: PreTrainedModel) -> None:
    """Raise a ValueError unless `drafter` is a DSpark drafter built for a target of this vocabulary, width
    and depth (see `target_compatibility_faults`)."""
    if not hasattr(drafter.config, "target_layer_ids"):
        raise ValueError(f"model must be a DSpark drafter (DSparkForCausalLM), got {type(drafter).__name__}.")
    faults = target_compatibility_faults(drafter.config, target)
    if faults:
        raise ValueError(
            f"The drafter does not fit the target ({type(target).__name__}): {' '.join(faults)} The drafter "
            "reads the target's hidden states and shares its vocabulary; build it with "
            "`DSparkForCausalLM.from_target(target_model)`."
        )


class LayerFeatures:
    """Forward hooks that keep the features of `layer_ids` from the target's latest forward.

    Layer id i captures the output of decoder layer i (before the final norm), which is HF's
    `hidden_states[i + 1]` for every layer but the last; -1 captures the input of layer 0, i.e.
    `hidden_states[0]`. Usable as a context manager that removes the hooks on exit.

    With `device`, every feature is moved there as it is captured: the layers of a target split over devices
    (`device_map="auto"`) yield their outputs on different devices, and the drafter reads them on its own.
    """

    def __init__(self, target: nn.Module, layer_ids: Sequence[int], device: torch.device | str | None = None):
        layers = decoder_layers(target)
        self.device = device
        self.features: list[torch.Tensor | None] = [None] * len(layer_ids)
        self.capturing = True
        self.handles = []
        for slot, layer_id in enumerate(layer_ids):
            if layer_id == -1:
                hook = layers[0].register_forward_pre_hook(partial(self._store_input, slot), with_kwargs=True)
            else:
                hook = layers[layer_id].register_forward_hook(partial(self._store_output, slot))
            self.handles.append(hook)

    def __enter__(self) -> LayerFeatures:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def clear(self) -> None:
        self.features = [None] * len(self.features)

    def concatenated(self) -> torch.Tensor:
        """The captured features side by side, [B, T, m*d]: the drafter's `target_hidden_states`."""
        return torch.cat(self.features, dim=-1)

    @property
    def length(self) -> int:
        return 0 if self.features[0] is None else self.features[0].shape[1]

    def _store(self, slot: int, feature: torch.Tensor) -> None:
        if self.capturing:
            feature = feature.detach()
            self.features[slot] = feature if self.device is None else feature.to(self.device)

    def _store_input(self, slot: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._store(slot, args[0] if args else kwargs["hidden_states"])

    def _store_output(self, slot: int, module: nn.Module, args: tuple, output: Any) -> None:
        self._store(slot, output[0] if isinstance(output, tuple) else output)


def accepted_per_round(committed: Sequence[int], final_length: int) -> list[int]:
    """Draft tokens accepted per round (bonus excluded), from the committed length before each verification
    round and the final length."""
    lengths = [*committed, final_length] if committed else []
    return [end - start - 1 for start, end in zip(lengths, lengths[1:])]


def round_tau(accepted: Sequence[int]) -> float:
    """Mean tokens produced per round, the bonus token included (NaN without rounds)."""
    return (sum(accepted) + len(accepted)) / len(accepted) if accepted else math.nan


def round_conditional_acceptance(
    drafted: Sequence[int], accepted: Sequence[int], block_size: int
) -> list[float]:
    """Per block position k: accepted / reached, where a round reaches k when it drafted a token at k and
    accepted every token before it (NaN where never reached)."""
    conditional = []
    for k in range(block_size):
        reached = sum(d > k and a >= k for d, a in zip(drafted, accepted))
        passed = sum(d > k and a > k for d, a in zip(drafted, accepted))
        conditional.append(passed / reached if reached else math.nan)
    return conditional


def expected_tau(acceptance: Sequence[float]) -> float:
    """Tau a drafter reaches with conditional acceptance `acceptance` per position: 1 + sum_k prod_{i<=k}."""
    tau = survival = 1.0
    for rate in acceptance:
        survival *= rate
        tau += survival
    return tau


@dataclass
class SourceStats:
    """The rounds of one draft source: how many, the drafts they offered and accepted; tau (tokens per round,
    the target's own token included) and acceptance (accepted / offered drafts)."""

    source: str
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def tau(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else math.nan

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tau": self.tau, "acceptance": self.acceptance}


@dataclass
class DSparkGenerationStats:
    """Drafting statistics of the latest `target.generate(..., assistant_model=drafter)` call.

    A verification round is one target forward after its prefill. The prefill forward also verifies a draft,
    but that one-token draft is made before the target has produced any hidden state, so it is left out.

    rounds: number of verification rounds.
    drafted: draft tokens proposed per round (0 when the length limit left no room for a draft).
    accepted: draft tokens accepted per round (the bonus token excluded).
    tau: mean tokens produced per round, the bonus token included (NaN without rounds).
    conditional_acceptance: per block position k, accepted / reached, where a round reaches k when it drafted
        a token at k and accepted every token before it (NaN where never reached).
    draft_time_s: wall time spent in the drafter, prefill round included.
    other_time_s: the rest, from the first drafting call to the end of the last target forward.
    confidence_logits: per round, the raw confidence logits (before `confidence_temperatures`) of the drafted
        positions, when `drafter.generation_config.record_confidence` was on; None otherwise.
    sources: per round, what it verified: "dspark" (a DSpark block), "lookup" (a lookup continuation) or
        "plain" (no draft, or under sampling one free guess, without running the drafter).
    """

    rounds: int
    drafted: list[int]
    accepted: list[int]
    tau: float
    conditional_acceptance: list[float]
    draft_time_s: float
    other_time_s: float
    confidence_logits: list[list[float]] | None = None
    sources: list[str] = field(default_factory=list)

    def by_source(self) -> dict[str, SourceStats]:
        """Rounds, tau and acceptance per draft source (only the sources that verified a round)."""
        per_source: dict[str, SourceStats] = {}
        for source, drafted, accepted in zip(self.sources, self.drafted, self.accepted):
            entry = per_source.setdefault(source, SourceStats(source))
            entry.rounds += 1
            entry.drafted += drafted
            entry.accepted += accepted
        return per_source

    def calibration_rounds(self) -> list[CalibrationRound]:
        """The recorded rounds as calibration data for `dspark_hf.scheduling.calibration.calibrate_sts`,
        skipping rounds that verified no draft. Record them with the full block verified (no threshold, no
        scheduling)."""
        if self.confidence_logits is None:
            raise ValueError(
                "No confidence logits were recorded: set "
                "`drafter.generation_config.record_confidence = True` before generating."
            )
        return [
            CalibrationRound(torch.tensor(logits), accepted)
            for logits, accepted in zip(self.confidence_logits, self.accepted)
            if logits
        ]


class RoundLog:
    """Bookkeeping of one target `generate` call, observed from the target's forwards.

    Before every verification forward the target cache holds all committed tokens but the last, so its length
    gives the committed length; after the last round it is cropped to the final length minus one. The cache is
    held until `close()` (the next generation or `detach_target`) to read that final length. With
    `record_confidence`, the confidence logits of each draft (`record_draft`) are filed under the round whose
    forward verifies it.
    """

    def __init__(self, generation_key: object, record_confidence: bool = False):
        self.generation_key = generation_key
        self.prefilled = False
        self.cache = None
        self.final_length: int | None = None
        self.committed: list[int] = []
        self.drafted: list[int] = []
        self.confidence_logits: list[list[float]] | None = [] if record_confidence else None
        self.sources: list[str] = []
        self._pending_confidence: list[float] = []
        self._pending_source = "plain"
        self.draft_time = 0.0
        self.start_time = self.end_time = time.perf_counter()

    def on_forward(self, cache: Any, past_length: int, num_inputs: int) -> None:
        if not self.prefilled:  # the prefill forward of this generation
            self.prefilled, self.cache = True, cache
        elif cache is not None and cache is self.cache:
            self.committed.append(past_length + 1)
            self.drafted.append(num_inputs - 1)
            self.sources.append(self._pending_source)
            if self.confidence_logits is not None:
                self.confidence_logits.append(self._pending_confidence)
        else:
            return
        self._pending_confidence = []
        self._pending_source = "plain"  # a round the drafter was not asked about verifies no draft

    def record_draft(self, confidence_logits: list[float] | None, source: str = "dspark") -> None:
        """Note the source and the raw confidence logits (None: not recorded) of the draft the next
        verification forward checks."""
        self._pending_confidence = list(confidence_logits or [])
        self._pending_source = source

    def on_forward_end(self, cache: Any) -> None:
        if cache is not None and cache is self.cache:
            self.end_time = time.perf_counter()

    def close(self) -> None:
        """Fix the final length and release the target's cache."""
        if self.cache is not None:
            self.final_length = self.cache.get_seq_length() + 1
            self.cache = None

    def stats(self, block_size: int) -> DSparkGenerationStats:
        final_length = self.final_length if self.cache is None else self.cache.get_seq_length() + 1
        accepted = accepted_per_round(self.committed, final_length)
        return DSparkGenerationStats(
            rounds=len(accepted),
            drafted=list(self.drafted),
            accepted=accepted,
            tau=round_tau(accepted),
            conditional_acceptance=round_conditional_acceptance(self.drafted, accepted, block_size),
            draft_time_s=self.draft_time,
            other_time_s=max(self.end_time - self.start_time - self.draft_time, 0.0),
            confidence_logits=None
            if self.confidence_logits is None
            else [list(r) for r in self.confidence_logits],
            sources=list(self.sources),
        )


class TargetTap(LayerFeatures):
    """`LayerFeatures` for assisted generation: keeps the features of the committed positions that the drafter
    has not read yet, across target forwards, and feeds every target forward to the current `rounds` log.

    A forward that starts at cache length s shows that every position before s is committed, so captured
    positions from s on (rejected drafts, or another sequence) are dropped and the new capture is appended.
    The drafter reads the span (`span`) and releases what its context cache holds (`release`); while it
    steps aside, plain steps keep adding one position each, so it catches up when it drafts again. Only
    single-sequence forwards over token ids can be rounds of assisted generation (and be checked against the
    committed tokens); other forwards drop what was kept.
    """

    def __init__(
        self, target: PreTrainedModel, layer_ids: Sequence[int], device: torch.device | str | None = None
    ):
        super().__init__(target, layer_ids, device)
        self.target_device = next(target.parameters()).device
        self.segments: list[
            tuple[int, torch.Tensor, torch.Tensor]
        ] = []  # (start, ids [n], features [1, n, F])
        self.rounds: RoundLog | None = None
        self._forward_start: int | None = None
        self._forward_ids: torch.Tensor | None = None
        self.handles += [
            target.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            target.register_forward_hook(self._after_forward, with_kwargs=True),
        ]

    def clear(self) -> None:
        super().clear()
        self.segments = []

    @property
    def start(self) -> int:
        """Sequence index of the first kept position."""
        return self.segments[0][0] if self.segments else 0

    def span(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The kept positions: their first sequence index, their token ids [n] and features [1, n, F]."""
        if not self.segments:
            return 0, torch.empty(0, dtype=torch.long), torch.empty(1, 0, 0)
        if len(self.segments) > 1:  # merge, so the next read does not concatenate again
            start = self.segments[0][0]
            ids = torch.cat([segment[1] for segment in self.segments])
            features = torch.cat([segment[2] for segment in self.segments], dim=1)
            self.segments = [(start, ids, features)]
        return self.segments[0]

    def release(self, end: int) -> None:
        """Forget the kept positions before sequence index `end` (the drafter's context holds them)."""
        kept = []
        for start, ids, features in self.segments:
            if start + ids.shape[0] > end:
                skip = max(end - start, 0)
                kept.append((start + skip, ids[skip:], features[:, skip:]))
        self.segments = kept

    def _keep_before(self, position: int) -> None:
        """Drop kept positions from `position` on; drop everything if they would leave a gap before it."""
        kept = []
        for start, ids, features in self.segments:
            if start < position:
                end = min(start + ids.shape[0], position)
                kept.append((start, ids[: end - start], features[:, : end - start]))
        if kept and kept[-1][0] + kept[-1][1].shape[0] < position:
            kept = []
        self.segments = kept

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = sequence_cache(kwargs)
        super().clear()
        self.capturing = input_ids is not None and input_ids.shape[0] == 1
        self._forward_start = None
        if not self.capturing:
            self.segments = []
            return
        start = cache.get_seq_length() if cache is not None else 0
        self._keep_before(start)
        self._forward_start, self._forward_ids = start, input_ids[0]
        if self.rounds is not None:
            self.rounds.on_forward(cache, start, input_ids.shape[1])

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._forward_start is not None and self.features[0] is not None:
            self.segments.append((self._forward_start, self._forward_ids, self.concatenated()))
            super().clear()
        if self.rounds is not None:
            synchronize(self.target_device)  # the round's end time covers its kernels
            self.rounds.on_forward_end(sequence_cache(kwargs))


__all__ = [
    "MIN_TRANSFORMERS_VERSION",
    "MAX_TRANSFORMERS_VERSION",
    "check_transformers_version",
    "decoder_layers",
    "sequence_cache",
    "target_compatibility_faults",
    "check_target_compatibility",
    "LayerFeatures",
    "TargetTap",
    "RoundLog",
    "DSparkGenerationStats",
    "SourceStats",
    "accepted_per_round",
    "round_tau",
    "round_conditional_acceptance",
    "expected_tau",
]
