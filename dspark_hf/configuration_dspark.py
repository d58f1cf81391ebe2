"""Configuration of the DSpark drafter: its fields, defaults and validation.

Other checkpoint layouts translate their config.json into these fields in `dspark_hf.formats`.
"""

from __future__ import annotations

import copy
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .heads import MARKOV_HEADS


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
        `set_cost_profile` or `dspark calibrate --profile_cost`), which confidence scheduling weighs expected
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


__all__ = ["DSparkConfig", "default_target_layer_ids"]
