import pytest
import torch
from conftest import make_tiny_target

from dspark_hf.generation.batched_decoding import decode_shrinking_batch, sampling_warpers

PAD = 0


def left_padded_batch(lengths, vocab_size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(1, vocab_size, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


def generate_new_tokens(model, input_ids, attention_mask, eos, **kwargs):
    """Each row's new tokens from model.generate, cut after its first end-of-sequence token."""
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, pad_token_id=PAD, eos_token_id=eos, **kwargs
    )
    rows = []
    for tokens in out[:, input_ids.shape[1] :].tolist():
        stop = next((i for i, t in enumerate(tokens) if t in eos), None)
        rows.append(tokens if stop is None else tokens[: stop + 1])
    return rows


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_answers_equal_generate_while_rows_leave_the_batch(kind):
    model = make_tiny_target(kind, lm_head_scale=4.0)
    input_ids, attention_mask = left_padded_batch([5, 9, 3, 7, 12, 6])
    free_run = generate_new_tokens(model, input_ids, attention_mask, [], max_new_tokens=24, do_sample=False)
    # End-of-sequence tokens that the rows reach at different steps, so rows leave one by one.
    eos = sorted({free_run[0][3], free_run[2][9], free_run[4][15]})
    expected = generate_new_tokens(model, input_ids, attention_mask, eos, max_new_tokens=24, do_sample=False)
    assert len({len(row) for row in expected}) > 1
    finished = []
    answers = decode_shrinking_batch(
        model, input_ids, attention_mask, max_new_tokens=24, eos_token_ids=eos,
        on_finished=lambda row, tokens: finished.append((row, list(tokens))),
    )  # fmt: skip
    assert answers == expected
    # Each answer is reported once, complete, as soon as it ends (the shortest first).
    assert sorted(finished) == sorted(enumerate(expected))
    assert [len(tokens) for _, tokens in finished] == sorted(len(row) for row in expected)


def test_every_tensor_follows_the_inputs_device():
    """Tensors created without a device land on "meta" here, so one that does not follow the batch's device
    (a CPU index meeting a CUDA mask on a GPU) fails as soon as a row leaves the batch."""
    model = make_tiny_target("qwen3", lm_head_scale=4.0)
    input_ids, attention_mask = left_padded_batch([5, 9, 3, 7])
    free_run = generate_new_tokens(model, input_ids, attention_mask, [], max_new_tokens=12, do_sample=False)
    eos = sorted({free_run[0][2], free_run[2][6]})
    expected = generate_new_tokens(model, input_ids, attention_mask, eos, max_new_tokens=12, do_sample=False)
    assert len({len(row) for row in expected}) > 1
    with torch.device("meta"):
        answers = decode_shrinking_batch(
            model, input_ids, attention_mask, max_new_tokens=12, eos_token_ids=eos
        )
    assert answers == expected


def test_sampled_answers_use_generates_warpers_and_random_stream():
    model = make_tiny_target(lm_head_scale=4.0)
    input_ids, attention_mask = left_padded_batch([4, 8, 6])
    options = dict(max_new_tokens=16, min_new_tokens=16, temperature=0.7, top_p=0.8)
    torch.manual_seed(3)
    expected = generate_new_tokens(model, input_ids, attention_mask, [5], do_sample=True, **options)
    torch.manual_seed(3)
    answers = decode_shrinking_batch(
        model, input_ids, attention_mask, eos_token_ids=[5], do_sample=True, **options
    )
    assert answers == expected
    assert all(5 not in row for row in answers)  # min_new_tokens holds the end-of-sequence token back


def test_warpers_follow_generates_order_and_defaults():
    model = make_tiny_target()
    names = [type(w).__name__ for w in sampling_warpers(model, temperature=0.7, top_p=0.8)]
    assert names == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    assert [type(w).__name__ for w in sampling_warpers(model)] == ["TopKLogitsWarper"]


def test_a_non_positive_token_budget_is_refused():
    model = make_tiny_target()
    input_ids, attention_mask = left_padded_batch([3])
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode_shrinking_batch(model, input_ids, attention_mask, max_new_tokens=0, eos_token_ids=[1])
