"""Which draft a round verifies: the DSpark block, the lookup continuation, or none (a plain target step).

Each source's worth is its expected tokens per second: (1 + expected accepted drafts) / (its drafting time +
the target's time to verify them), with the target's time from the measured cost profile and acceptance from
running estimates of this generation's own rounds. A drafter whose block does not beat a plain step is not
run ("stepping aside"); it is probed again after a few rounds, at geometrically growing intervals while it
keeps losing, so a drafter that cannot help costs a few percent at most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from ..scheduling.cost_profile import CostProfile
from .lookup import LookupDraft

DraftSource = Literal["dspark", "lookup", "plain"]
DRAFT_SOURCES: tuple[str, ...] = get_args(DraftSource)
LookupPolicy = Literal["expected_rate", "longest_match"]
LOOKUP_POLICIES: tuple[str, ...] = get_args(LookupPolicy)

# Weight of the past in the running acceptance estimates, per observed round: about the last five rounds
# count, so the estimates follow the text (a code block copies, prose does not).
MEMORY = 0.8
# Rounds of stepping aside before the drafter is probed again; doubled after each probe it loses, up to the
# maximum, and reset when it wins on merit.
FIRST_PROBE_INTERVAL = 16
MAX_PROBE_INTERVAL = 128


@dataclass
class Acceptance:
    """Running per-position acceptance of one draft source, as a geometric model: the first j drafts all
    pass with probability rate^j. Counts decay by `MEMORY` per observed round; prior: one pass in two."""

    passed: float = 1.0
    reached: float = 2.0

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.passed = MEMORY * self.passed + accepted
        self.reached = MEMORY * self.reached + accepted + (accepted < drafted)

    @property
    def rate(self) -> float:
        return self.passed / self.reached

    def expected_accepted(self, drafted: int) -> float:
        """Expected accepted drafts among `drafted`: rate + rate^2 + ... + rate^drafted."""
        rate = self.rate
        return sum(rate**j for j in range(1, drafted + 1))


@dataclass
class Plan:
    """A round's decision: the source, and for a lookup round the tokens to verify and the matched n-gram."""

    source: DraftSource
    tokens: list[int] | None = None
    ngram: int = 0


@dataclass
class RoundPlanner:
    """Per round of one target `generate` call: which source to verify, learning from the rounds before.

    Args:
        block_size: the DSpark block size (drafts a DSpark round offers at most).
        cost_profile: the target's seconds per forward over 1..B tokens (None: only `lookup_policy=
            "longest_match"` without stepping aside, which needs no costs).
        lookup: whether lookup continuations are offered.
        step_aside: whether a round may verify no draft, without running the drafter.
        lookup_policy: "expected_rate" compares the sources' expected tokens per second; "longest_match"
            verifies the lookup continuation whenever there is one (prompt lookup's rule) and the DSpark
            block otherwise.
        plain_tokens: tokens a plain step verifies: 1, or 2 under sampling, where assisted generation cannot
            verify an empty draft and a plain step verifies one free lookup guess.
    """

    block_size: int
    cost_profile: CostProfile | None
    lookup: bool = False
    step_aside: bool = False
    lookup_policy: LookupPolicy = "longest_match"
    plain_tokens: int = 1
    dspark: Acceptance = field(default_factory=Acceptance)
    lookups: dict[int, Acceptance] = field(default_factory=dict)
    draft_seconds: float | None = None
    dspark_drafted: float | None = None
    rounds_since_dspark: int = 0
    probe_interval: int = FIRST_PROBE_INTERVAL
    _pending: tuple[DraftSource, int, int, int] | None = None  # source, start length, drafted, n-gram

    def __post_init__(self):
        if self.lookup_policy not in LOOKUP_POLICIES:
            raise ValueError(f"lookup_policy must be one of {LOOKUP_POLICIES}, got {self.lookup_policy!r}.")
        if self.cost_profile is None and (
            self.step_aside or (self.lookup and self.lookup_policy != "longest_match")
        ):
            raise ValueError(
                "Stepping aside and lookup_policy='expected_rate' weigh drafts against the target's cost: "
                "`drafter.set_cost_profile(dspark_hf.scheduling.cost_profile.profile_cost(target))` or "
                "`dspark calibrate --profile_cost`."
            )

    def observe(self, length: int) -> None:
        """Learn from the previous round now that the sequence has `length` committed tokens."""
        if self._pending is None:
            return
        source, start, drafted, ngram = self._pending
        self._pending = None
        accepted = max(min(length - start - 1, drafted), 0)
        if source == "dspark":
            self.dspark.observe(drafted, accepted)
        elif source == "lookup":
            self.lookups.setdefault(ngram, Acceptance()).observe(drafted, accepted)

    def record(self, source: DraftSource, length: int, drafted: int, seconds: float, ngram: int = 0) -> None:
        """Note what the round at sequence `length` verified, and for a DSpark round its drafting time."""
        self._pending = (source, length, drafted, ngram)
        if source == "dspark":
            self.draft_seconds = seconds if self.draft_seconds is None else _mix(self.draft_seconds, seconds)
            self.dspark_drafted = (
                drafted if self.dspark_drafted is None else _mix(self.dspark_drafted, drafted)
            )

    def plan(self, lookup: LookupDraft | None, limit: int) -> Plan:
        """The source of this round, given the lookup continuation (None when lookup is off) and the most
        drafts the round may offer."""
        options: list[tuple[float, Plan]] = []
        candidates = [] if lookup is None or not lookup.tokens.numel() else lookup.tokens[:limit].tolist()
        if candidates and self.lookup_policy == "longest_match":
            return self._chose(Plan("lookup", candidates, lookup.ngram))
        if candidates:
            acceptance = self.lookups.get(lookup.ngram, Acceptance())
            best = max(range(1, len(candidates) + 1), key=lambda n: self._rate(acceptance, n))
            options.append((self._rate(acceptance, best), Plan("lookup", candidates[:best], lookup.ngram)))
        if not self.step_aside and not options:
            return self._chose(Plan("dspark"))
        if self.draft_seconds is None:  # the drafter's cost is not known yet: try it
            return self._chose(Plan("dspark"))
        drafted = max(1, min(limit, round(self.dspark_drafted)))
        options.append((self._rate(self.dspark, drafted, self.draft_seconds), Plan("dspark")))
        if self.step_aside:
            options.append((1.0 / self._seconds(self.plain_tokens), Plan("plain")))
        best = max(options, key=lambda option: option[0])[1]
        if best.source == "dspark":
            self.probe_interval = FIRST_PROBE_INTERVAL
        elif self.rounds_since_dspark >= self.probe_interval:  # probe the drafter again
            self.probe_interval = min(2 * self.probe_interval, MAX_PROBE_INTERVAL)
            best = Plan("dspark")
        return self._chose(best)

    def _chose(self, plan: Plan) -> Plan:
        self.rounds_since_dspark = 0 if plan.source == "dspark" else self.rounds_since_dspark + 1
        return plan

    def _rate(self, acceptance: Acceptance, drafted: int, draft_seconds: float = 0.0) -> float:
        """Expected tokens per second of a round that offers `drafted` drafts."""
        return (1.0 + acceptance.expected_accepted(drafted)) / (draft_seconds + self._seconds(1 + drafted))

    def _seconds(self, num_tokens: int) -> float:
        profile = self.cost_profile
        return profile.seconds(min(num_tokens, profile.max_tokens))


def _mix(estimate: float, value: float) -> float:
    return MEMORY * estimate + (1.0 - MEMORY) * value


__all__ = [
    "DraftSource",
    "DRAFT_SOURCES",
    "LookupPolicy",
    "LOOKUP_POLICIES",
    "Acceptance",
    "Plan",
    "RoundPlanner",
]
