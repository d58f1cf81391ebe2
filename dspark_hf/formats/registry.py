"""The checkpoint layouts dspark_hf reads and writes, in one registry, and the functions that pick one.

Config loading (`load_config`, `DSparkForCausalLM.from_pretrained`), `convert_checkpoint` and the command line
all go through `FORMATS`; a new layout is one module with a `CheckpointFormat` plus one line here.

transformers routes a config.json by its `model_type`, which DeepSpec's layout sets to another model's
(`qwen3`) and speculators' leaves out, and it offers no hook for such files. So the routing is explicit:
`AutoConfig` / `AutoModel` load native folders (the package registers `model_type: dspark`) and behave as
without dspark_hf for every other folder; `load_config` and `DSparkForCausalLM.from_pretrained` load every
layout here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..configuration_dspark import DSparkConfig
from ..errors import InputError, check_model_source
from .base import CheckpointFormat
from .deepspec import DeepSpecFormat
from .native import NativeFormat
from .speculators import SpeculatorsFormat
from .weights import read_config_dict

FORMATS: dict[str, CheckpointFormat] = {
    layout.name: layout for layout in (NativeFormat(), DeepSpecFormat(), SpeculatorsFormat())
}
LAYOUTS: tuple[str, ...] = tuple(FORMATS)
NATIVE_LAYOUT = "native"
# The layout `convert_checkpoint` writes a native folder in when none is named: the one engines serve most.
DEFAULT_EXPORT_LAYOUT = "deepspec"


def get_format(layout: str) -> CheckpointFormat:
    """The registered format called `layout`; a ValueError names the registered ones."""
    if layout not in FORMATS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    return FORMATS[layout]


def format_of(config_dict: dict[str, Any]) -> CheckpointFormat:
    """The format of a config.json; a ValueError says what is wrong with a config no format reads (or with
    a variant of one that dspark_hf cannot represent)."""
    for layout in FORMATS.values():
        if layout.detect(config_dict):
            layout.to_native_config(config_dict)  # raises for variants dspark_hf cannot represent
            return layout
    expected = " or ".join(layout.signature for layout in FORMATS.values())
    raise InputError(
        f"Not a DSpark checkpoint: model_type={config_dict.get('model_type')!r}, "
        f"architectures={config_dict.get('architectures') or []}; expected {expected}."
    )


def native_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """`DSparkConfig` fields of a config.json in any registered layout."""
    return format_of(config_dict).to_native_config(config_dict)


def needs_translation(config_dict: dict[str, Any]) -> bool:
    """Whether a checkpoint's tensors differ from the native state dict (beyond the config)."""
    return format_of(config_dict).needs_tensor_translation(config_dict)


def detect_layout(path: str | os.PathLike) -> str:
    """The layout of a local drafter folder; a ValueError says what is wrong with any other folder."""
    return format_of(read_config_dict(Path(path), "drafter folder")).name


def load_config(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> DSparkConfig:
    """`DSparkConfig.from_pretrained` for a folder or Hub repo in any registered layout (the config.json is
    translated first); keyword arguments as there. A local folder that is missing or malformed raises an
    InputError naming what is wrong with it."""
    check_model_source(pretrained_model_name_or_path, "drafter folder")
    config_dict, kwargs = DSparkConfig.get_config_dict(pretrained_model_name_or_path, **kwargs)
    return DSparkConfig.from_dict(native_config_dict(config_dict), **kwargs)


__all__ = [
    "FORMATS",
    "LAYOUTS",
    "NATIVE_LAYOUT",
    "DEFAULT_EXPORT_LAYOUT",
    "get_format",
    "format_of",
    "native_config_dict",
    "needs_translation",
    "detect_layout",
    "load_config",
]
