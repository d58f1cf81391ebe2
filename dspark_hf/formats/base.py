"""The interface every checkpoint layout implements. `registry.FORMATS` lists the layouts, so a new layout is
one module with a `CheckpointFormat` subclass plus one line there."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..configuration_dspark import DSparkConfig


class CheckpointFormat(ABC):
    """One checkpoint layout of a DSpark drafter: how to recognise its config.json, translate it into
    `DSparkConfig` fields, write a drafter in it, and serve it.

    All layouts use dspark_hf's parameter names; what differs in the tensors is handled by `weights`.
    """

    name: ClassVar[str]
    # What a config.json of this layout carries, for the error that names the layouts dspark_hf reads.
    signature: ClassVar[str]
    # Whether inference engines (vLLM, SGLang) serve this layout.
    served_by_engines: ClassVar[bool] = True

    @abstractmethod
    def detect(self, config_dict: dict[str, Any]) -> bool:
        """Whether a config.json claims this layout (`to_native_config` then says if it is usable)."""

    @abstractmethod
    def to_native_config(self, config_dict: dict[str, Any]) -> dict[str, Any]:
        """`DSparkConfig` fields of a config.json in this layout; a ValueError for variants dspark_hf cannot
        represent, so that a wrong checkpoint never loads silently."""

    def needs_tensor_translation(self, config_dict: dict[str, Any]) -> bool:
        """Whether the checkpoint's tensors differ from the native state dict (beyond the config)."""
        return False

    @abstractmethod
    def export(
        self, drafter: PreTrainedModel, out_dir: str | os.PathLike, verifier_name_or_path: str | None = None
    ) -> Path:
        """Write `drafter` (a `DSparkForCausalLM`) in this layout; `verifier_name_or_path` is the target a
        layout records, if it records one. Returns `out_dir`."""

    @abstractmethod
    def serving_instructions(self, config: DSparkConfig, folder: str | os.PathLike) -> str:
        """How to serve (or load) `folder`, a checkpoint in this layout, as the drafter of its target."""

    def loading_instruction(self, folder: str | os.PathLike) -> str:
        """The transformers call that loads `folder`."""
        return f'import dspark_hf; dspark_hf.DSparkForCausalLM.from_pretrained("{folder}")'


def engine_support_notes(config: DSparkConfig) -> list[str]:
    """What the engines' DSpark drafters (vLLM, SGLang) do not serve of this drafter, one note each."""
    notes = []
    if config.markov_rank == 0:
        notes.append("markov_rank = 0 (no Markov head): vLLM's DSpark drafter always builds a Markov head.")
    elif config.markov_head_type != "vanilla":
        notes.append(
            f"the {config.markov_head_type} Markov head is not served by the engines' Qwen3 DSpark drafters, "
            "which load the vanilla head (markov_w1, markov_w2) only."
        )
    if config.enable_confidence_head and not config.confidence_head_with_markov:
        notes.append("SGLang's Qwen3 DSpark drafter requires confidence_head_with_markov = true.")
    return [f"\nNote: {note}" for note in notes]


__all__ = ["CheckpointFormat", "engine_support_notes"]
