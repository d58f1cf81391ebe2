"""speculators interop: export a drafter in speculators' DSpark format (the one `vllm serve <folder>` reads).

speculators (vllm-project/speculators) stores a DSpark drafter with dspark_hf's parameter names, a config
whose `speculators_config` names the algorithm, proposal method and verifier, and a Qwen3
`transformer_layer_config` for the draft layers. What differs from the native layout, all checked against
speculators 0.9.0 by `benchmarks/speculators_check.py`:

- layer ids count the embedding output as layer 0 (`aux_hidden_state_layer_ids` = `target_layer_ids` + 1);
- the copies of the target's embedding and (for a full vocabulary) LM head are not stored: loaders take
  them from the verifier;
- a draft sub-vocabulary is stored EAGLE-3 style (see `weight_layouts`).

Import needs no code here: `DSparkForCausalLM.from_pretrained` / `AutoModel.from_pretrained` detect the
format from config.json.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..modeling_dspark import DSparkForCausalLM
from .weights import read_config_dict, serving_state_dict, write_serving_folder

# Tensors speculators never stores: the embedding always, the LM head unless reduced to a draft vocabulary.
_OMITTED_ALWAYS = ("embed_tokens.weight",)
_OMITTED_FULL_VOCAB = ("embed_tokens.weight", "lm_head.weight")


def _verifier_architectures(verifier_name_or_path: str | None) -> list[str]:
    """The verifier's `architectures` from its config.json, when it can be read ([] otherwise)."""
    if verifier_name_or_path is None:
        return []
    try:
        return list(read_config_dict(verifier_name_or_path).get("architectures") or [])
    except (OSError, ValueError):
        return []


def export_speculators(
    drafter_or_folder: DSparkForCausalLM | str | os.PathLike,
    output_dir: str | os.PathLike,
    verifier_name_or_path: str | None = None,
) -> Path:
    """Write a drafter (or any drafter folder dspark_hf loads) in speculators' DSpark format.

    `verifier_name_or_path` is the target recorded in `speculators_config.verifier` (speculators and vLLM
    load the embedding and LM head from it); it defaults to the drafter's `target_model_name_or_path`.
    Returns `output_dir`.
    """
    drafter = (
        drafter_or_folder
        if isinstance(drafter_or_folder, DSparkForCausalLM)
        else DSparkForCausalLM.from_pretrained(drafter_or_folder)
    )
    config = drafter.config
    verifier = verifier_name_or_path or config.target_model_name_or_path
    exported = config.to_speculators_dict(verifier, _verifier_architectures(verifier))
    omit = _OMITTED_ALWAYS if config.draft_vocab_size is not None else _OMITTED_FULL_VOCAB
    tensors = serving_state_dict(drafter.state_dict(), config.vocab_size, omit=omit)
    return write_serving_folder(output_dir, exported, tensors)


__all__ = ["export_speculators"]
