import json

import pytest
import torch

from dspark_hf.reference import onpolicy
from dspark_hf.reference.onpolicy import (
    _CODE_PATTERN,
    evaluation_prompts,
    find_leaks,
    generation_dtype,
    vendor_answers,
)
from dspark_hf.training.data import (
    load_onpolicy_rows,
    load_reference_train_rows,
    read_jsonl_gz,
    reference_training_rows,
)

EVAL = [
    "Write a function that returns the sum of two numbers.",
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
    "with four.",
]


def test_exact_repeats_are_leaks_up_to_case_punctuation_and_spacing():
    prompts = ["write a function that returns   the sum of two numbers", "Tell me a joke."]
    assert find_leaks(prompts, EVAL) == [(0, 0)]


def test_an_evaluation_question_quoted_or_edited_inside_a_longer_prompt_is_a_leak():
    quoted = "Please help. " + EVAL[1].replace("sixteen", "16") + " How much does she make?"
    edited = EVAL[1].replace("three", "two")
    assert find_leaks([quoted, edited], EVAL) == [(0, 1), (1, 1)]


def test_prompts_on_the_same_topic_are_not_leaks():
    prompts = ["Write a function that reverses a string.", "My ducks lay eggs. How many do I sell?"]
    assert find_leaks(prompts, EVAL) == []


@pytest.mark.parametrize("loader", [load_reference_train_rows, load_onpolicy_rows])
def test_no_vendored_training_prompt_repeats_or_paraphrases_an_evaluation_prompt(loader):
    prompts = [row["prompt"] for row in loader()]
    assert prompts
    assert find_leaks(prompts, evaluation_prompts()) == []


def test_evaluation_prompts_cover_every_bundled_evaluation_set():
    prompts = evaluation_prompts()
    assert len(prompts) == 100 + 2 * 80 + 164  # GSM8K eval rows, both MT-Bench turns, HumanEval


def test_code_questions_are_told_apart_from_chat():
    assert _CODE_PATTERN.search("How do I sort a list in Python?")
    assert not _CODE_PATTERN.search("Write a poem about the sea.")


def test_no_training_file_answers_a_held_out_prompt():
    held_out = {row["prompt"] for row in reference_training_rows("held_out")}
    assert len(held_out) == 100
    assert not held_out & {row["prompt"] for row in reference_training_rows("train")}


def test_vendoring_drops_held_out_and_leaked_prompts_and_is_byte_stable(tmp_path):
    held_out = reference_training_rows("held_out")[0]["prompt"]
    leaked = evaluation_prompts()[0] + " Thanks!"
    rows = [
        {"prompt": p, "response": "r", "truncated": False, "sampling": mode}
        for p, mode in [("Name three rivers.", "greedy"), (held_out, "greedy"), (leaked, "greedy")]
    ] + [{"prompt": "Name three rivers.", "response": "s", "truncated": True, "sampling": "temperature=0.7"}]
    cache = tmp_path / "cache.jsonl"
    cache.write_text("".join(json.dumps(row) + "\n" for row in rows))
    counts = vendor_answers(cache, tmp_path / "a.jsonl.gz")
    vendor_answers(cache, tmp_path / "b.jsonl.gz")
    assert read_jsonl_gz(tmp_path / "a.jsonl.gz") == [rows[0], rows[3]]
    assert counts == {
        "answers": 2,
        "prompts": 1,
        "by_sampling": {"greedy": 1, "temperature=0.7": 1},
        "truncated": 1,
        "dropped": 2,
    }
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(onpolicy, "cpu_has_native_bf16", lambda: native)
    assert generation_dtype("auto") == expected
    assert generation_dtype("float32") == torch.float32
    assert generation_dtype("bfloat16") == torch.bfloat16


def test_an_unknown_dtype_name_is_refused():
    with pytest.raises(ValueError, match="float16"):
        generation_dtype("float16")
