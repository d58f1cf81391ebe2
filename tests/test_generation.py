"""DSpark drafting inside stock assisted generation: `target.generate(ids, assistant_model=drafter)`."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import transformers
from conftest import make_tiny_drafter, make_tiny_target

from dspark_hf import DSparkConfig, DSparkForCausalLM
from dspark_hf.formats.deepspec import deepspec_config_dict
from dspark_hf.generation.lookup import lookup_continuation, one_hot_logits
from dspark_hf.generation.target_tap import SourceStats, check_transformers_version
from dspark_hf.heads import GatedMarkovHead, RNNMarkovHead
from dspark_hf.scheduling.calibration import record_calibration_rounds
from dspark_hf.scheduling.cost_profile import CostProfile
from dspark_hf.scheduling.schedulers import CausalPrefixScheduler

VOCAB, HIDDEN, TARGET_LAYERS = 64, 64, 4
LAYER_IDS = [-1, 1, 2]
BLOCK = 5
NEW_TOKENS = 64
# Embedding scale at which the tiny targets' greedy continuation mostly, not always, follows the successor
# permutation (about 2/3 of the steps over the test prompts): long accepted drafts, and rejections anywhere.
SUCCESSOR_SCALE = 0.11


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_target(kind: str, vocab: int = VOCAB, hidden: int = HIDDEN, successor_scale: float | None = None):
    """A tiny random Llama or Qwen3, and (with `successor_scale`) the permutation its greedy decoding follows.

    With `successor_scale`, embedding rows are orthonormal rows scaled by it and the LM head maps each row to
    its successor's logit, so the next token is mostly the successor of the current one; the random layers add
    context dependence, more of it the smaller the scale.
    """
    target = make_tiny_target(kind, vocab, hidden, TARGET_LAYERS, max_position_embeddings=256,
                              tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)  # fmt: skip
    successor = torch.randperm(vocab)
    if successor_scale is not None:
        basis, _ = torch.linalg.qr(torch.randn(hidden, hidden))
        with torch.no_grad():
            target.model.embed_tokens.weight.copy_(basis[:vocab] * successor_scale)
            target.lm_head.weight.zero_()
            target.lm_head.weight[successor] = basis[:vocab] * 2.0
    return target.eval(), successor


def teach_successor(drafter: DSparkForCausalLM, successor: torch.Tensor, strength: float = 40.0) -> None:
    """Make the Markov head predict `successor[previous token]`, overriding the (random) backbone."""
    head, vocab = drafter.markov_head, successor.numel()
    rank = head.markov_rank
    with torch.no_grad():
        head.markov_w1.weight.copy_(torch.eye(vocab, rank))
        head.markov_w2.weight.zero_()
        head.markov_w2.weight[successor, torch.arange(vocab)] = strength
        if isinstance(head, GatedMarkovHead):  # gate fully open: the vanilla transition
            head.gate_proj.weight.zero_()
            head.gate_proj.bias.fill_(20.0)
        if isinstance(head, RNNMarkovHead):  # output = tanh(20 * W1[prev]) ~ W1[prev]
            head.joint_proj.weight.zero_()
            head.joint_proj.bias.zero_()
            head.joint_proj.weight[2 * rank :, rank : 2 * rank] = 20.0 * torch.eye(rank)


def tiny_drafter(target, head: str = "vanilla", successor: torch.Tensor | None = None, **overrides):
    fields = dict(
        intermediate_size=2 * HIDDEN,
        markov_rank=target.config.vocab_size,
        markov_head_type=head,
        block_size=BLOCK,
        target_layer_ids=LAYER_IDS,
    )
    drafter = make_tiny_drafter(target, seed=1, **{**fields, **overrides}).eval()
    if successor is not None:
        teach_successor(drafter, successor)
    return drafter.attach_target(target)


def prompts(count: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` random prompts of lengths 1..40."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, 1 + (7 * i) % 40), generator=generator) for i in range(count)]


def random_prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


class DraftSpy:
    """Records every drafting call: (input_ids, output, keyword arguments)."""

    def __init__(self, drafter, monkeypatch):
        self.calls: list[tuple[torch.Tensor, object, dict]] = []
        generate = drafter.generate

        def spy(input_ids, **kwargs):
            out = generate(input_ids, **kwargs)
            self.calls.append((input_ids, out, kwargs))
            return out

        monkeypatch.setattr(drafter, "generate", spy)

    @property
    def drafts(self) -> list[tuple[int, torch.Tensor]]:
        """(committed length, drafted tokens) per call."""
        return [(ids.shape[1], out.sequences[0, ids.shape[1] :]) for ids, out, _ in self.calls]


class ForwardCounter:
    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.count += 1


_greedy_reference: dict[tuple[str, int], torch.Tensor] = {}


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_is_token_identical_to_target(kind, head):
    """20 prompts x 64 tokens; every other prompt with confidence truncation (calibrated by temperatures)."""
    target, successor = tiny_target(kind, successor_scale=SUCCESSOR_SCALE)
    drafter = tiny_drafter(target, head, successor)
    drafter.config.confidence_temperatures = [1.0, 0.8, 1.3, 1.0, 2.0]
    with torch.no_grad():
        drafter.confidence_head.proj.weight.normal_(0.0, 0.2)
    accepted, truncated = 0, [0, 0]
    for i, ids in enumerate(prompts(20)):
        drafter.generation_config.confidence_threshold = 0.5 * (i % 2)
        if (kind, i) not in _greedy_reference:
            _greedy_reference[kind, i] = target.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
        out = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=NEW_TOKENS)
        assert torch.equal(out, _greedy_reference[kind, i]), f"prompt {i} (length {ids.shape[1]}) diverged"
        stats = drafter.last_stats
        accepted += sum(stats.accepted)
        # Blocks shorter than BLOCK before the length limit binds can only come from the confidence head.
        truncated[i % 2] += sum(d < BLOCK for d in stats.drafted[: -BLOCK - 1])
    assert accepted > 20 * NEW_TOKENS // 4, "the taught drafter should be accepted often"
    assert truncated[0] == 0 and truncated[1] > 0


def test_tau_matches_an_independent_count(monkeypatch):
    target, successor = tiny_target("llama", successor_scale=SUCCESSOR_SCALE)
    drafter = tiny_drafter(target, "vanilla", successor)
    spy, forwards = DraftSpy(drafter, monkeypatch), ForwardCounter(target)
    ids = random_prompt(12, seed=3)
    out = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=NEW_TOKENS)
    forwards.handle.remove()
    stats = drafter.last_stats

    # Independent count: tokens produced after the prefill round over target forwards after the prefill; the
    # prefill round ends where the second drafting call starts.
    committed_after_prefill = spy.drafts[1][0]
    tau = (out.shape[1] - committed_after_prefill) / (forwards.count - 1)
    assert stats.rounds == forwards.count - 1
    assert stats.tau == pytest.approx(tau)
    assert stats.tau > 1.5
    assert stats.tau == pytest.approx(1 + sum(stats.accepted) / stats.rounds)
    assert all(0 <= a <= d for a, d in zip(stats.accepted, stats.drafted))
    reached = [c for c in stats.conditional_acceptance if not math.isnan(c)]
    assert len(reached) == BLOCK and all(0.0 <= c <= 1.0 for c in reached)
    assert stats.draft_time_s > 0 and stats.other_time_s > 0
    # Never drafted beyond the length limit: every draft leaves room for the target's bonus token.
    max_length = ids.shape[1] + NEW_TOKENS
    assert all(length + len(drafts) <= max_length - 1 for length, drafts in spy.drafts)
    assert all(len(drafts) <= BLOCK for _, drafts in spy.drafts)

    drafter.generation_config.num_assistant_tokens = 2
    target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=NEW_TOKENS)
    stats = drafter.last_stats
    assert max(stats.drafted) == 2

    drafter.detach_target()  # releases the target's cache, keeps the statistics
    assert drafter.last_stats.accepted == stats.accepted and drafter._request.log.cache is None


def test_eos_stops_generation_identically(monkeypatch):
    target, successor = tiny_target("qwen3", successor_scale=SUCCESSOR_SCALE)
    drafter = tiny_drafter(target, "gated", successor)
    spy = DraftSpy(drafter, monkeypatch)
    ids = random_prompt(12, seed=5)
    free = target.generate(ids, do_sample=False, max_new_tokens=40)[0, ids.shape[1] :]
    eos = int(free[12])
    first = int((free == eos).nonzero()[0])

    kwargs = dict(do_sample=False, max_new_tokens=40, eos_token_id=eos)
    out = target.generate(ids, assistant_model=drafter, **kwargs)
    assert torch.equal(out, target.generate(ids, **kwargs))
    assert out.shape[1] == ids.shape[1] + first + 1 and out[0, -1] == eos
    # The drafter proposed the EOS itself and ended its block there.
    assert any(len(drafts) and drafts[-1] == eos and eos not in drafts[:-1] for _, drafts in spy.drafts)

    kwargs["min_new_tokens"] = first + 2  # EOS suppressed in the target and in the drafts until then
    out = target.generate(ids, assistant_model=drafter, **kwargs)
    assert torch.equal(out, target.generate(ids, **kwargs))
    assert eos not in out[0, ids.shape[1] : ids.shape[1] + first + 2]


def target_features(target, sequence: torch.Tensor) -> torch.Tensor:
    """Fresh, non-incremental recomputation of the drafter's context features for `sequence` [1, L]."""
    hidden_states = target(sequence, output_hidden_states=True).hidden_states
    return torch.cat([hidden_states[i + 1] for i in LAYER_IDS], dim=-1)


def teacher_forced_block(drafter, out, features, input_ids, draft):
    """The drafting call's tokens, and a from-scratch forward of its block with fresh target features and
    the drafted tokens teacher-forced into the heads."""
    anchor, drafted = input_ids.shape[1] - 1, draft.sequences[0, input_ids.shape[1] :]
    block = torch.full((1, BLOCK), drafter.config.mask_token_id)
    block[0, 0] = out[0, anchor]
    prev = block.clone()
    prev[0, 1 : 1 + len(drafted)] = drafted[: BLOCK - 1]
    reference = drafter(
        input_ids=block,
        target_hidden_states=features[:, :anchor],
        position_ids=torch.arange(anchor + BLOCK)[None],
        prev_token_ids=prev,
    )
    return drafted, reference


def test_drafts_carry_the_teacher_forced_logits_and_confidence_cut(monkeypatch):
    """Each round's scores equal a from-scratch drafter forward (fresh target features, drafted tokens
    teacher-forced into the heads), and blocks end at the first position whose confidence is below the
    threshold."""
    target, successor = tiny_target("qwen3", successor_scale=SUCCESSOR_SCALE)
    drafter = tiny_drafter(target, "rnn", successor)
    temperatures = [1.0, 0.8, 1.3, 1.0, 2.0]
    drafter.config.confidence_temperatures = temperatures
    drafter.generation_config.confidence_threshold = threshold = 0.5
    with torch.no_grad():
        drafter.confidence_head.proj.weight.normal_(0.0, 0.2)
    spy = DraftSpy(drafter, monkeypatch)
    out = target.generate(
        random_prompt(12, seed=7), assistant_model=drafter, do_sample=False, max_new_tokens=48
    )
    with torch.no_grad():
        features = target_features(target, out)
        cut_by_confidence = 0
        # The first call drafts before any target feature exists.
        for input_ids, draft, kwargs in spy.calls[1:]:
            drafted, reference = teacher_forced_block(drafter, out, features, input_ids, draft)
            torch.testing.assert_close(
                torch.stack(draft.scores, 1)[0], reference.logits[0, : len(drafted)], atol=2e-4, rtol=1e-4
            )
            confidence = torch.sigmoid(reference.confidence_logits[0] / torch.tensor(temperatures))
            limit = min(kwargs["max_new_tokens"], BLOCK)
            low = [k for k in range(1, limit) if confidence[k] < threshold]
            assert len(drafted) == (low[0] if low else limit)
            cut_by_confidence += bool(low)
    assert cut_by_confidence > 0


def test_hooked_context_equals_recomputed_target_hidden_states(monkeypatch):
    """The features pushed into the drafter, over a generation and its continuation, are exactly the target's
    hidden states of every position before the last anchor, each pushed once (the context is reused)."""
    target, successor = tiny_target("llama", successor_scale=SUCCESSOR_SCALE)
    drafter = tiny_drafter(target, "vanilla", successor)
    pushed = []
    backbone = drafter.backbone

    def recording_backbone(input_ids, target_hidden_states, position_ids, **kwargs):
        pushed.append((target_hidden_states, position_ids[0, : target_hidden_states.shape[1]]))
        return backbone(input_ids, target_hidden_states, position_ids, **kwargs)

    monkeypatch.setattr(drafter, "backbone", recording_backbone)
    spy = DraftSpy(drafter, monkeypatch)
    first = target.generate(
        random_prompt(12, seed=9), assistant_model=drafter, do_sample=False, max_new_tokens=30
    )
    stats = drafter.last_stats
    assert 0 < sum(stats.accepted) < sum(stats.drafted)  # windows cut inside blocks
    with torch.no_grad():  # unrelated forwards in between are not mistaken for the sequence's features
        target(random_prompt(9, seed=1))
        target(torch.randint(0, VOCAB, (2, 7)))
    follow_up = torch.cat([first, torch.tensor([[5, 17, 33]])], dim=1)
    out = target.generate(follow_up, assistant_model=drafter, do_sample=False, max_new_tokens=30)

    positions = torch.cat([p for _, p in pushed])
    last_anchor = spy.drafts[-1][0] - 1
    assert torch.equal(positions, torch.arange(last_anchor))
    with torch.no_grad():
        expected = target_features(target, out)[:, :last_anchor]
    torch.testing.assert_close(torch.cat([f for f, _ in pushed], dim=1), expected, atol=1e-5, rtol=1e-5)


def sampling_setup():
    """A 5-token target with a peaked, context-dependent distribution and a drafter that disagrees with it."""
    target, _ = tiny_target("llama", vocab=5, hidden=16)
    with torch.no_grad():
        target.lm_head.weight.mul_(60.0)
    drafter = tiny_drafter(target, "rnn", markov_rank=4, block_size=3)
    with torch.no_grad():  # a strong, prefix-dependent Markov bias: drafts often differ from the target's
        drafter.markov_head.markov_w1.weight.normal_(0.0, 1.0)
        drafter.markov_head.markov_w2.weight.normal_(0.0, 3.0)
    return target, drafter


SAMPLING = dict(do_sample=True, temperature=0.7, repetition_penalty=1.3)
SAMPLED_TOKENS = 3


def exact_distribution(target, prompt: torch.Tensor) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Brute force: the target's probability of every continuation of SAMPLED_TOKENS tokens, with the same
    logits processors `generate` builds for SAMPLING (repetition penalty, then temperature)."""
    processors = transformers.LogitsProcessorList(
        [
            transformers.RepetitionPenaltyLogitsProcessor(SAMPLING["repetition_penalty"]),
            transformers.TemperatureLogitsWarper(SAMPLING["temperature"]),
        ]
    )
    vocab = target.config.vocab_size
    continuations = list(itertools.product(range(vocab), repeat=SAMPLED_TOKENS))
    sequences = torch.cat([prompt.expand(len(continuations), -1), torch.tensor(continuations)], dim=1)
    with torch.no_grad():
        logits = target(sequences).logits
    log_probs = torch.zeros(len(continuations))
    for t in range(SAMPLED_TOKENS):
        position = prompt.shape[1] + t
        scores = processors(sequences[:, :position], logits[:, position - 1])
        log_probs += scores.log_softmax(-1).gather(-1, sequences[:, position : position + 1]).squeeze(-1)
    return continuations, log_probs.exp()


def chi_square_p_value(counts: torch.Tensor, probabilities: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; the least likely cells are pooled until each bin expects 5."""
    expected = probabilities.double() * counts.sum()
    observed_bins, expected_bins, pool_o, pool_e = [], [], 0.0, 0.0
    for i in expected.argsort(descending=True).tolist():
        pool_o, pool_e = pool_o + counts[i].item(), pool_e + expected[i].item()
        if pool_e >= min_expected:
            observed_bins.append(pool_o)
            expected_bins.append(pool_e)
            pool_o = pool_e = 0.0
    observed_bins[-1] += pool_o
    expected_bins[-1] += pool_e
    observed, expected = torch.tensor(observed_bins), torch.tensor(expected_bins)
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(len(observed_bins) - 1.0, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, statistic / 2).item()


def sampled_continuation_p_value(target, drafter, samples: int) -> float:
    """Draw `samples` assisted generations (longer than the tally, so multi-token blocks are verified) and
    test their first SAMPLED_TOKENS tokens against the exact target distribution."""
    prompt = torch.tensor([[1, 3, 0, 2]])
    continuations, probabilities = exact_distribution(target, prompt)
    index = {c: i for i, c in enumerate(continuations)}
    counts = torch.zeros(len(continuations))
    torch.manual_seed(1234)
    for _ in range(samples):
        out = target.generate(prompt, assistant_model=drafter, max_new_tokens=SAMPLED_TOKENS + 3, **SAMPLING)
        counts[index[tuple(out[0, prompt.shape[1] : prompt.shape[1] + SAMPLED_TOKENS].tolist())]] += 1
    return chi_square_p_value(counts, probabilities)


SAMPLES = 400
SIGNIFICANCE = 1e-3


def test_sampling_matches_the_exact_target_distribution():
    target, drafter = sampling_setup()
    assert sampled_continuation_p_value(target, drafter, SAMPLES) > SIGNIFICANCE


def test_sampling_with_a_draft_sub_vocabulary_matches_the_exact_target_distribution():
    """Drafting among 3 of 5 tokens: the draft distribution is zero elsewhere; verification stays exact."""
    target, drafter = sampling_setup()
    drafter.set_draft_vocab([0, 2, 3])
    assert sampled_continuation_p_value(target, drafter, SAMPLES) > SIGNIFICANCE


@pytest.mark.parametrize("with_prompt", [False, True])
def test_greedy_with_a_draft_sub_vocabulary_is_identical_and_drafts_only_from_it(monkeypatch, with_prompt):
    target, successor = tiny_target("llama", successor_scale=SUCCESSOR_SCALE)
    drafter = tiny_drafter(target, "gated", successor)
    sub_vocab = torch.arange(0, VOCAB, 2)  # half of the tokens: the target often needs the other half
    drafter.set_draft_vocab(sub_vocab)
    drafter.config.extend_draft_vocab_with_prompt = with_prompt
    accepted = 0
    for i, ids in enumerate(prompts(6, seed=3)):
        spy = DraftSpy(drafter, monkeypatch)
        reference = target.generate(ids, do_sample=False, max_new_tokens=32)
        out = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=32)
        assert torch.equal(out, reference), f"prompt {i} diverged"
        accepted += sum(drafter.last_stats.accepted)
        # Drafts come from the sub-vocabulary, extended by this request's prompt tokens when configured.
        allowed = torch.zeros(VOCAB, dtype=torch.bool)
        allowed[sub_vocab] = True
        if with_prompt:
            allowed[ids[0]] = True
        drafted = torch.cat([tokens for _, tokens in spy.drafts])
        assert allowed[drafted].all()
        for _, call_out, _ in spy.calls:  # the reported scores exclude every other token
            for score in call_out.scores:
                assert torch.isinf(score[0, ~allowed]).all() and torch.isfinite(score[0, allowed]).all()
        monkeypatch.undo()
    assert accepted > 0


def test_greedy_with_a_draft_sub_vocabulary_under_inference_mode_is_identical():
    """Benchmarks generate under `torch.inference_mode`, whose tensors carry no version counter."""
    target, successor = tiny_target("llama", successor_scale=SUCCESSOR_SCALE)
    drafter = tiny_drafter(target, "gated", successor)
    with torch.inference_mode():
        drafter.set_draft_vocab(torch.arange(0, VOCAB, 2))
        for i, ids in enumerate(prompts(3, seed=4)):
            reference = target.generate(ids, do_sample=False, max_new_tokens=16)
            out = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=16)
            assert torch.equal(out, reference), f"prompt {i} diverged"


def test_sampling_test_catches_misreported_draft_logits(monkeypatch):
    """Negative control: a drafter reporting logits other than those it sampled from breaks losslessness."""
    target, drafter = sampling_setup()
    generate = drafter.generate

    def misreporting_generate(input_ids, **kwargs):
        out = generate(input_ids, **kwargs)
        out.scores = tuple(torch.zeros_like(s) for s in out.scores)  # claims uniform drafts
        return out

    monkeypatch.setattr(drafter, "generate", misreporting_generate)
    assert sampled_continuation_p_value(target, drafter, SAMPLES) < SIGNIFICANCE


@pytest.fixture
def llama_and_drafter():
    target, _ = tiny_target("llama", hidden=32)
    return target, tiny_drafter(target)


def test_batch_size_two_fails_before_generation(llama_and_drafter):
    target, drafter = llama_and_drafter
    forwards = ForwardCounter(target)
    ids = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="batch"):
        target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=8)
    with pytest.raises(ValueError, match="batch size 1"):
        drafter.generate(ids)
    assert forwards.count == 0


def test_verification_options_apply_inside_the_block_and_are_restored_even_on_error(llama_and_drafter):
    target, drafter = llama_and_drafter
    before = drafter.generation_config
    ids = torch.randint(0, VOCAB, (1, 6))
    with drafter.verification_options(num_assistant_tokens=2, num_assistant_tokens_schedule="constant"):
        target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=12)
        assert max(drafter.last_stats.drafted) <= 2 < drafter.config.block_size
    assert drafter.generation_config is before and before.num_assistant_tokens != 2
    with pytest.raises(RuntimeError, match="boom"), drafter.verification_options(record_confidence=True):
        raise RuntimeError("boom")
    assert drafter.generation_config is before and not getattr(before, "record_confidence", False)
    with pytest.raises(TypeError, match="confidence_treshold"):
        with drafter.verification_options(confidence_treshold=0.5):
            pass


def test_unattached_drafter_fails_before_generation(llama_and_drafter):
    target, drafter = llama_and_drafter
    drafter.detach_target()
    assert not target._forward_hooks and not target._forward_pre_hooks
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in target.model.layers)
    forwards = ForwardCounter(target)
    with pytest.raises(RuntimeError, match="attach_target"):
        target.generate(random_prompt(5, seed=0), assistant_model=drafter, do_sample=False, max_new_tokens=8)
    assert forwards.count == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(vocab_size=VOCAB + 1), "vocab_size: drafter"),
        (dict(hidden_size=48, num_attention_heads=4, head_dim=12), "hidden_size: drafter"),
        (dict(num_target_layers=8, target_layer_ids=[1, 6]), r"target_layer_ids \[1, 6\] are outside"),
        (dict(num_target_layers=8, target_layer_ids=[1, 2]), "num_target_layers: the drafter was built"),
    ],
)
def test_attach_rejects_a_mismatched_target(llama_and_drafter, overrides, message):
    target, _ = llama_and_drafter
    hooks = len(target._forward_hooks), len(target._forward_pre_hooks)
    config = DSparkConfig.from_target_config(target.config, num_hidden_layers=1, markov_rank=8, **overrides)
    with pytest.raises(ValueError, match=message):
        DSparkForCausalLM(config).attach_target(target)
    assert (len(target._forward_hooks), len(target._forward_pre_hooks)) == hooks


@pytest.mark.parametrize("version", ["5.22.2", "5.25.0", "6.0.0"])
def test_unsupported_transformers_versions_are_refused(version):
    with pytest.raises(RuntimeError, match=rf"transformers>=5.23,<5.25 .*found transformers {version}"):
        check_transformers_version(version)
    check_transformers_version("5.23.0")
    check_transformers_version()  # the installed version is supported


# ---- confidence scheduling and calibration recording -----------------------------------------------------


def with_cost(drafter, seconds_per_step, **options):
    """Scheduling on, with a hand-made target cost profile; other generation options set as given."""
    drafter.set_cost_profile(CostProfile(seconds_per_step=list(seconds_per_step)))
    drafter.generation_config.confidence_scheduling = True
    for name, value in options.items():
        setattr(drafter.generation_config, name, value)
    return drafter


def scheduled_length(confidences, seconds_per_step, threshold: float, limit: int) -> int:
    """The drafted length the causal rules give for calibrated confidences c_1..c_limit: stop before the first
    refusal of either the threshold (from position 2) or the scheduler; the first draft is always kept."""
    scheduler = CausalPrefixScheduler(seconds_per_step=seconds_per_step)
    for k, confidence in enumerate(confidences[:limit]):
        if not ((k == 0 or confidence >= threshold) and scheduler.admit_confidence(confidence)):
            return max(k, 1)
    return limit


SCHEDULED_SECONDS = [1.0 + 0.15 * b for b in range(BLOCK + 1)]  # T(B) = 1 + 0.15 (B - 1)


@pytest.mark.parametrize("kind, head", [("llama", "rnn"), ("qwen3", "gated")])
def test_greedy_with_confidence_scheduling_is_identical_and_follows_the_causal_rule(monkeypatch, kind, head):
    """Every round drafts exactly the length the causal scheduler (composed with a threshold on every other
    prompt) gives for the teacher-forced calibrated confidences; greedy outputs stay the target's own."""
    target, successor = tiny_target(kind, successor_scale=SUCCESSOR_SCALE)
    drafter = with_cost(tiny_drafter(target, head, successor), SCHEDULED_SECONDS)
    temperatures = [1.0, 0.8, 1.3, 1.0, 2.0]
    drafter.config.confidence_temperatures = temperatures
    with torch.no_grad():
        drafter.confidence_head.proj.weight.normal_(0.0, 0.3)
    spy = DraftSpy(drafter, monkeypatch)
    lengths = set()
    for i, ids in enumerate(prompts(8, seed=11)):
        threshold = 0.45 * (i % 2)
        drafter.generation_config.confidence_threshold = threshold
        spy.calls.clear()
        out = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=40)
        assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=40)), f"prompt {i}"
        with torch.no_grad():
            features = target_features(target, out)
            for input_ids, draft, kwargs in spy.calls[1:]:
                drafted, reference = teacher_forced_block(drafter, out, features, input_ids, draft)
                confidences = torch.sigmoid(reference.confidence_logits[0] / torch.tensor(temperatures))
                limit = min(kwargs["max_new_tokens"], BLOCK)
                expected = scheduled_length(confidences.tolist(), SCHEDULED_SECONDS, threshold, limit)
                assert len(drafted) == expected
                if limit == BLOCK:
                    lengths.add(len(drafted))
    assert len(lengths) >= 3, f"the scheduler should vary the block length, got only {lengths}"


def logit(probability: float) -> float:
    return math.log(probability / (1 - probability))


def test_scheduling_never_looks_at_the_next_confidence(monkeypatch):
    """Appendix A's case in the drafter: SPS(1..3) = 1, 0.5, 0.42 (a profile covering two drafts at most) and
    c_1 = 0.8. Verifying x_1 alone lowers the throughput (1.8 x 0.5 < 1), so the causal scheduler refuses it
    whatever c_2 is; a search that also saw a_2 would verify both drafts when c_2 = 0.9 ((1 + 0.8 + 0.72) x
    0.42 > 1) and none when c_2 = 0.55 ((1 + 0.8 + 0.44) x 0.42 < 1). The drafter must not tell them apart:
    it offers x_1 alone (assisted generation cannot verify an empty draft) in both cases."""
    target, successor = tiny_target("llama", successor_scale=SUCCESSOR_SCALE)
    sps = [1.0, 0.5, 0.42]
    drafter = with_cost(tiny_drafter(target, "vanilla", successor), [1 / s for s in sps])
    with torch.no_grad():  # every confidence logit is logit(c_1); the temperatures then set each c_k
        drafter.confidence_head.proj.weight.zero_()
        drafter.confidence_head.proj.bias.fill_(logit(0.8))
    spy = DraftSpy(drafter, monkeypatch)
    ids = random_prompt(12, seed=4)
    reference = target.generate(ids, do_sample=False, max_new_tokens=24)
    drafted, retrospective = [], []
    for c_2 in (0.9, 0.55):
        drafter.config.confidence_temperatures = [1.0, logit(0.8) / logit(c_2), 1.0, 1.0, 1.0]
        survival = [0.8, 0.8 * c_2]
        retrospective.append(max(range(3), key=lambda n: (1 + sum(survival[:n])) * sps[n]))
        spy.calls.clear()
        out = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=24)
        assert torch.equal(out, reference)
        drafted.append([len(tokens) for _, tokens in spy.drafts])
    assert retrospective == [2, 0]
    assert drafted[0] == drafted[1] and set(drafted[0]) == {1}


def test_sampling_with_confidence_scheduling_matches_the_exact_target_distribution(monkeypatch):
    target, drafter = sampling_setup()
    with torch.no_grad():  # confidences that depend on the previous token only, strongly
        weight = drafter.confidence_head.proj.weight
        weight.zero_()
        weight[:, drafter.config.hidden_size :].normal_(0.0, 1.5)
        drafter.confidence_head.proj.bias.fill_(1.0)
    with_cost(drafter, [1.0, 1.25, 1.5, 1.75])
    spy = DraftSpy(drafter, monkeypatch)
    assert sampled_continuation_p_value(target, drafter, SAMPLES) > SIGNIFICANCE
    full = [
        len(tokens)
        for (_, _, kwargs), (_, tokens) in zip(spy.calls, spy.drafts)
        if kwargs["max_new_tokens"] >= 3
    ]
    assert {1, 2, 3} <= set(full), "the scheduler should end blocks at every length"


def test_recorded_confidences_are_the_raw_logits_of_the_verified_drafts(monkeypatch):
    """With `record_confidence`, each round keeps the raw (uncalibrated) confidence logits of exactly the
    drafts it verified, even when a threshold cuts blocks; `calibration_rounds` pairs them with the accepted
    length."""
    target, successor = tiny_target("qwen3", successor_scale=SUCCESSOR_SCALE)
    drafter = tiny_drafter(target, "rnn", successor)
    drafter.config.confidence_temperatures = [1.0, 0.8, 1.3, 1.0, 2.0]
    drafter.generation_config.confidence_threshold = 0.5
    drafter.generation_config.record_confidence = True
    with torch.no_grad():
        drafter.confidence_head.proj.weight.normal_(0.0, 0.2)
    spy = DraftSpy(drafter, monkeypatch)
    out = target.generate(
        random_prompt(12, seed=7), assistant_model=drafter, do_sample=False, max_new_tokens=48
    )
    stats = drafter.last_stats
    assert [len(logits) for logits in stats.confidence_logits] == stats.drafted
    assert len(spy.calls) - 1 == sum(d > 0 for d in stats.drafted)
    assert any(0 < d < BLOCK for d in stats.drafted[:-2]), "the threshold should cut some blocks"
    with torch.no_grad():
        features = target_features(target, out)
        # Drafting call i + 1 made the drafts of verification round i (call 0 drafts before the prefill).
        for (input_ids, draft, _), logits in zip(spy.calls[1:], stats.confidence_logits):
            drafted, reference = teacher_forced_block(drafter, out, features, input_ids, draft)
            torch.testing.assert_close(
                torch.tensor(logits), reference.confidence_logits[0, : len(drafted)], atol=1e-4, rtol=1e-4
            )
    rounds = stats.calibration_rounds()
    expected = [(logits, a) for logits, a in zip(stats.confidence_logits, stats.accepted) if logits]
    assert [(r.confidence_logits.tolist(), r.accepted_length) for r in rounds] == expected

    drafter.generation_config.record_confidence = False
    target.generate(random_prompt(10, seed=2), assistant_model=drafter, do_sample=False, max_new_tokens=8)
    assert drafter.last_stats.confidence_logits is None
    with pytest.raises(ValueError, match="record_confidence"):
        drafter.last_stats.calibration_rounds()


def test_record_calibration_rounds_verifies_full_blocks_and_restores_the_options():
    target, successor = tiny_target("llama", successor_scale=SUCCESSOR_SCALE)
    drafter = with_cost(
        tiny_drafter(target, "vanilla", successor), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], confidence_threshold=0.9
    )
    drafter.generation_config.num_assistant_tokens = 2
    options = drafter.generation_config
    inputs = [random_prompt(8, seed=1), random_prompt(15, seed=2)]
    rounds = record_calibration_rounds(target, drafter, inputs, max_new_tokens=30, show_progress=False)

    assert drafter.generation_config is options
    assert options.confidence_scheduling and options.num_assistant_tokens == 2
    assert not getattr(options, "record_confidence", False)
    stats = drafter.last_stats  # of the last prompt: every block was full until the length limit bound
    assert stats.drafted[: -BLOCK - 1] == [BLOCK] * (stats.rounds - BLOCK - 1)
    assert len(rounds) > 2 * 30 // (BLOCK + 1)
    assert all(0 <= r.accepted_length <= len(r.confidence_logits) <= BLOCK for r in rounds)
    assert sum(r.accepted_length for r in rounds) > 0


def test_scheduling_options_are_validated(llama_and_drafter):
    target, drafter = llama_and_drafter
    ids = random_prompt(6, seed=0)
    drafter.generation_config.confidence_scheduling = True
    with pytest.raises(ValueError, match="cost profile"):
        target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=4)
    headless = make_tiny_drafter(
        target, target_layer_ids=LAYER_IDS, enable_confidence_head=False
    ).attach_target(target)
    headless.set_cost_profile(CostProfile(seconds_per_step=[1.0, 1.1]))
    for option in ("confidence_scheduling", "record_confidence"):
        setattr(headless.generation_config, option, True)
        with pytest.raises(ValueError, match="confidence head"):
            target.generate(ids, assistant_model=headless, do_sample=False, max_new_tokens=4)
        setattr(headless.generation_config, option, False)


def test_cost_profile_is_saved_with_the_drafter_and_not_exported(tmp_path, llama_and_drafter):
    _, drafter = llama_and_drafter
    assert drafter.cost_profile is None
    profile = CostProfile(
        seconds_per_step=[0.01, 0.012, 0.015], context_length=64, metadata={"dtype": "float32"}
    )
    drafter.set_cost_profile(profile.save(tmp_path / "cost.json"))  # from the JSON file
    assert drafter.cost_profile == profile
    drafter.save_pretrained(tmp_path / "drafter")
    assert DSparkForCausalLM.from_pretrained(tmp_path / "drafter").cost_profile == profile
    assert "target_cost_profile" not in deepspec_config_dict(drafter.config)
    drafter.set_cost_profile(None)
    assert drafter.cost_profile is None
    with pytest.raises(ValueError, match="target_cost_profile"):
        DSparkConfig(
            num_target_layers=4, target_layer_ids=[1], target_cost_profile={"seconds_per_step": [0.0]}
        )


# ---- drafts from the context, stepping aside ------------------------------------------------------------


def test_lookup_finds_the_continuation_of_the_longest_recent_match():
    sequence = torch.tensor([5, 6, 7, 8, 9, 1, 2, 3, 7, 4, 0, 6, 7])
    found = lookup_continuation(sequence, max_ngram=3, min_ngram=1, num_tokens=4)
    assert found.ngram == 2 and found.tokens.tolist() == [8, 9, 1, 2]  # "6 7" beats the later "7"
    found = lookup_continuation(sequence, max_ngram=1, min_ngram=1, num_tokens=2)
    assert found.ngram == 1 and found.tokens.tolist() == [4, 0]  # the most recent "7"
    repeating = torch.tensor([1, 2, 3, 1, 2, 3, 1, 2])
    assert lookup_continuation(repeating, 3, 1, 5).tokens.tolist() == [3, 1, 2]  # up to the sequence's end
    assert lookup_continuation(torch.tensor([1, 2, 3]), 3, 2, 5).tokens.numel() == 0
    assert lookup_continuation(torch.tensor([4]), 3, 1, 5).tokens.numel() == 0


def test_one_hot_logits_are_a_deterministic_proposal():
    logits = one_hot_logits(torch.tensor([3, 0]), 5)
    assert torch.equal(logits.softmax(-1), torch.eye(5)[[3, 0]])


def repeating_prompt(seed: int) -> torch.Tensor:
    """A prompt that repeats a random phrase, so lookup drafts find matches."""
    phrase = random_prompt(6, seed)
    return torch.cat([phrase, random_prompt(3, seed + 100), phrase[:, :4]], dim=1)


def count_block_forwards(drafter, monkeypatch) -> list[int]:
    calls = [0]
    block_forward = drafter._block_forward

    def counting(*args, **kwargs):
        calls[0] += 1
        return block_forward(*args, **kwargs)

    monkeypatch.setattr(drafter, "_block_forward", counting)
    return calls


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "options",
    [
        dict(lookup_drafting=True, lookup_policy="longest_match"),
        dict(lookup_drafting=True, lookup_policy="expected_rate"),
        dict(lookup_drafting=True, step_aside=True, lookup_min_ngram=2),
        dict(step_aside=True, confidence_scheduling=True),
    ],
)
def test_greedy_with_lookup_and_stepping_aside_is_token_identical(kind, options):
    target, successor = tiny_target(kind, successor_scale=SUCCESSOR_SCALE)
    drafter = tiny_drafter(target, "gated", successor)
    drafter.set_cost_profile(CostProfile([1.0, 1.1, 1.2, 1.3, 1.4, 1.5]))
    for name, value in options.items():
        setattr(drafter.generation_config, name, value)
    sources = set()
    for i in range(6):
        ids = repeating_prompt(i) if i % 2 else prompts(6)[i]
        reference = target.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
        out = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=NEW_TOKENS)
        assert torch.equal(out, reference), f"prompt {i} diverged"
        stats = drafter.last_stats
        assert len(stats.sources) == stats.rounds
        per_source = stats.by_source()
        assert sum(s.rounds for s in per_source.values()) == stats.rounds
        assert sum(s.accepted for s in per_source.values()) == sum(stats.accepted)
        assert per_source.get("plain", SourceStats("plain")).drafted == 0
        sources |= set(per_source)
    assert "dspark" in sources
    assert ("lookup" in sources) == bool(options.get("lookup_drafting"))


def test_stepping_aside_skips_an_untrained_drafter_and_catches_up(monkeypatch):
    """An untrained drafter (tau ~1) steps aside: far fewer drafter forwards, identical output, and when it
    drafts again its context holds exactly the target's features of every position before the anchor."""
    target, _ = tiny_target("llama")
    drafter = tiny_drafter(target, "vanilla")
    drafter.set_cost_profile(CostProfile([1.0, 1.1, 1.2, 1.3, 1.4, 1.5]))
    pushed = []
    backbone = drafter.backbone

    def recording_backbone(input_ids, target_hidden_states, position_ids, **kwargs):
        pushed.append((target_hidden_states, position_ids[0, : target_hidden_states.shape[1]]))
        return backbone(input_ids, target_hidden_states, position_ids, **kwargs)

    monkeypatch.setattr(drafter, "backbone", recording_backbone)
    ids = random_prompt(10, seed=3)
    reference = target.generate(ids, do_sample=False, max_new_tokens=120)
    out = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=120)
    always = drafter.last_stats
    pushed.clear()
    drafter.generation_config.step_aside = True
    calls = count_block_forwards(drafter, monkeypatch)
    stepping = target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=120)
    assert torch.equal(out, reference) and torch.equal(stepping, reference)
    stats = drafter.last_stats
    per_source = stats.by_source()
    assert always.tau < 1.2
    assert calls[0] == per_source["dspark"].rounds + 1  # the prefill round drafts too
    assert calls[0] <= 8 < per_source["plain"].rounds
    # The prompt's context is reused from the first generation; the rest is pushed once, without a gap.
    positions = torch.cat([p for _, p in pushed])
    first, last = ids.shape[1], drafter._draft_context.end
    assert torch.equal(positions, torch.arange(first, last))
    assert max(p.numel() for _, p in pushed) >= 16  # a probe caught up on the plain steps before it
    with torch.no_grad():
        expected = target_features(target, stepping)[:, first:last]
    torch.testing.assert_close(torch.cat([f for f, _ in pushed], dim=1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        dict(lookup_drafting=True, lookup_policy="longest_match"),
        dict(step_aside=True, lookup_drafting=True, lookup_min_ngram=2),
    ],
)
def test_sampling_with_lookup_drafts_matches_the_exact_target_distribution(monkeypatch, options):
    """Lookup drafts (and under stepping aside, plain steps' one-token guesses) are one-hot proposals."""
    target, drafter = sampling_setup()
    drafter.set_cost_profile(CostProfile([1.0, 1.05, 1.1, 1.15]))
    for name, value in options.items():
        setattr(drafter.generation_config, name, value)
    spy = DraftSpy(drafter, monkeypatch)
    assert sampled_continuation_p_value(target, drafter, SAMPLES) > SIGNIFICANCE
    lookup_rounds = [
        out
        for input_ids, out, _ in spy.calls
        if out.sequences.shape[1] > input_ids.shape[1] and bool((out.scores[0] == 0).sum() == 1)
    ]
    assert len(lookup_rounds) > SAMPLES // 8, "one-hot drafts should be verified in many samples"


def test_host_reads_per_drafting_round_do_not_grow_with_the_block(monkeypatch):
    """On an accelerator every host read waits for the device: count them per drafting call, as if the
    drafter ran there, with EOS, a confidence threshold and recorded confidences."""
    reads = [0]
    for name in ("item", "__int__", "__bool__", "__float__", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            reads[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def reads_per_round(block_size: int) -> list[int]:
        target, successor = tiny_target("llama", successor_scale=SUCCESSOR_SCALE)
        target.generation_config.eos_token_id = 7
        drafter = tiny_drafter(target, "vanilla", successor, block_size=block_size)
        drafter.config.confidence_temperatures = [1.0] * block_size
        drafter.generation_config.confidence_threshold = 0.01
        drafter.generation_config.record_confidence = True
        monkeypatch.setattr(drafter, "_reads_are_free", lambda device: False)
        generate, counts = drafter.generate, []

        def counted(*args, **kwargs):
            before = reads[0]
            out = generate(*args, **kwargs)
            counts.append(reads[0] - before)
            return out

        monkeypatch.setattr(drafter, "generate", counted)
        target.generate(random_prompt(8, seed=4), assistant_model=drafter, do_sample=False, max_new_tokens=40)
        return counts[1:]

    small, large = reads_per_round(3), reads_per_round(12)
    assert max(large) <= max(small) <= 12


def test_cost_profile_of_another_device_type_is_refused(llama_and_drafter):
    target, drafter = llama_and_drafter
    drafter.set_cost_profile(CostProfile([1.0, 1.1], metadata={"device": "cuda:0"}))
    drafter.generation_config.step_aside = True
    with pytest.raises(ValueError, match="measured on cuda"):
        target.generate(random_prompt(4, seed=0), assistant_model=drafter, max_new_tokens=4)
