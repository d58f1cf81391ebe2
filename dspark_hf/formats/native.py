"""dspark_hf's own layout (`model_type: dspark`): what `save_pretrained` writes and the Auto classes load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..configuration_dspark import DSparkConfig
from .base import CheckpointFormat

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class NativeFormat(CheckpointFormat):
    name = "native"
    signature = f"model_type {DSparkConfig.model_type!r}"
    served_by_engines = False

    def detect(self, config_dict: dict[str, Any]) -> bool:
        return config_dict.get("model_type") == DSparkConfig.model_type

    def to_native_config(self, config_dict: dict[str, Any]) -> dict[str, Any]:
        return config_dict

    def export(
        self, drafter: PreTrainedModel, out_dir: str | os.PathLike, verifier_name_or_path: str | None = None
    ) -> Path:
        drafter.save_pretrained(out_dir)
        return Path(out_dir)

    def serving_instructions(self, config: DSparkConfig, folder: str | os.PathLike) -> str:
        return (
            f"{folder} is in the native layout, which transformers loads "
            f"({self.loading_instruction(folder)}); engines serve the other layouts, which `dspark convert` "
            "writes."
        )

    def loading_instruction(self, folder: str | os.PathLike) -> str:
        return f'import dspark_hf; AutoModel.from_pretrained("{folder}")'


__all__ = ["NativeFormat"]
