"""Conversion of a drafter folder from one registered layout to another (`dspark convert`)."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedModel

from ..modeling_dspark import DSparkForCausalLM
from .registry import DEFAULT_EXPORT_LAYOUT, LAYOUTS, NATIVE_LAYOUT, detect_layout, get_format


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str | None = None,
    verifier: PreTrainedModel | str | os.PathLike | None = None,
) -> Path:
    """Convert a drafter folder to another layout (one of `registry.LAYOUTS`); returns `dst`.

    By default a native folder becomes DeepSpec's layout, which the engines serve, and any other one the
    native layout, which `AutoModel.from_pretrained` loads after `import dspark_hf`. `verifier` (the target,
    or its folder / Hub id) supplies the weights a speculators checkpoint omits, and is the verifier a
    speculators export records (default: the drafter's `target_model_name_or_path`).
    """
    if to is not None and to not in LAYOUTS:
        raise ValueError(f"to must be one of {LAYOUTS}, got {to!r}.")
    source = detect_layout(src)
    to = to or (DEFAULT_EXPORT_LAYOUT if source == NATIVE_LAYOUT else NATIVE_LAYOUT)
    if to == source:
        raise ValueError(f"{src} is already a {source}-layout checkpoint; nothing to convert.")
    if Path(dst).resolve() == Path(src).resolve():
        raise ValueError("The destination must differ from the source folder.")
    drafter = DSparkForCausalLM.from_pretrained(src, verifier=verifier)
    recorded_verifier = verifier if isinstance(verifier, (str, os.PathLike)) else None
    return get_format(to).export(drafter, dst, None if recorded_verifier is None else str(recorded_verifier))


__all__ = ["convert_checkpoint"]
