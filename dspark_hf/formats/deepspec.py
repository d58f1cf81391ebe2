"""DeepSpec's layout (a Qwen3 config with DSpark fields, `architectures: [Qwen3DSparkModel]`): the one
DeepSeek released its drafters in, and the one vLLM (`method: dspark`) and SGLang
(`--speculative-algorithm DSPARK`) serve.

Parameter names are dspark_hf's, so the translation is a config one; a draft sub-vocabulary is stored the way
engines read EAGLE-3 drafters' (`weights`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..configuration_dspark import DSparkConfig
from .base import CheckpointFormat, engine_support_notes
from .weights import serving_state_dict, write_serving_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# DeepSpec stores a drafter as a Qwen3 config with extra DSpark fields; these are the architectures it writes.
DEEPSPEC_ARCHITECTURE = "Qwen3DSparkModel"
DEEPSPEC_UNSUPPORTED_ARCHITECTURES = ("Gemma4DSparkModel",)
# Qwen3 fields that DeepSpec checkpoints carry but a DSpark drafter does not use.
_DEEPSPEC_ONLY_FIELDS = (
    "layer_types",
    "max_window_layers",
    "sliding_window",
    "use_sliding_window",
    "use_cache",
)
# Training-time field DeepSpec's model class requires in its config; exported with this default when unknown.
DEEPSPEC_DEFAULT_NUM_ANCHORS = 512
# DSparkConfig fields DeepSpec's layout has no place for.
_NATIVE_ONLY_FIELDS = (
    "confidence_temperatures",
    "target_model_name_or_path",
    "auto_map",
    "draft_vocab_size",
    "extend_draft_vocab_with_prompt",
    "target_cost_profile",
)


def deepspec_config_dict(config: DSparkConfig, num_anchors: int | None = None) -> dict[str, Any]:
    """The config.json of DeepSpec's layout, which vLLM (`method: dspark`) and SGLang (`DSPARK`) serve."""
    native = config.to_dict()
    # Only DSpark fields (not generic PreTrainedConfig ones such as id2label) go into the export.
    fields = [k for k in DSparkConfig.__annotations__ if k not in _NATIVE_ONLY_FIELDS]
    out = {k: native[k] for k in [*fields, "dtype", "transformers_version"] if k in native}
    out.update(
        model_type="qwen3",
        architectures=[DEEPSPEC_ARCHITECTURE],
        layer_types=["full_attention"] * config.num_hidden_layers,
        max_window_layers=config.num_hidden_layers,
        sliding_window=None,
        use_sliding_window=False,
        use_cache=True,
        num_anchors=num_anchors or getattr(config, "num_anchors", DEEPSPEC_DEFAULT_NUM_ANCHORS),
    )
    if config.draft_vocab_size is not None:
        out["draft_vocab_size"] = config.draft_vocab_size
    if config.markov_rank == 0:
        out.pop("markov_head_type", None)
    if not config.enable_confidence_head:
        out.pop("confidence_head_with_markov", None)
    return out


def deepspec_to_native_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Translate a DeepSpec checkpoint's config.json into DSparkConfig fields.

    Raises a ValueError for DeepSpec architectures that are not supported yet.
    """
    architectures = config_dict.get("architectures") or []
    unsupported = [a for a in architectures if a in DEEPSPEC_UNSUPPORTED_ARCHITECTURES]
    if unsupported:
        raise ValueError(
            f"DeepSpec checkpoints with architecture {unsupported[0]} are not supported yet by dspark_hf; "
            f"only {DEEPSPEC_ARCHITECTURE} (Qwen3-layout drafters) can be loaded."
        )
    native = {k: v for k, v in config_dict.items() if k not in _DEEPSPEC_ONLY_FIELDS}
    native["model_type"] = DSparkConfig.model_type
    native["architectures"] = ["DSparkForCausalLM"]
    native.setdefault("markov_head_type", "vanilla")
    native.setdefault("confidence_head_with_markov", False)
    if native.get("draft_vocab_size") is not None:
        # Only the draft rows of the LM head and Markov W2 are stored: prompt tokens cannot be added.
        native["extend_draft_vocab_with_prompt"] = False
    return native


def export_deepspec(
    drafter: PreTrainedModel, out_dir: str | os.PathLike, num_anchors: int | None = None
) -> Path:
    """Write `drafter` in DeepSpec's layout (config.json + model.safetensors), which vLLM and SGLang serve.

    A draft sub-vocabulary is stored as engines read EAGLE-3 drafters' (`draft_vocab_size`, draft rows of
    `lm_head` and Markov W2, `d2t` / `t2d`; see `weights`).
    """
    config = deepspec_config_dict(drafter.config, num_anchors=num_anchors)
    tensors = serving_state_dict(drafter.state_dict(), drafter.config.vocab_size)
    return write_serving_folder(out_dir, config, tensors)


class DeepSpecFormat(CheckpointFormat):
    name = "deepspec"
    signature = f"architectures [{DEEPSPEC_ARCHITECTURE!r}]"

    def detect(self, config_dict: dict[str, Any]) -> bool:
        architectures = config_dict.get("architectures") or []
        return any(a in (DEEPSPEC_ARCHITECTURE, *DEEPSPEC_UNSUPPORTED_ARCHITECTURES) for a in architectures)

    def to_native_config(self, config_dict: dict[str, Any]) -> dict[str, Any]:
        return deepspec_to_native_dict(config_dict)

    def needs_tensor_translation(self, config_dict: dict[str, Any]) -> bool:
        return config_dict.get("draft_vocab_size") is not None

    def export(
        self, drafter: PreTrainedModel, out_dir: str | os.PathLike, verifier_name_or_path: str | None = None
    ) -> Path:
        return export_deepspec(drafter, out_dir)

    def serving_instructions(self, config: DSparkConfig, folder: str | os.PathLike) -> str:
        """Flags as in vLLM's speculative config (`method: dspark`) and SGLang's server arguments
        (`--speculative-algorithm DSPARK`, `--speculative-dspark-block-size`); both engines draft `block_size`
        tokens per round with these drafters."""
        target = config.target_model_name_or_path or "<target model>"
        spec = json.dumps(
            {"method": "dspark", "model": str(folder), "num_speculative_tokens": config.block_size}
        )
        lines = [
            f"Serve {folder} as the drafter of {target}:",
            "",
            "  vLLM:",
            f"    vllm serve {target} \\",
            f"      --speculative-config '{spec}'",
            "",
            "  SGLang:",
            f"    python -m sglang.launch_server --model-path {target} \\",
            f"      --speculative-algorithm DSPARK --speculative-draft-model-path {folder} \\",
            f"      --speculative-dspark-block-size {config.block_size}",
        ]
        return "\n".join(lines + engine_support_notes(config))


__all__ = [
    "DEEPSPEC_ARCHITECTURE",
    "DeepSpecFormat",
    "deepspec_config_dict",
    "deepspec_to_native_dict",
    "export_deepspec",
]
