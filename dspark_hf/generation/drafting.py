"""DSpark drafting inside stock assisted generation: `target.generate(ids, assistant_model=drafter)`.

transformers' `AssistedCandidateGenerator` calls `assistant_model.generate(<whole sequence>)` once per round
and reads back the drafted tokens and the logits each one was drawn from; the target's outputs never reach the
assistant. So the drafter overrides `generate()` to draft one DSpark block, and it reads the target's hidden
states through forward hooks that `attach_target` installs on the target's decoder layers. Each round, the
features of the positions the target has just committed are pushed through the drafter's context cache; the
block is one backbone forward followed by a cheap left-to-right loop of the Markov head.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList
from transformers.utils import logging

from ..context_cache import DSparkContextCache
from ..hardware import synchronize
from ..scheduling.calibration import apply_temperatures
from ..scheduling.cost_profile import CostProfile
from ..scheduling.schedulers import CausalPrefixScheduler
from .lookup import lookup_continuation, one_hot_logits
from .round_planner import Plan, RoundPlanner
from .target_tap import (
    DSparkGenerationStats,
    RoundLog,
    TargetTap,
    check_target_compatibility,
    check_transformers_version,
)

logger = logging.get_logger(__name__)

# The options on `drafter.generation_config` that decide how many drafts a round offers and what it records.
VERIFICATION_OPTIONS = (
    "confidence_threshold",
    "confidence_scheduling",
    "record_confidence",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "lookup_drafting",
    "lookup_policy",
    "lookup_max_ngram",
    "lookup_min_ngram",
    "lookup_num_tokens",
    "step_aside",
)


@dataclass
class _DraftingWeights:
    """The vocabulary projections of the drafting loop, in the layout that is cheapest for one row on CPU:
    contiguous [in, out] matrices (`x @ W`) in the drafter's dtype, restricted to the draft sub-vocabulary
    when the drafter has one.
    `key` identifies the source tensors and their in-place versions, so training invalidates the copy."""

    key: tuple
    lm_head: torch.Tensor  # [d, K]
    markov_w2: torch.Tensor | None  # [r, K]
    vocab_ids: torch.Tensor | None  # [K], None for the full vocabulary


@dataclass
class _LookupOptions:
    """Where lookup drafts come from: n-gram sizes max_ngram down to min_ngram, up to num_tokens drafts."""

    max_ngram: int
    min_ngram: int
    num_tokens: int


@dataclass
class _Request:
    """The target `generate` call the drafter is serving (one call to `generate` per round): the log of its
    rounds, the ids its drafts are drawn from (None: the full vocabulary), and with lookup drafting or
    stepping aside the planner that picks each round's source."""

    log: RoundLog
    vocab_ids: torch.Tensor | None
    planner: RoundPlanner | None = None
    lookup: _LookupOptions | None = None


class _DraftContext:
    """The drafter's cache of projected target context: positions [0, end) of the sequence `ids`."""

    def __init__(self, cache: DSparkContextCache):
        self.cache = cache
        self.ids = torch.empty(0, dtype=torch.long)
        self.end = 0


class DSparkGenerationMixin(GenerationMixin):
    """Lets a DSpark drafter serve as `assistant_model` of stock transformers generation (batch size 1).

    ```python
    drafter.attach_target(target)
    out = target.generate(input_ids, assistant_model=drafter, max_new_tokens=128)
    print(drafter.last_stats.tau)
    ```
    Greedy decoding and sampling are both lossless: the target verifies every draft, and `generate` reports
    the exact logits each draft token was drawn from.

    How many drafts a block offers for verification is set on `drafter.generation_config` (per session: a
    generation config derived from the model config does not keep custom fields across `save_pretrained`):

    - `confidence_threshold` (default 0, off): end the block before the first position k >= 2 whose calibrated
      confidence c_k falls below it;
    - `confidence_scheduling` (default False): DSpark's hardware-aware scheduler. With a_j = c_1 x ... x c_j
      the prefix survival and T(B) the target's seconds per forward over B tokens, draft j is offered while
      it raises the expected throughput (1 + a_1 + ... + a_j) / T(1 + j), decided position by position from
      a_1..a_j only (`dspark_hf.scheduling.schedulers.CausalPrefixScheduler`), which keeps sampling
      lossless. T comes from the cost profile stored in the config (`set_cost_profile`, saved with the
      drafter). Both rules compose: the block ends at the first refusal of either. The first draft is always
      offered, because assisted generation cannot verify an empty draft; when the scheduler finds even it
      not worth its cost, the block is that one draft.
    - `record_confidence` (default False): keep the raw confidence logits of every drafted position per round
      in `last_stats.confidence_logits`, the data `dspark_hf.scheduling.calibration.calibrate_sts` fits
      temperatures on.
    - `lookup_drafting` (default False): also draft from the context, the continuation of the most recent
      earlier occurrence of the sequence's last n tokens (n from `lookup_max_ngram`, default 3, down to
      `lookup_min_ngram`, default 1; up to `lookup_num_tokens` drafts, default the block size). Per round
      `lookup_policy` picks the source: "longest_match" (default) verifies the lookup continuation whenever
      there is one (and skips the drafter's forward), else the DSpark block; "expected_rate" (needs the cost
      profile) verifies whichever of the two promises more tokens per second, from this generation's
      running acceptance of each and the target's cost curve. "longest_match" reached the higher tau on the
      reference target (README, "Drafts from the context").
      A lookup draft is deterministic, so the logits returned for it are one-hot: sampling stays exact.
    - `step_aside` (default False; needs the cost profile): when the DSpark block's expected tokens per
      second (its measured drafting time included) fall below a plain step's, verify no draft and do not run
      the drafter; probe it again after 16 rounds, then 32, ... (up to 128) while it keeps losing. Under
      sampling, where assisted generation cannot verify an empty draft, such a round verifies one free guess
      (the token that followed the previous occurrence of the last token).

    Confidences are calibrated by `config.confidence_temperatures` when set (see `dspark calibrate`).
    """

    _target_tap: TargetTap | None = None
    _draft_context: _DraftContext | None = None
    _request: _Request | None = None
    _drafting_weights_cache: _DraftingWeights | None = None

    def attach_target(self, target: PreTrainedModel) -> DSparkGenerationMixin:
        """Install the feature hooks on `target` (replacing any previous target) and return the drafter."""
        check_transformers_version()
        check_target_compatibility(self, target)
        self.detach_target()
        self._target_tap = TargetTap(target, self.config.target_layer_ids)
        return self

    def detach_target(self) -> None:
        """Remove the hooks from the attached target and forget its context; `last_stats` stays readable."""
        if self._target_tap is not None:
            self._target_tap.remove()
        if self._request is not None:
            self._request.log.close()
        self._target_tap = None
        self._draft_context = None

    @contextmanager
    def verification_options(self, **options: Any) -> Iterator[GenerationConfig]:
        """Use `options` (names from `VERIFICATION_OPTIONS`, e.g. `confidence_scheduling=True`) on a copy of
        `generation_config` inside a `with` block; the previous config comes back afterwards, also on error.

        ```python
        with drafter.verification_options(confidence_threshold=0.5):
            out = target.generate(ids, assistant_model=drafter)
        ```
        """
        unknown = sorted(set(options) - set(VERIFICATION_OPTIONS))
        if unknown:
            raise TypeError(f"Unknown verification options {unknown}; choose from {VERIFICATION_OPTIONS}.")
        previous = self.generation_config
        config = copy.deepcopy(previous)
        for name, value in options.items():
            setattr(config, name, value)
        self.generation_config = config
        try:
            yield config
        finally:
            self.generation_config = previous

    @property
    def cost_profile(self) -> CostProfile | None:
        """The target's verification cost that confidence scheduling uses (None until set)."""
        stored = self.config.target_cost_profile
        return None if stored is None else CostProfile(**stored)

    def set_cost_profile(self, profile: CostProfile | str | os.PathLike | None) -> None:
        """Store a target cost profile (from `dspark_hf.scheduling.cost_profile.profile_cost`, or the JSON
        file it was saved to) in the config, so it is measured once per machine and saved with the drafter;
        None removes it."""
        if profile is not None and not isinstance(profile, CostProfile):
            profile = CostProfile.load(profile)
        self.config.target_cost_profile = None if profile is None else asdict(profile)

    @property
    def last_stats(self) -> DSparkGenerationStats | None:
        """Statistics of the latest target `generate` that used this drafter (None before the first)."""
        return None if self._request is None else self._request.log.stats(self.config.block_size)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | list | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> GenerateDecoderOnlyOutput | torch.LongTensor:
        r"""Draft one block after `input_ids`, the whole sequence so far (what assisted generation passes).

        Args:
            input_ids: [1, L] prompt and committed tokens; the last one is the anchor of the block.
            generation_config: decoding options (`do_sample`, `eos_token_id`, `return_dict_in_generate`);
                assisted generation passes a copy of the target's. Defaults to `self.generation_config`.
            logits_processor: processors applied to each draft position before picking its token; assisted
                generation passes the target's, so drafts are drawn from the same warped distribution family.
            max_new_tokens: upper bound on the block, which is also capped by `config.block_size`.
            min_new_tokens: EOS is suppressed at draft positions before this count.
            attention_mask: accepted for compatibility; must be all ones (padding is not supported).
            kwargs: other model kwargs of the target that assisted generation forwards; unused.

        Returns:
            With `return_dict_in_generate`, a `GenerateDecoderOnlyOutput` whose `sequences` are `input_ids`
            followed by the drafted tokens and whose `scores` hold, per draft token, the exact logits it was
            drawn from (base logits + Markov bias, after the processors). Otherwise the sequences only.
        """
        self._check_draft_inputs(input_ids, attention_mask)
        generation_config = self.generation_config if generation_config is None else generation_config
        threshold, scheduler, record = self._verification_options()

        start_time = time.perf_counter()
        request = self._follow_generation(generation_config, input_ids[0], record)
        block_size = self.config.block_size
        limit = block_size if max_new_tokens is None else min(max_new_tokens, block_size)
        do_sample = bool(generation_config.do_sample)
        sequences, scores, source = input_ids, (), "dspark"
        if limit > 0:
            plan = self._plan_round(request, input_ids[0], limit, do_sample)
            source = plan.source
            if plan.tokens is not None:  # a lookup continuation, or under sampling a plain step's free guess
                tokens = torch.tensor([plan.tokens], dtype=input_ids.dtype, device=input_ids.device)
                sequences = torch.cat([input_ids, tokens], dim=1)
                scores = tuple(one_hot_logits(tokens[0], self.config.vocab_size).unsqueeze(1))
                request.log.record_draft(None, source)
            elif source == "plain":  # no draft: the target takes a plain step
                # Assisted generation stacks the scores even of an empty draft; greedy verification never
                # reads them, so a placeholder row stands in.
                scores = (torch.zeros(1, self.config.vocab_size, device=input_ids.device),)
                request.log.record_draft(None, source)
            else:
                sequences, scores, confidence_logits = self._draft_block(
                    input_ids,
                    limit,
                    request,
                    LogitsProcessorList(logits_processor or []),
                    do_sample=do_sample,
                    eos_token_id=generation_config.eos_token_id,
                    min_new_tokens=min_new_tokens or 0,
                    threshold=threshold,
                    scheduler=scheduler,
                    record=record,
                )
                request.log.record_draft(confidence_logits)
        synchronize(self.device)
        seconds = time.perf_counter() - start_time
        request.log.draft_time += seconds
        if request.planner is not None and limit > 0 and request.log.prefilled:
            request.planner.record(
                source, input_ids.shape[1], sequences.shape[1] - input_ids.shape[1], seconds, plan.ngram
            )
        if not generation_config.return_dict_in_generate:
            return sequences
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores)

    def _plan_round(self, request: _Request, sequence: torch.Tensor, limit: int, do_sample: bool) -> Plan:
        """This round's source: the DSpark block unless lookup drafting or stepping aside is on (and the
        target has prefilled, so the drafter's context can be complete)."""
        planner, lookup = request.planner, request.lookup
        if planner is None or not request.log.prefilled:
            return Plan("dspark")
        planner.observe(sequence.shape[0])
        found = None
        if lookup is not None:
            found = lookup_continuation(
                sequence, lookup.max_ngram, lookup.min_ngram, min(lookup.num_tokens, limit)
            )
        plan = planner.plan(found, limit)
        if plan.source == "plain" and do_sample:
            guess = lookup_continuation(sequence, 1, 1, 1)
            plan.tokens = guess.tokens.tolist() if guess.tokens.numel() else [int(sequence[-1])]
        return plan

    def _check_draft_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Raise unless the drafter is attached and the input is one unpadded sequence."""
        if self._target_tap is None:
            raise RuntimeError(
                "This DSpark drafter is not attached to a target: call `drafter.attach_target(target)` "
                "before `target.generate(..., assistant_model=drafter)`."
            )
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(
                "DSpark drafting supports batch size 1 (as transformers' assisted generation); got input_ids "
                f"of shape {tuple(input_ids.shape)}."
            )
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("DSpark drafting does not support padded inputs; pass the unpadded sequence.")

    def _follow_generation(
        self, generation_config: GenerationConfig, sequence: torch.Tensor, record: bool
    ) -> _Request:
        """The request this round belongs to, a new one when this call starts another target `generate`:
        assisted generation passes the same config object every round, and a new copy per `generate` call."""
        if self._request is not None and self._request.log.generation_key is generation_config:
            return self._request
        if self._request is not None:
            self._request.log.close()
        planner, lookup = self._round_planning(bool(generation_config.do_sample))
        self._request = _Request(
            RoundLog(generation_config, record_confidence=record),
            self.draft_vocab_for(sequence),
            planner,
            lookup,
        )
        self._target_tap.rounds = self._request.log
        return self._request

    def _draft_block(
        self,
        input_ids: torch.LongTensor,
        limit: int,
        request: _Request,
        logits_processor: LogitsProcessorList,
        record: bool,
        **picking: Any,
    ) -> tuple[torch.LongTensor, tuple[torch.Tensor, ...], list[float] | None]:
        """`input_ids` followed by up to `limit` draft tokens, the logits each was drawn from, and (with
        `record`) the raw confidence logit of each; `picking` are the options of `_pick_block_tokens`."""
        features, positions, complete = self._sync_context(input_ids[0])
        if not complete and request.log.prefilled:
            logger.warning_once(
                "The target's hidden states of some committed positions were never observed (was the "
                "target given a pre-filled cache?); drafting one token per round."
            )
        num_tokens = limit if complete else 1
        sequences = input_ids.new_empty(1, input_ids.shape[1] + num_tokens)
        sequences[:, : input_ids.shape[1]] = input_ids
        weights = self._drafting_weights(request.vocab_ids)
        hidden, logits = self._block_forward(input_ids, features, positions, weights)
        confidence_log = [] if record else None
        scores = self._pick_block_tokens(
            sequences,
            num_tokens,
            hidden,
            logits,
            weights,
            logits_processor,
            confidence_log=confidence_log,
            **picking,
        )
        return sequences[:, : input_ids.shape[1] + len(scores)], scores, confidence_log

    def _verification_options(self) -> tuple[float, CausalPrefixScheduler | None, bool]:
        """The confidence threshold, a fresh scheduler (None when scheduling is off) and whether to record
        confidences, read from `self.generation_config` and validated."""
        options = self.generation_config
        threshold = float(getattr(options, "confidence_threshold", None) or 0.0)
        scheduling = bool(getattr(options, "confidence_scheduling", False))
        record = bool(getattr(options, "record_confidence", False))
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"generation_config.confidence_threshold must be in [0, 1), got {threshold}.")
        if self.confidence_head is None and (threshold > 0 or scheduling or record):
            raise ValueError(
                "confidence_threshold > 0, confidence_scheduling and record_confidence need a drafter with a "
                "confidence head (config.enable_confidence_head)."
            )
        scheduler = None
        if scheduling:
            profile = self.cost_profile
            if profile is None:
                raise ValueError(
                    "confidence_scheduling needs the target's cost profile: "
                    "`drafter.set_cost_profile(dspark_hf.scheduling.cost_profile.profile_cost(target))`, or "
                    "run "
                    "`dspark calibrate --profile_cost` on the drafter folder."
                )
            profile.check_device(self._target_tap.target_device)
            scheduler = CausalPrefixScheduler(seconds_per_step=profile)
        return threshold, scheduler, record

    def _round_planning(self, do_sample: bool) -> tuple[RoundPlanner | None, _LookupOptions | None]:
        """The planner of a new request's rounds and its lookup options, read from `self.generation_config`
        and validated (None, None: every round drafts a DSpark block)."""
        options = self.generation_config
        lookup_drafting = bool(getattr(options, "lookup_drafting", False))
        step_aside = bool(getattr(options, "step_aside", False))
        lookup = None
        if lookup_drafting:
            lookup = _LookupOptions(
                max_ngram=int(getattr(options, "lookup_max_ngram", None) or 3),
                min_ngram=int(getattr(options, "lookup_min_ngram", None) or 1),
                num_tokens=int(getattr(options, "lookup_num_tokens", None) or self.config.block_size),
            )
            if not 1 <= lookup.min_ngram <= lookup.max_ngram or lookup.num_tokens < 1:
                raise ValueError(
                    "generation_config needs 1 <= lookup_min_ngram <= lookup_max_ngram and lookup_num_tokens "
                    f">= 1, got {lookup}."
                )
        if not (lookup_drafting or step_aside):
            return None, None
        profile = self.cost_profile
        if profile is not None:
            profile.check_device(self._target_tap.target_device)
        planner = RoundPlanner(
            block_size=self.config.block_size,
            cost_profile=profile,
            lookup=lookup_drafting,
            step_aside=step_aside,
            lookup_policy=getattr(options, "lookup_policy", None) or "longest_match",
            plain_tokens=2 if do_sample else 1,
        )
        return planner, lookup

    def _sync_context(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The captured target features of newly committed positions, their positions, and whether the context
        then covers every position before the anchor.

        The tap keeps the target forwards' features from the first position the context lacks on: the last
        forward covered [anchor, drafts] (the prompt and a draft at prefill), plain steps before it one
        position each; only the positions before the new anchor whose tokens the target committed are
        valid. The anchor's own features enter next round.
        """
        tap, context = self._target_tap, self._draft_context
        if context is None:
            context = self._draft_context = _DraftContext(DSparkContextCache(self.config.num_hidden_layers))
        known = min(context.ids.shape[0], sequence.shape[0])
        mismatch = (context.ids[:known].to(sequence.device) != sequence[:known]).nonzero()
        agreed = int(mismatch[0]) if mismatch.numel() else known
        if agreed < context.end:  # another sequence: keep the context both share, drop the stale capture
            tap.clear()
            context.cache.crop(agreed)
            context.end = agreed
        context.ids = sequence

        anchor = sequence.shape[0] - 1
        start, ids, captured = tap.span()
        end = min(start + ids.shape[0], anchor)
        if end > start:
            wrong = (ids[: end - start].to(sequence.device) != sequence[start:end]).nonzero()
            end = start + int(wrong[0]) if wrong.numel() else end
        new_start = context.end
        if start <= new_start < end:
            features = captured[:, new_start - start : end - start]
            context.end = end
        else:
            features = torch.zeros(1, 0, self.config.num_features * self.config.hidden_size)
        tap.release(context.end)
        positions = torch.arange(new_start, context.end, device=self.device)
        return features.to(self.device, self.dtype), positions, context.end == anchor

    def draft_vocab_for(self, prompt_ids: torch.Tensor) -> torch.Tensor | None:
        """The ids a request with this prompt drafts over: the draft vocabulary plus, when configured, the
        prompt's tokens (None: the full vocabulary)."""
        vocab_ids = getattr(self, "draft_vocab_ids", None)
        if vocab_ids is None or not self.config.extend_draft_vocab_with_prompt:
            return vocab_ids
        return torch.cat([vocab_ids, prompt_ids.to(vocab_ids.device)]).unique()

    def _drafting_weights(self, vocab_ids: torch.Tensor | None) -> _DraftingWeights:
        """The drafting loop's projections over `vocab_ids` (None: the full vocabulary), cached while the
        weights and the ids stay the same."""
        markov_w2 = None if self.markov_head is None else self.markov_head.markov_w2.weight
        sources = [t for t in (self.lm_head.weight, markov_w2, vocab_ids) if t is not None]
        # Inference tensors (made under torch.inference_mode) have no version counter and cannot change.
        key = tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in sources)
        cached = self._drafting_weights_cache
        if cached is None or cached.key != key:

            def layout(weight: torch.Tensor) -> torch.Tensor:
                rows = weight if vocab_ids is None else weight[vocab_ids]
                return rows.detach().t().contiguous()

            cached = _DraftingWeights(
                key, layout(self.lm_head.weight), None if markov_w2 is None else layout(markov_w2), vocab_ids
            )
            self._drafting_weights_cache = cached
        return cached

    def _block_forward(
        self,
        input_ids: torch.LongTensor,
        features: torch.Tensor,
        positions: torch.Tensor,
        weights: _DraftingWeights,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone forward over [anchor, masks] that also pushes the new context features.

        Returns the block's hidden states [gamma, d] and its float32 base logits [gamma, K] over the draft
        vocabulary (K = V without a sub-vocabulary).
        """
        block_size, anchor = self.config.block_size, input_ids.shape[1] - 1
        block = input_ids.new_full((1, block_size), self.config.mask_token_id)
        block[0, 0] = input_ids[0, anchor]
        block_positions = torch.arange(anchor, anchor + block_size, device=self.device)
        hidden = self.backbone(
            block,
            features,
            torch.cat([positions, block_positions]).unsqueeze(0),
            context_cache=self._draft_context.cache,
        )[0]
        return hidden, (hidden @ weights.lm_head).float()

    @staticmethod
    def _reads_are_free(device: torch.device) -> bool:
        """Whether reading a tensor's value on the host costs no synchronisation (CPU tensors)."""
        return device.type == "cpu"

    def _pick_block_tokens(
        self,
        sequences: torch.LongTensor,
        num_tokens: int,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        weights: _DraftingWeights,
        logits_processor: LogitsProcessorList,
        do_sample: bool,
        eos_token_id: int | list[int] | None,
        min_new_tokens: int,
        threshold: float,
        scheduler: CausalPrefixScheduler | None = None,
        confidence_log: list[float] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The sequential stage: write up to `num_tokens` draft tokens into the tail of `sequences`.

        Position k's logits are the base logits plus the Markov bias given token k-1 (-inf outside the draft
        sub-vocabulary, if any), then the processors; the returned scores are exactly those logits, over the
        full vocabulary. A block ends early after EOS, or before the first position k >= 1 that the
        confidence threshold or the `scheduler` refuses; both decide from the calibrated confidences of
        positions <= k, which depend on tokens < k only. A scheduler refusal at position 0 keeps that one
        draft (an empty draft cannot be verified). `confidence_log` receives the raw confidence logit of every
        drafted position.

        On CPU the end is decided after each token. On an accelerator, where reading a value waits for the
        device, the whole block is drafted on the device and the end is decided from one read afterwards:
        the same drafts and the same end, one host synchronisation per round instead of a few per token.
        """
        length = sequences.shape[1] - num_tokens
        device = sequences.device
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
        head = self.markov_head
        prev = sequences[0, length - 1 : length]
        state = None if head is None else head.init_state(hidden[:1])
        use_confidence = threshold > 0 or scheduler is not None or confidence_log is not None
        block_end = _BlockEnd(
            self.config.confidence_temperatures, threshold, scheduler, confidence_log, use_confidence
        )
        reads_are_free = self._reads_are_free(device)
        scores, confidence_logits, eos_hits = [], [], []
        for k in range(num_tokens):
            hidden_k = hidden[k : k + 1]
            if use_confidence:
                confidence_logits.append(self.confidence(hidden_k, prev).reshape(1))
                if reads_are_free and block_end.stops_before(k, confidence_logits[-1]):
                    break
            row = logits[k : k + 1]
            if head is not None:
                bias, state = head.step(prev, hidden_k, state, weights.markov_w2)
                row = row + bias
            if weights.vocab_ids is not None:
                full_row = row.new_full((1, self.config.vocab_size), -math.inf)
                row = full_row.index_copy_(1, weights.vocab_ids, row)
            if k < min_new_tokens and eos is not None:
                row = row.index_fill(1, eos, -math.inf)
            if logits_processor:
                row = logits_processor(sequences[:, : length + k], row)
            token = torch.multinomial(row.softmax(dim=-1), 1)[0] if do_sample else row.argmax(dim=-1)
            sequences[0, length + k] = token[0]
            scores.append(row)
            prev = sequences[0, length + k : length + k + 1]
            if eos is not None:
                eos_hits.append(torch.isin(prev, eos))
            if reads_are_free and block_end.stops_after(k, eos_hits[-1] if eos is not None else None):
                break
        if not reads_are_free:
            return tuple(scores[: block_end.replay(len(scores), confidence_logits, eos_hits)])
        return tuple(scores)


class _BlockEnd:
    """Where a drafted block ends: before the first position k >= 1 whose calibrated confidence the
    threshold or the scheduler refuses (after position 0 if they refuse it), or after the first EOS. Fed one
    position at a time (`stops_before`, `stops_after`), or all at once from a single host read (`replay`)."""

    def __init__(
        self,
        temperatures: list[float] | None,
        threshold: float,
        scheduler: CausalPrefixScheduler | None,
        confidence_log: list[float] | None,
        use_confidence: bool,
    ):
        self.temperatures = temperatures
        self.threshold = threshold
        self.scheduler = scheduler
        self.confidence_log = confidence_log
        self.use_confidence = use_confidence
        self._last = False

    def stops_before(self, k: int, confidence_logit: torch.Tensor | float) -> bool:
        """Position k's confidence decides: False to draft position k (the last one if refused at k = 0)."""
        raw = float(confidence_logit)
        calibrated = apply_temperatures(torch.tensor([[raw]]), self.temperatures, start=k).sigmoid().item()
        return self._decide(k, raw, calibrated)

    def _decide(self, k: int, raw: float, calibrated: float) -> bool:
        verify = (k == 0 or calibrated >= self.threshold) and (
            self.scheduler is None or self.scheduler.admit_confidence(calibrated)
        )
        if not verify and k > 0:
            return True
        self._last = not verify
        if self.confidence_log is not None:
            self.confidence_log.append(raw)
        return False

    def stops_after(self, k: int, eos_hit: torch.Tensor | bool | None) -> bool:
        """Whether the block ends after drafting position k."""
        return self._last or (eos_hit is not None and bool(eos_hit))

    def replay(
        self, num_tokens: int, confidence_logits: list[torch.Tensor], eos_hits: list[torch.Tensor]
    ) -> int:
        """The length of a block of `num_tokens` drafts, from the confidence logits and EOS flags of every
        position, read in one host synchronisation."""
        rows = []
        if self.use_confidence:
            raw = torch.cat(confidence_logits)
            rows += [raw, apply_temperatures(raw[None], self.temperatures)[0].sigmoid()]
        if eos_hits:
            rows.append(torch.cat(eos_hits).to(torch.float32))
        if not rows:
            return num_tokens
        values = torch.stack([row.float() for row in rows]).tolist()
        eos = values[-1] if eos_hits else [0.0] * num_tokens
        for k in range(num_tokens):
            if self.use_confidence and self._decide(k, values[0][k], values[1][k]):
                return k
            if self.stops_after(k, eos[k] > 0):
                return k + 1
        return num_tokens


__all__ = ["DSparkGenerationMixin", "VERIFICATION_OPTIONS"]
