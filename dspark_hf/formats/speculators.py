"""speculators interop: export a drafter in speculators' DSpark format (the one `vllm serve <folder>` reads).

speculators (vllm-project/speculators) stores a DSpark drafter with dspark_hf's parameter names, a config
whose `speculators_config` names the algorithm, proposal method and verifier, and a Qwen3
`transformer_layer_config` for the draft layers. What differs from the native layout, all checked against
speculators 0.9.0 by `tests/peer/speculators_check.py`:

- layer ids count the embedding output as layer 0 (`aux_hidden_state_layer_ids` = `target_layer_ids` + 1);
- the copies of the target's embedding and (for a full vocabulary) LM head are not stored: loaders take
  them from the verifier;
- a draft sub-vocabulary is stored EAGLE-3 style (see `weights`).

`DSparkForCausalLM.from_pretrained` detects the format from config.json and translates it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..configuration_dspark import DSparkConfig
from .base import CheckpointFormat, engine_support_notes
from .weights import read_config_dict, serving_state_dict, write_serving_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# speculators' DSpark format (speculators 0.9.0, the version the peer check runs against).
SPECULATORS_ARCHITECTURE = "DSparkSpeculator"
SPECULATORS_VERSION = "0.9.0"
# speculators' layer id 0 is the embedding output (hidden_states[0] of transformers), ours is -1.
SPECULATORS_LAYER_ID_OFFSET = 1
# Fields of the draft decoder that speculators keeps in `transformer_layer_config` (a Qwen3 config).
_QWEN3_LAYER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "max_position_embeddings",
    "attention_bias",
    "attention_dropout",
    "initializer_range",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
# Native drafting fields exported as extra keys of a speculators config, restored on import.
_SPECULATORS_EXTRA_FIELDS = ("confidence_temperatures", "target_cost_profile")
# speculators' defaults for DSpark fields a config may omit (DSparkSpeculatorConfig, speculators 0.9.0).
_SPECULATORS_DSPARK_DEFAULTS = {
    "markov_rank": 256,
    "markov_head_type": "vanilla",
    "enable_confidence_head": True,
    "confidence_head_with_markov": True,
    "sample_from_anchor": True,
}


def speculators_config_dict(
    config: DSparkConfig, verifier_name_or_path: str | None, verifier_architectures: list[str] | None = None
) -> dict[str, Any]:
    """The config.json of speculators' DSpark format (`speculators_model_type: dspark`), served by vLLM.

    speculators counts target layers from the embedding output (its layer id 0), so its
    `aux_hidden_state_layer_ids` are ours + 1. The block convention is written explicitly: the anchor slot
    is the first prediction (`sample_from_anchor`), not a bonus token, so a round drafts `block_size`
    tokens. `num_target_layers` and the calibration fields ride along as extra keys (speculators keeps
    unknown keys), so that an import restores them.
    """
    native = config.to_dict()
    layer_config = {k: native[k] for k in _QWEN3_LAYER_FIELDS}
    layer_config.update(
        model_type="qwen3",
        layer_types=["full_attention"] * config.num_hidden_layers,
        max_window_layers=config.num_hidden_layers,
        sliding_window=None,
        use_sliding_window=False,
        use_cache=True,
    )
    out = {
        "architectures": [SPECULATORS_ARCHITECTURE],
        "speculators_model_type": "dspark",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "dspark",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": config.block_size,
                    "accept_tolerance": 0.0,
                    "verifier_accept_k": 1,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {
                "name_or_path": verifier_name_or_path,
                "architectures": list(verifier_architectures or []),
            },
        },
        "transformer_layer_config": layer_config,
        "aux_hidden_state_layer_ids": [i + SPECULATORS_LAYER_ID_OFFSET for i in config.target_layer_ids],
        "block_size": config.block_size,
        "mask_token_id": config.mask_token_id,
        "draft_vocab_size": config.draft_vocab_size or config.vocab_size,
        "target_hidden_size": None,
        "sliding_window_non_causal": False,
        "sample_from_anchor": True,
        "dspark_bonus_anchor": False,
        "markov_rank": config.markov_rank,
        "markov_head_type": config.markov_head_type,
        "enable_confidence_head": config.enable_confidence_head,
        "confidence_head_with_markov": config.confidence_head_with_markov,
        "num_target_layers": config.num_target_layers,
    }
    for field in ("dtype", "transformers_version", *_SPECULATORS_EXTRA_FIELDS):
        if native.get(field) is not None:
            out[field] = native[field]
    return out


def speculators_to_native_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Translate the config.json of a speculators DSpark checkpoint into DSparkConfig fields.

    Raises a ValueError for other speculators algorithms and for block conventions dspark_hf cannot
    represent (the anchor as a bonus token, i.e. `sample_from_anchor: false` or `dspark_bonus_anchor: true`).
    """
    model_type = config_dict.get("speculators_model_type")
    if model_type != "dspark":
        raise ValueError(
            f"Not a DSpark checkpoint: speculators_model_type={model_type!r} (dspark_hf loads 'dspark')."
        )
    fields = {**_SPECULATORS_DSPARK_DEFAULTS, **config_dict}
    if not fields["sample_from_anchor"] or fields.get("dspark_bonus_anchor"):
        raise ValueError(
            "This speculators checkpoint treats the anchor as a bonus token (sample_from_anchor="
            f"{fields['sample_from_anchor']}, dspark_bonus_anchor={fields.get('dspark_bonus_anchor')}): its "
            "slot k predicts the token at anchor + k, while dspark_hf drafters predict anchor + k + 1 from "
            "slot k. dspark_hf cannot represent that layout."
        )
    if fields.get("mask_token_id") is None:
        raise ValueError("The speculators config has no mask_token_id; a DSpark drafter needs one.")
    layer = dict(fields["transformer_layer_config"])
    native = {k: layer[k] for k in _QWEN3_LAYER_FIELDS if k in layer}
    target_layer_ids = [i - SPECULATORS_LAYER_ID_OFFSET for i in fields["aux_hidden_state_layer_ids"]]
    verifier = (fields.get("speculators_config") or {}).get("verifier") or {}
    vocab_size = native["vocab_size"]
    draft_vocab_size = fields.get("draft_vocab_size") or vocab_size
    native.update(
        model_type=DSparkConfig.model_type,
        architectures=["DSparkForCausalLM"],
        target_layer_ids=target_layer_ids,
        # speculators records no target depth; the deepest layer read is the smallest consistent value.
        num_target_layers=fields.get("num_target_layers") or max(target_layer_ids) + 1,
        target_model_name_or_path=verifier.get("name_or_path"),
        block_size=fields["block_size"],
        mask_token_id=fields["mask_token_id"],
        markov_rank=fields["markov_rank"],
        markov_head_type=fields["markov_head_type"],
        enable_confidence_head=fields["enable_confidence_head"],
        confidence_head_with_markov=fields["confidence_head_with_markov"],
        draft_vocab_size=None if draft_vocab_size == vocab_size else draft_vocab_size,
        extend_draft_vocab_with_prompt=draft_vocab_size == vocab_size,
    )
    for key in ("dtype", "transformers_version", *_SPECULATORS_EXTRA_FIELDS):
        if fields.get(key) is not None:
            native[key] = fields[key]
    return native


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
    drafter: PreTrainedModel, output_dir: str | os.PathLike, verifier_name_or_path: str | None = None
) -> Path:
    """Write a drafter in speculators' DSpark format (`convert_checkpoint(folder, out, to="speculators")`
    converts a saved folder of any layout).

    `verifier_name_or_path` is the target recorded in `speculators_config.verifier` (speculators and vLLM
    load the embedding and LM head from it); it defaults to the drafter's `target_model_name_or_path`.
    Returns `output_dir`.
    """
    config = drafter.config
    verifier = verifier_name_or_path or config.target_model_name_or_path
    exported = speculators_config_dict(config, verifier, _verifier_architectures(verifier))
    omit = _OMITTED_ALWAYS if config.draft_vocab_size is not None else _OMITTED_FULL_VOCAB
    tensors = serving_state_dict(drafter.state_dict(), config.vocab_size, omit=omit)
    return write_serving_folder(output_dir, exported, tensors)


class SpeculatorsFormat(CheckpointFormat):
    name = "speculators"
    signature = "speculators_model_type 'dspark'"

    def detect(self, config_dict: dict[str, Any]) -> bool:
        return "speculators_model_type" in config_dict

    def to_native_config(self, config_dict: dict[str, Any]) -> dict[str, Any]:
        return speculators_to_native_dict(config_dict)

    def needs_tensor_translation(self, config_dict: dict[str, Any]) -> bool:
        return True  # the copies of the target's embedding (and LM head) come from the verifier

    def export(
        self, drafter: PreTrainedModel, out_dir: str | os.PathLike, verifier_name_or_path: str | None = None
    ) -> Path:
        return export_speculators(drafter, out_dir, verifier_name_or_path)

    def serving_instructions(self, config: DSparkConfig, folder: str | os.PathLike) -> str:
        """`vllm serve <folder>` reads the algorithm and the verifier from the checkpoint's
        `speculators_config`; SGLang is pointed to DeepSpec's layout."""
        target = config.target_model_name_or_path or "<target model>"
        spec = json.dumps({"model": str(folder), "num_speculative_tokens": config.block_size})
        lines = [
            f"Serve {folder} (speculators format) as the drafter of {target}:",
            "",
            "  vLLM (the verifier comes from the checkpoint's speculators_config):",
            f"    vllm serve {folder}",
            "  or with the target named explicitly:",
            f"    vllm serve {target} --speculative-config '{spec}'",
            "",
            "  SGLang serves DeepSpec's layout: dspark convert <drafter folder> <out> --format deepspec",
        ]
        return "\n".join(lines + engine_support_notes(config))


__all__ = [
    "SPECULATORS_ARCHITECTURE",
    "SpeculatorsFormat",
    "export_speculators",
    "speculators_config_dict",
    "speculators_to_native_dict",
]
