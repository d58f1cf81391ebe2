"""Hub publishing of saved drafter folders; model cards and `push_to_hub` live in `model_card`.

Kept apart from `model_card` because publishing a folder loads the drafter, while the drafter's class needs
the card code as its mixin.
"""

from __future__ import annotations

import os

from huggingface_hub import CommitInfo
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..errors import InputError
from ..modeling_dspark import DSparkForCausalLM
from .model_card import read_card_metadata


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    results: dict | None = None,
    token: bool | str | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Publish a saved drafter folder (any layout dspark_hf loads) in the native layout with a fresh card.

    Training details, results and licence recorded in the folder's card are kept; `results` replaces the
    recorded results. Only the drafter's files are uploaded, never optimizer states or pickles. A malformed
    `repo_id` or folder raises an InputError before anything is uploaded.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InputError(f"repo id {repo_id!r} is not a Hub repo id ('name' or 'org/name').") from err
    drafter = DSparkForCausalLM.from_pretrained(folder)
    recorded = read_card_metadata(folder)
    return drafter.push_to_hub(
        repo_id,
        private=private,
        token=token,
        commit_message=commit_message,
        training_info=recorded["training_info"],
        results=results if results is not None else recorded["results"],
        license=recorded["license"],
    )


__all__ = ["push_folder"]
