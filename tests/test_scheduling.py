"""Tests of confidence-scheduled verification: schedulers, cost profile, STS calibration and metrics."""

import itertools
import math
from fractions import Fraction

import pytest
import torch
from conftest import make_tiny_drafter, make_tiny_target

from dspark_hf.scheduling.calibration import (
    CalibrationRound,
    apply_temperatures,
    auroc,
    brier_score,
    calibrate_sts,
    calibration_report,
    expected_calibration_error,
    format_calibration_table,
    reliability_diagram,
    survival_outcomes,
    survival_probabilities,
)
from dspark_hf.scheduling.cost_profile import CostProfile, profile_cost
from dspark_hf.scheduling.schedulers import CausalPrefixScheduler, prefix_schedule

# ---------------------------------------------------------------------------------------------------------
# Appendix A: the early stop is what keeps scheduling lossless
# ---------------------------------------------------------------------------------------------------------

A, B = 0, 1
P_TARGET = (Fraction(7, 10), Fraction(3, 10))
P_DRAFT = (Fraction(1, 2), Fraction(1, 2))
SURVIVAL_1 = 0.8  # a_1 = c_1, known before x_1 is drafted
CONFIDENCE_2 = {A: 0.9, B: 0.0}  # c_2 depends on the drafted x_1
SPS = [1.0, 0.5, 0.45]  # target steps per second at 1, 2, 3 tokens (gamma = 2)


def first_token_distribution(verified_length) -> tuple[Fraction, Fraction]:
    """Exact distribution of the first emitted token when `verified_length(survival)` drafts are verified.

    x_1 ~ p_d; the scheduler sees a = (a_1, a_1 c_2(x_1)). Verifying 0 drafts means the target forward over
    the anchor alone emits a target sample. Otherwise x_1 is accepted with min(1, p_t / p_d) and emitted, or
    rejected and replaced by a sample of norm(max(0, p_t - p_d)); later drafts (and the bonus token) only
    affect later tokens, so x_2 need not be enumerated.
    """
    residual = [max(Fraction(0), t - d) for t, d in zip(P_TARGET, P_DRAFT)]
    residual = [r / sum(residual) for r in residual]
    distribution = [Fraction(0), Fraction(0)]
    for x1 in (A, B):
        weight = P_DRAFT[x1]
        if verified_length((SURVIVAL_1, SURVIVAL_1 * CONFIDENCE_2[x1])) == 0:
            for token in (A, B):
                distribution[token] += weight * P_TARGET[token]
            continue
        accept = min(Fraction(1), P_TARGET[x1] / P_DRAFT[x1])
        distribution[x1] += weight * accept
        for token in (A, B):
            distribution[token] += weight * (1 - accept) * residual[token]
    return tuple(distribution)


def causal_length(survival) -> int:
    """The drafter's loop: a_j is offered only once drafts 1..j-1 were admitted."""
    scheduler = CausalPrefixScheduler(SPS)
    length = 0
    for a in survival:
        if not scheduler.admit(a):
            break
        length += 1
    return length


def expected_throughput(survival, length) -> float:
    return (1 + sum(survival[:length])) * SPS[length]


def retrospective_length(survival) -> int:
    """No early stop: the length maximising Theta once every a_j (hence x_1) is known."""
    return max(range(len(survival) + 1), key=lambda length: expected_throughput(survival, length))


def test_appendix_a_theta_values():
    after_a, after_b = (0.8, 0.72), (0.8, 0.0)
    # Theta(0) = 1 x 1.0; Theta(1) = 1.8 x 0.5; Theta(2) = 2.52 x 0.45 after A, 1.8 x 0.45 after B.
    assert [expected_throughput(after_a, n) for n in range(3)] == pytest.approx([1.0, 0.9, 1.134])
    assert [expected_throughput(after_b, n) for n in range(3)] == pytest.approx([1.0, 0.9, 0.81])
    assert (retrospective_length(after_a), retrospective_length(after_b)) == (2, 0)
    # Admitting x_1 alone lowers Theta (0.9 < 1.0), so the causal rule stops at 0 whatever x_1 is.
    assert (causal_length(after_a), causal_length(after_b)) == (0, 0)
    assert prefix_schedule([after_a, after_b], [1.0, 1.0, 1.0, 1.0, 1.0]).tolist() == [2, 1]
    assert prefix_schedule([after_a], SPS).tolist() == [0]
    assert prefix_schedule([after_b], SPS).tolist() == [0]


def test_appendix_a_causal_scheduler_is_lossless_retrospective_is_not():
    assert first_token_distribution(lambda survival: 2) == P_TARGET  # the verifier itself is exact
    assert first_token_distribution(causal_length) == P_TARGET
    assert first_token_distribution(lambda s: int(prefix_schedule([s], SPS)[0])) == P_TARGET
    # Retrospective: x_1 = A (prob 1/2) is verified and always accepted (0.7 / 0.5 >= 1); x_1 = B verifies
    # nothing and emits a target sample: P(A) = 1/2 + 1/2 x 7/10 = 17/20, P(B) = 1/2 x 3/10 = 3/20.
    assert first_token_distribution(retrospective_length) == (Fraction(17, 20), Fraction(3, 20))


# ---------------------------------------------------------------------------------------------------------
# prefix_schedule (Algorithm 1) and the causal batch-1 rule
# ---------------------------------------------------------------------------------------------------------


def linear_seconds(slope: float, max_tokens: int = 64) -> list[float]:
    """T(B) = 1 + slope (B - 1): the target gets slower per extra verified token as `slope` grows."""
    return [1 + slope * (b - 1) for b in range(1, max_tokens + 1)]


def random_survival(generator: torch.Generator, requests: int, positions: int) -> torch.Tensor:
    return torch.cumprod(torch.rand(requests, positions, generator=generator, dtype=torch.float64) ** 0.3, 1)


def test_prefix_schedule_hand_computed_batch():
    # T(B) = 1.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5 s; start B = 2, tau* = 2, Theta = 2 / 1.0 = 2.
    seconds = [1.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    # Admit 0.9 -> 2.9 / 1.1 = 2.636; 0.8 -> 3.7 / 1.2 = 3.083; 0.6 -> 4.3 / 1.3 = 3.308;
    # 0.3 -> 4.6 / 1.4 = 3.286 does not improve: stop (0.2 is never reached).
    ragged = [[0.9, 0.6, 0.3], [0.8, 0.2]]
    padded = torch.tensor([[0.9, 0.6, 0.3], [0.8, 0.2, 0.0]])
    assert prefix_schedule(ragged, seconds_per_step=seconds).tolist() == [2, 1]
    assert prefix_schedule(padded, seconds_per_step=seconds).tolist() == [2, 1]
    # The same curve in every accepted form.
    sps = [1 / s for s in seconds]
    profile = CostProfile(seconds_per_step=seconds)
    assert prefix_schedule(ragged, sps).tolist() == [2, 1]
    assert prefix_schedule(ragged, lambda b: sps[b - 1]).tolist() == [2, 1]
    assert prefix_schedule(ragged, seconds_per_step=lambda b: seconds[b - 1]).tolist() == [2, 1]
    assert prefix_schedule(ragged, profile).tolist() == [2, 1]
    assert prefix_schedule(ragged, seconds_per_step=profile).tolist() == [2, 1]


def test_prefix_schedule_ties_take_lower_positions_first():
    # tau* after k admissions = 2 + k / 2: Theta = 2, 2.5 / 1.2 = 2.08, 3 / 1.4 = 2.14, then 3.5 / 1.8 = 1.94
    # stops after two admissions, which must be the first draft of each request, not both drafts of request 0.
    seconds = [1.0, 1.0, 1.2, 1.4, 1.8]
    assert prefix_schedule([[0.5, 0.5], [0.5, 0.5]], seconds_per_step=seconds).tolist() == [1, 1]


def test_prefix_schedule_admits_a_global_top_that_is_a_prefix_of_every_row():
    generator = torch.Generator().manual_seed(0)
    for slope in (0.02, 0.1, 0.3):
        survival = random_survival(generator, 5, 6)
        survival[1, 3:] = 0.0  # a row whose later drafts cannot survive
        lengths = prefix_schedule(survival, seconds_per_step=linear_seconds(slope))
        admitted = torch.arange(6) < lengths[:, None]
        assert 0 < int(lengths.sum()) < 30 and int(lengths[1]) <= 3
        assert float(survival[admitted].min()) >= float(survival[~admitted].max())


def test_prefix_schedule_respects_the_curve_budget_and_validates_input():
    survival = [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert prefix_schedule(survival, [1.0] * 4).tolist() == [1, 1]  # 4 tokens = 2 anchors + 2 drafts
    assert prefix_schedule(survival, lambda b: 1.0).tolist() == [3, 3]
    assert prefix_schedule([], [1.0]).tolist() == []
    with pytest.raises(ValueError, match="non-increasing"):
        prefix_schedule([[0.5, 0.6]], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prefix_schedule([[1.5]], [1.0, 1.0])
    with pytest.raises(ValueError, match="exactly one"):
        prefix_schedule([[0.5]], [1.0, 1.0], seconds_per_step=[1.0, 1.0])
    with pytest.raises(ValueError, match="exactly one"):
        prefix_schedule([[0.5]])
    with pytest.raises(ValueError, match="anchors"):
        prefix_schedule([[0.5], [0.5], [0.5]], [1.0, 1.0])


def brute_force_best(survival: torch.Tensor, sps: list[float]) -> float:
    """max over every length vector of Theta(l) = (R + sum_r sum_{j<l_r} a_{r,j}) x SPS(R + sum_r l_r)."""
    requests, positions = survival.shape
    best = -math.inf
    for lengths in itertools.product(range(positions + 1), repeat=requests):
        expected = requests + sum(float(survival[r, :n].sum()) for r, n in enumerate(lengths))
        best = max(best, expected * sps[requests + sum(lengths) - 1])
    return best


def greedy_path(survival: torch.Tensor, sps: list[float]) -> list[float]:
    """Theta after admitting the top 0, 1, 2, ... survivals (the path Algorithm 1 walks)."""
    requests = survival.shape[0]
    ordered = sorted(survival.flatten().tolist(), reverse=True)
    return [(requests + sum(ordered[:n])) * sps[requests + n - 1] for n in range(len(ordered) + 1)]


def is_unimodal(values: list[float]) -> bool:
    peak = max(range(len(values)), key=values.__getitem__)
    rising = all(a < b for a, b in zip(values[:peak], values[1 : peak + 1]))
    return rising and all(a >= b for a, b in zip(values[peak:], values[peak + 1 :]))


def test_prefix_schedule_matches_brute_force_when_theta_is_unimodal():
    generator = torch.Generator().manual_seed(1)
    curves = [linear_seconds(s, 12) for s in (0.05, 0.2, 0.5)] + [[1 + 0.03 * b * b for b in range(1, 13)]]
    curves.append([1.0] * 4 + [1.6] * 4 + [2.0] * 4)  # a staircase (padded kernels) can make Theta rise again
    checked = skipped = 0
    for _ in range(12):
        for seconds in curves:
            survival = random_survival(generator, 3, 3)
            sps = [1 / s for s in seconds]
            path = greedy_path(survival, sps)
            achieved = path[int(prefix_schedule(survival, sps).sum())]
            best = brute_force_best(survival, sps)
            if is_unimodal(path):
                assert achieved == pytest.approx(best, rel=1e-12)
                checked += 1
            else:
                assert achieved <= best
                skipped += 1
    assert checked >= 30 and skipped >= 1
    # Off the unimodal case the early stop forgoes a later peak: that is the price of losslessness.
    appendix_a = torch.tensor([[0.8, 0.72]], dtype=torch.float64)
    assert not is_unimodal(greedy_path(appendix_a, SPS))
    assert brute_force_best(appendix_a, SPS) == pytest.approx(1.134)
    assert prefix_schedule(appendix_a, SPS).tolist() == [0]


def test_prefix_schedule_is_load_adaptive():
    survival = random_survival(torch.Generator().manual_seed(2), 4, 6)
    totals = [
        int(prefix_schedule(survival, seconds_per_step=linear_seconds(s)).sum())
        for s in (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)
    ]
    assert totals[0] == 24 and totals[-1] == 0
    assert all(a >= b for a, b in zip(totals, totals[1:]))
    assert len(set(totals)) >= 4


def test_causal_scheduler_equals_prefix_schedule_for_one_request():
    generator = torch.Generator().manual_seed(3)
    for slope in (0.01, 0.05, 0.2, 0.6):
        seconds = linear_seconds(slope, 6)  # also a budget: at most 5 drafts
        for _ in range(10):
            survival = random_survival(generator, 1, 7)[0]
            scheduler = CausalPrefixScheduler(seconds_per_step=seconds)
            length = next((j for j, a in enumerate(survival.tolist()) if not scheduler.admit(a)), 7)
            assert length == int(prefix_schedule(survival[None], seconds_per_step=seconds)[0])
            assert scheduler.length == length
            assert scheduler.expected_tokens == pytest.approx(1 + float(survival[:length].sum()))


def test_causal_scheduler_keeps_refusing_until_reset():
    scheduler = CausalPrefixScheduler(lambda b: 1.0)  # flat cost: every surviving draft pays
    assert scheduler.admit_confidence(0.9) and scheduler.admit_confidence(0.8)
    assert scheduler.survival == pytest.approx(0.72)
    assert scheduler.expected_tokens == pytest.approx(1 + 0.9 + 0.72)
    assert not scheduler.admit(0.0)  # a draft that cannot survive ends the block
    assert not scheduler.admit(0.5)  # ... and so does anything offered afterwards
    scheduler.reset()
    assert scheduler.length == 0 and scheduler.admit(0.5)
    with pytest.raises(ValueError):
        scheduler.admit(1.5)


# ---------------------------------------------------------------------------------------------------------
# Sequential Temperature Scaling
# ---------------------------------------------------------------------------------------------------------


def synthetic_rounds(num_rounds: int, seed: int, overconfidence: float = 3.0, block_size: int = 4):
    """Rounds whose true conditional acceptance is sigmoid(u_k) while the head reports logits 3 u_k."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = 1.0 + 1.5 * torch.randn(num_rounds, block_size, generator=generator, dtype=torch.float64)
    survives = (
        torch.rand(num_rounds, block_size, generator=generator, dtype=torch.float64) < true_logits.sigmoid()
    )
    accepted = torch.cumprod(survives.long(), dim=1).sum(1)
    return [CalibrationRound(overconfidence * true_logits[i], int(accepted[i])) for i in range(num_rounds)]


def conditional_auroc(rounds, temperatures, position: int) -> float:
    """AUROC of c_k among rounds that accepted drafts 1..k-1: the ranking STS must not change."""
    scores, labels = [], []
    for logits, accepted in rounds:
        if accepted >= position - 1:
            scores.append(float(torch.sigmoid(logits[position - 1] / temperatures[position - 1])))
            labels.append(accepted >= position)
    return auroc(scores, labels)


def test_sts_lowers_ece_and_preserves_ranking():
    calibration, held_out = synthetic_rounds(3000, seed=0), synthetic_rounds(3000, seed=1)
    temperatures = calibrate_sts(calibration)
    assert len(temperatures) == 4 and 2.0 < temperatures[0] < 4.5
    before = calibration_report(held_out)
    after = calibration_report(held_out, temperatures)
    for raw, calibrated in zip(before, after):
        assert raw["count"] == calibrated["count"] == 3000
        assert raw["ece"] > 0.1 and calibrated["ece"] < min(0.04, raw["ece"] / 4)
        assert calibrated["ece"] < raw["ece"] and calibrated["brier"] < raw["brier"]
    assert after[0]["auroc"] == pytest.approx(before[0]["auroc"], abs=1e-12)
    identity = [1.0] * 4
    for position in range(1, 5):
        assert conditional_auroc(held_out, temperatures, position) == pytest.approx(
            conditional_auroc(held_out, identity, position), abs=1e-12
        )


def test_sts_keeps_identity_on_calibrated_data_and_pads_positions():
    rounds = synthetic_rounds(2000, seed=2, overconfidence=1.0, block_size=2)
    temperatures = calibrate_sts(rounds, num_positions=5)
    assert len(temperatures) == 5 and temperatures[2:] == [1.0, 1.0, 1.0]
    assert all(0.7 < t < 1.4 for t in temperatures[:2])
    assert calibrate_sts([([0.3, 0.2], 0)] * 10, grid=[1.0])[0] == 1.0  # plain tuples work
    with pytest.raises(ValueError, match="outside"):
        calibrate_sts([([0.3], 2)])
    with pytest.raises(ValueError, match="positive"):
        calibrate_sts(rounds, grid=[0.0, 1.0])


def test_apply_temperatures_and_survival_probabilities():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert torch.equal(apply_temperatures(logits, None), logits)
    assert torch.allclose(apply_temperatures(logits, [2.0, 0.5, 1.0, 9.0]), torch.tensor([[1.0, -2.0, 0.5]]))
    expected = torch.cumprod(torch.sigmoid(torch.tensor([[1.0, -2.0, 0.5]])), dim=-1)
    assert torch.allclose(survival_probabilities(logits, [2.0, 0.5, 1.0]), expected)
    one_position = apply_temperatures(logits[:, 1:2], [2.0, 0.5, 1.0], start=1)
    assert torch.allclose(one_position, torch.tensor([[-2.0]]))
    with pytest.raises(ValueError, match="positions 1..3"):
        apply_temperatures(logits, [1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        apply_temperatures(logits, [1.0, -1.0, 1.0])


# ---------------------------------------------------------------------------------------------------------
# Metrics against hand computations
# ---------------------------------------------------------------------------------------------------------

PROBS = [0.1, 0.15, 0.8, 0.9, 1.0]
LABELS = [0, 1, 1, 0, 1]


def test_expected_calibration_error_by_hand():
    # Bins of width 0.1: {0.1, 0.15} -> |0.25 - 1| = 0.75; {0.8} -> |0.8 - 1| = 0.2;
    # {0.9, 1.0} (1.0 falls in the last bin) -> |1.9 - 1| = 0.9.
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx((0.75 + 0.2 + 0.9) / 5)
    assert expected_calibration_error(PROBS, LABELS, n_bins=1) == pytest.approx(abs(2.95 - 3) / 5)
    assert expected_calibration_error([0.3, 0.3], [True, False]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [0, 1])


def test_brier_score_by_hand():
    assert brier_score(PROBS, LABELS) == pytest.approx((0.01 + 0.7225 + 0.04 + 0.81 + 0.0) / 5)


def test_auroc_by_hand_with_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # Positives {0.5, 0.9} vs negatives {0.5, 0.5}: two ties (1/2 each) and two wins -> 3 / 4.
    assert auroc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.75)
    assert math.isnan(auroc([0.2, 0.3], [1, 1]))
    generator = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 5, (60,), generator=generator).double()
    labels = torch.rand(60, generator=generator) < 0.4
    positives, negatives = scores[labels], scores[~labels]
    pairs = (positives[:, None] > negatives[None]).double() + 0.5 * (positives[:, None] == negatives[None])
    assert auroc(scores, labels) == pytest.approx(float(pairs.mean()))


def test_reliability_diagram_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = reliability_diagram({"raw": PROBS, "STS": [0.2, 0.5, 0.7, 0.4, 0.8]}, LABELS, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------
# Target cost profile
# ---------------------------------------------------------------------------------------------------------


def test_profile_cost_on_a_tiny_model_and_json_round_trip(tmp_path):
    target = make_tiny_target(
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64
    ).train()
    seen = []

    def record(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((ids.shape[1], cache.get_seq_length()))

    target.register_forward_pre_hook(record, with_kwargs=True)
    profile = profile_cost(target, max_tokens=3, context_length=8, warmup=1, repeats=1, show_progress=False)

    # One prefill, then every timed forward of 1..3 tokens starts from the same 8-token cache.
    assert seen == [(8, 0)] + [(1, 8), (2, 8), (3, 8)] * 2
    assert target.training
    assert profile.max_tokens == 3 and profile.context_length == 8
    assert all(a <= b for a, b in zip(profile.seconds_per_step, profile.seconds_per_step[1:]))
    assert profile.sps(2) == pytest.approx(1 / profile.seconds_per_step[1])
    assert {"platform", "torch_threads", "dtype", "date"} <= profile.metadata.keys()
    assert profile.metadata["dtype"] == "float32"
    with pytest.raises(ValueError):
        profile.sps(4)

    assert CostProfile.from_json(profile.to_json()) == profile
    assert CostProfile.load(profile.save(tmp_path / "profiles" / "cost.json")) == profile
    assert prefix_schedule([[0.9, 0.8, 0.7]], profile).shape == (1,)
    with pytest.raises(ValueError, match="positive"):
        CostProfile(seconds_per_step=[0.1, 0.0])


# ---------------------------------------------------------------------------------------------------------
# Calibration table and the `dspark calibrate` command
# ---------------------------------------------------------------------------------------------------------


def test_survival_outcomes_and_calibration_table():
    rounds = [([2.0, 0.0, -1.0], 1), ([1.0, 1.0], 2), ([0.5], 0)]
    temperatures = [1.0, 2.0, 0.5]
    probs, labels = survival_outcomes(rounds)  # round by round, verified positions only
    expected = [torch.sigmoid(torch.tensor(z, dtype=torch.float64)).cumprod(0) for z, _ in rounds]
    torch.testing.assert_close(probs, torch.cat(expected))
    assert labels.tolist() == [True, False, False, True, True, False]
    calibrated, _ = survival_outcomes(rounds, temperatures)
    torch.testing.assert_close(
        calibrated[:3],
        survival_probabilities(torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64), temperatures),
    )

    table = [line.split() for line in format_calibration_table(rounds, temperatures, n_bins=5).splitlines()]
    assert table[0] == ["pos", "T", "rounds", "survived", "ECE", "AUROC", "Brier"]
    assert [row[:4] for row in table[1:]] == [
        ["1", "1.00", "3", "0.667"],
        ["2", "2.00", "2", "0.500"],
        ["3", "0.50", "1", "0.000"],
        ["all", "6", "0.500"] + table[-1][3:4],
    ]
    ece_before, ece_after = (expected_calibration_error(p, labels, 5) for p in (probs, calibrated))
    assert table[-1][3:6] == [f"{ece_before:.3f}", "->", f"{ece_after:.3f}"]
    brier_after = calibration_report(rounds, temperatures, n_bins=5)[1]["brier"]
    assert table[2][-1] == f"{brier_after:.3f}"


def chat_tokenizer(corpus: list[str]):
    """A small byte-level BPE tokenizer with a ChatML template, trained in memory (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=template,
    )


def test_dspark_calibrate_command(tmp_path, capsys):
    """`dspark calibrate` on a tiny random target: fits and stores one temperature per block position and the
    cost profile, rewriting only the drafter's config; a DeepSpec-layout folder is not rewritten in place."""
    from dspark_hf import DSparkForCausalLM, export_deepspec
    from dspark_hf.cli import main
    from dspark_hf.training.data import load_prompts

    torch.manual_seed(0)
    tokenizer = chat_tokenizer(load_prompts("gsm8k", "eval")[-1:] + load_prompts("mt-bench", "eval")[-1:])
    target = make_tiny_target(
        vocab_size=len(tokenizer),
        seed=None,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
    )
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    drafter = make_tiny_drafter(target, markov_rank=16, block_size=4)
    drafter.save_pretrained(tmp_path / "drafter")
    weights = (tmp_path / "drafter" / "model.safetensors").read_bytes()

    args = ["calibrate", str(tmp_path / "drafter"), "--target", str(tmp_path / "target")]
    args += [
        "--prompts-per-set",
        "1",
        "--max-new-tokens",
        "12",
        "--profile-cost",
        "--profile-context-length",
        "16",
    ]
    main(args)
    output = capsys.readouterr().out
    calibrated = DSparkForCausalLM.from_pretrained(tmp_path / "drafter")
    temperatures = calibrated.config.confidence_temperatures
    assert len(temperatures) == 4 and min(temperatures) > 0
    assert calibrated.cost_profile.max_tokens == 5 and calibrated.cost_profile.context_length == 16
    assert (tmp_path / "drafter" / "model.safetensors").read_bytes() == weights
    assert (
        "ECE" in output and "AUROC" in output and "Brier" in output and "rounds of greedy decoding" in output
    )
    assert output.count(" -> ") >= 3 * 5  # positions 1..4 and "all", three metrics each

    export_deepspec(calibrated, tmp_path / "deepspec")
    with pytest.raises(SystemExit, match="--output_dir"):
        main(["calibrate", str(tmp_path / "deepspec"), "--target", str(tmp_path / "target")])
