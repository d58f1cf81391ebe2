"""Configuration of the DSpark drafter, and its translation to and from DeepSpec's checkpoint layout."""

from __future__ import annotations

import copy
import functools
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .heads import MARKOV_HEADS

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


def default_target_layer_ids(num_target_layers: int, num_features: int = 5) -> list[int]:
    """Evenly spread feature layers, from the second layer to the third-to-last.

    For 36 target layers this gives DeepSpec's [1, 9, 17, 25, 33]; shallow targets get fewer ids.
    """
    first, last = 1, num_target_layers - 3
    if last <= first:
        return list(range(num_target_layers))[:num_features]
    count = min(num_features, last - first + 1)
    if count == 1:
        return [first]
    step = (last - first) / (count - 1)
    return sorted({first + round(i * step) for i in range(count)})


@strict(accept_kwargs=True)
class DSparkConfig(PreTrainedConfig):
    r"""
    Configuration of a DSpark drafter: a parallel DFlash-style backbone that reads hidden states of a few
    target layers and drafts a whole block in one pass, a light sequential Markov head that restores the
    dependency between drafted tokens, and a confidence head that predicts how far a draft survives.

    > Parameters of the draft backbone (Qwen3-style decoder layers)

    vocab_size (`int`): vocabulary size, equal to the target's.
    hidden_size (`int`): width of the drafter, equal to the target's hidden size.
    intermediate_size (`int`): width of the MLP.
    num_hidden_layers (`int`, defaults to 5): number of draft layers.
    num_attention_heads, num_key_value_heads, head_dim (`int`): attention shape.
    rms_norm_eps (`float`): epsilon of the RMS norms.
    rope_parameters (`dict`): rotary embedding parameters (`rope_theta`, `rope_type`), as the target's.
    max_position_embeddings (`int`): longest position the rotary embedding is built for.
    attention_bias (`bool`): whether q/k/v/o projections have a bias.

    > Parameters that connect the drafter to its target

    target_layer_ids (`list[int]`): target layers whose outputs feed the drafter (-1 is the embedding output);
        strictly increasing, within the target's layers.
    num_target_layers (`int`): number of decoder layers of the target.
    target_model_name_or_path (`str`, *optional*): provenance of the target the drafter was built for.

    > Parameters of the DSpark heads and of drafting

    block_size (`int`, defaults to 7): tokens drafted per block (the anchor slot included).
    mask_token_id (`int`): token id that fills the block after the anchor; by default the tokenizer's pad id
        (see `from_target_config`).
    markov_rank (`int`, defaults to 256): rank of the Markov head; 0 disables it (plain DFlash).
    markov_head_type (`str`, defaults to `"vanilla"`): `"vanilla"`, `"gated"` or `"rnn"`.
    enable_confidence_head (`bool`, defaults to `True`): whether the drafter predicts per-position acceptance.
    confidence_head_with_markov (`bool`, defaults to `True`): feed the Markov embedding of the previous token
        to the confidence head besides the hidden state (requires `markov_rank > 0`).
    confidence_temperatures (`list[float]`, *optional*): per-position temperatures fitted by sequential
        temperature scaling, applied to the confidence logits at generation time.
    draft_vocab_size (`int`, *optional*): when set, drafting proposes only tokens of a frequency-ranked
        sub-vocabulary of this size (the `draft_vocab_ids` buffer), which makes the LM head and the Markov
        steps several times cheaper. Verification is unchanged, so decoding stays lossless.
    target_cost_profile (`dict`, *optional*): the target's forward time per number of verified tokens on the
        serving machine (a `dspark_hf.scheduling.cost_profile.CostProfile` as a dict, set by
        `set_cost_profile` or `dspark calibrate --profile-cost`), which confidence scheduling weighs expected
        accepts against.
        Machine-specific: re-profile on other hardware.
    """

    model_type = "dspark"

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 5
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_parameters: RopeParameters | dict | None = None
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    target_layer_ids: list[int] | None = None
    num_target_layers: int = 36
    target_model_name_or_path: str | None = None

    block_size: int = 7
    mask_token_id: int | None = None
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    confidence_temperatures: list[float] | None = None
    draft_vocab_size: int | None = None
    extend_draft_vocab_with_prompt: bool = True
    target_cost_profile: dict[str, Any] | None = None

    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.rope_parameters is None and "rope_theta" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 1_000_000.0}
        if self.target_layer_ids is None:
            self.target_layer_ids = default_target_layer_ids(self.num_target_layers)
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        if self.markov_rank == 0:
            self.confidence_head_with_markov = False
        super().__post_init__(**kwargs)
        self.check_values()

    def check_values(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        ids = self.target_layer_ids
        if not ids:
            raise ValueError("target_layer_ids must not be empty.")
        if any(i < -1 or i >= self.num_target_layers for i in ids):
            raise ValueError(
                f"target_layer_ids {ids} out of range: each id must be -1 (embeddings) or in "
                f"[0, {self.num_target_layers - 1}] for num_target_layers={self.num_target_layers}."
            )
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise ValueError(f"target_layer_ids {ids} must be strictly increasing.")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}.")
        if self.markov_rank < 0:
            raise ValueError(
                f"markov_rank must be >= 0 (0 disables the Markov head), got {self.markov_rank}."
            )
        if self.markov_head_type not in MARKOV_HEADS:
            raise ValueError(
                f"markov_head_type must be one of {tuple(MARKOV_HEADS)}, got {self.markov_head_type!r}."
            )
        if self.confidence_head_with_markov and self.enable_confidence_head and self.markov_rank == 0:
            raise ValueError("confidence_head_with_markov requires markov_rank > 0.")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})."
            )
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in [1, {self.vocab_size}], got {self.draft_vocab_size}."
            )
        temperatures = self.confidence_temperatures
        if temperatures is not None and (len(temperatures) != self.block_size or min(temperatures) <= 0):
            raise ValueError(
                f"confidence_temperatures must hold {self.block_size} positive values, got {temperatures}."
            )
        if self.target_cost_profile is not None:
            from .scheduling.cost_profile import CostProfile

            try:
                CostProfile(**self.target_cost_profile)
            except (TypeError, ValueError) as err:
                raise ValueError(f"target_cost_profile is not a valid CostProfile: {err}") from err

    @property
    def num_features(self) -> int:
        """Number of concatenated target feature vectors per position."""
        return len(self.target_layer_ids)

    @classmethod
    def from_target_config(cls, target_config: PreTrainedConfig, **overrides: Any) -> DSparkConfig:
        """Derive a drafter config from a Llama / Qwen2 / Qwen3 / Mistral-style causal-LM config.

        The backbone copies the target's width, attention shape and rotary parameters; draft-specific fields
        take their defaults unless overridden. The mask token defaults to the target's pad token, or the last
        vocabulary id (a reserved or rarely used id in these vocabularies) when the target has no pad token.
        """
        text_config = target_config.get_text_config(decoder=True)
        num_heads = text_config.num_attention_heads
        eos = text_config.eos_token_id if hasattr(text_config, "eos_token_id") else None
        pad = getattr(text_config, "pad_token_id", None)
        fields: dict[str, Any] = {
            "vocab_size": text_config.vocab_size,
            "hidden_size": text_config.hidden_size,
            "intermediate_size": text_config.intermediate_size,
            "num_attention_heads": num_heads,
            "num_key_value_heads": getattr(text_config, "num_key_value_heads", None) or num_heads,
            "head_dim": getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads,
            "hidden_act": getattr(text_config, "hidden_act", "silu"),
            "rms_norm_eps": getattr(text_config, "rms_norm_eps", 1e-6),
            "rope_parameters": copy.deepcopy(dict(text_config.rope_parameters)),
            "max_position_embeddings": text_config.max_position_embeddings,
            "attention_bias": getattr(text_config, "attention_bias", False),
            "num_target_layers": text_config.num_hidden_layers,
            "target_layer_ids": default_target_layer_ids(text_config.num_hidden_layers),
            "mask_token_id": pad if pad is not None else text_config.vocab_size - 1,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "bos_token_id": getattr(text_config, "bos_token_id", None),
            "target_model_name_or_path": target_config.name_or_path or None,
        }
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs: Any) -> tuple[dict, dict]:
        """Read config.json, translating DeepSpec's and speculators' layouts so their checkpoints load
        unchanged."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return to_native_dict(config_dict), kwargs

    def to_deepspec_dict(self, num_anchors: int | None = None) -> dict[str, Any]:
        """The config.json of DeepSpec's layout, which vLLM (`method: dspark`) and SGLang (`DSPARK`) serve."""
        native = self.to_dict()
        # Only DSpark fields (not generic PreTrainedConfig ones such as id2label) go into the export.
        fields = [k for k in DSparkConfig.__annotations__ if k not in _NATIVE_ONLY_FIELDS]
        out = {k: native[k] for k in [*fields, "dtype", "transformers_version"] if k in native}
        out.update(
            model_type="qwen3",
            architectures=[DEEPSPEC_ARCHITECTURE],
            layer_types=["full_attention"] * self.num_hidden_layers,
            max_window_layers=self.num_hidden_layers,
            sliding_window=None,
            use_sliding_window=False,
            use_cache=True,
            num_anchors=num_anchors or getattr(self, "num_anchors", DEEPSPEC_DEFAULT_NUM_ANCHORS),
        )
        if self.draft_vocab_size is not None:
            out["draft_vocab_size"] = self.draft_vocab_size
        if self.markov_rank == 0:
            out.pop("markov_head_type", None)
        if not self.enable_confidence_head:
            out.pop("confidence_head_with_markov", None)
        return out

    def to_speculators_dict(
        self, verifier_name_or_path: str | None, verifier_architectures: list[str] | None = None
    ) -> dict[str, Any]:
        """The config.json of speculators' DSpark format (`speculators_model_type: dspark`), served by vLLM.

        speculators counts target layers from the embedding output (its layer id 0), so its
        `aux_hidden_state_layer_ids` are ours + 1. The block convention is written explicitly: the anchor slot
        is the first prediction (`sample_from_anchor`), not a bonus token, so a round drafts `block_size`
        tokens. `num_target_layers` and the calibration fields ride along as extra keys (speculators keeps
        unknown keys), so that an import restores them.
        """
        native = self.to_dict()
        layer_config = {k: native[k] for k in _QWEN3_LAYER_FIELDS}
        layer_config.update(
            model_type="qwen3",
            layer_types=["full_attention"] * self.num_hidden_layers,
            max_window_layers=self.num_hidden_layers,
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
                        "speculative_tokens": self.block_size,
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
            "aux_hidden_state_layer_ids": [i + SPECULATORS_LAYER_ID_OFFSET for i in self.target_layer_ids],
            "block_size": self.block_size,
            "mask_token_id": self.mask_token_id,
            "draft_vocab_size": self.draft_vocab_size or self.vocab_size,
            "target_hidden_size": None,
            "sliding_window_non_causal": False,
            "sample_from_anchor": True,
            "dspark_bonus_anchor": False,
            "markov_rank": self.markov_rank,
            "markov_head_type": self.markov_head_type,
            "enable_confidence_head": self.enable_confidence_head,
            "confidence_head_with_markov": self.confidence_head_with_markov,
            "num_target_layers": self.num_target_layers,
        }
        for field in ("dtype", "transformers_version", *_SPECULATORS_EXTRA_FIELDS):
            if native.get(field) is not None:
                out[field] = native[field]
        return out


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


_NATIVE_ONLY_FIELDS = (
    "confidence_temperatures",
    "target_model_name_or_path",
    "auto_map",
    "draft_vocab_size",
    "extend_draft_vocab_with_prompt",
    "target_cost_profile",
)


def deepspec_to_native_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Translate a DeepSpec checkpoint's config.json into DSparkConfig fields.

    Raises a ValueError for layouts that are not DSpark drafters or not supported yet, so that a wrong
    checkpoint never loads silently.
    """
    architectures = config_dict.get("architectures") or []
    unsupported = [a for a in architectures if a in DEEPSPEC_UNSUPPORTED_ARCHITECTURES]
    if unsupported:
        raise ValueError(
            f"DeepSpec checkpoints with architecture {unsupported[0]} are not supported yet by dspark_hf; "
            f"only {DEEPSPEC_ARCHITECTURE} (Qwen3-layout drafters) can be loaded."
        )
    if DEEPSPEC_ARCHITECTURE not in architectures:
        raise ValueError(
            f"Not a DSpark checkpoint: model_type={config_dict.get('model_type')!r}, "
            f"architectures={architectures}; expected model_type 'dspark' or {DEEPSPEC_ARCHITECTURE}."
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


def to_native_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """DSparkConfig fields of a native, DeepSpec or speculators config.json (a ValueError for other ones)."""
    if "speculators_model_type" in config_dict:
        return speculators_to_native_dict(config_dict)
    if config_dict.get("model_type") != DSparkConfig.model_type:
        return deepspec_to_native_dict(config_dict)
    return config_dict


def is_foreign_dspark_config(config_dict: dict[str, Any]) -> bool:
    """Whether a config.json is a DSpark drafter in DeepSpec's or speculators' layout."""
    return config_dict.get("speculators_model_type") == "dspark" or DEEPSPEC_ARCHITECTURE in (
        config_dict.get("architectures") or []
    )


def route_foreign_checkpoints_in_auto_config() -> None:
    """Make `AutoConfig.from_pretrained` (hence `AutoModel`) return a DSparkConfig for DeepSpec and
    speculators DSpark folders.

    Their config.json names no model type transformers could route (DeepSpec's says `qwen3`, speculators'
    has none), and transformers offers no hook, so this wraps `AutoConfig.from_pretrained` once, globally:
    only configs that `is_foreign_dspark_config` recognises are redirected, every other call is unchanged.
    """
    original = AutoConfig.from_pretrained.__func__
    if getattr(original, "routes_dspark_checkpoints", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        try:
            raw, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
        except (OSError, ValueError):
            raw = {}  # the original call raises the proper error
        if is_foreign_dspark_config(raw):
            for key in ("trust_remote_code", "code_revision"):
                kwargs.pop(key, None)
            return DSparkConfig.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained.routes_dspark_checkpoints = True
    AutoConfig.from_pretrained = classmethod(from_pretrained)


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


__all__ = [
    "DSparkConfig",
    "default_target_layer_ids",
    "route_foreign_checkpoints_in_auto_config",
    "deepspec_to_native_dict",
    "speculators_to_native_dict",
    "to_native_dict",
    "is_foreign_dspark_config",
]
