"""Conversion between the native, DeepSpec and speculators layouts, and the engine commands that serve them.

Parameter names are identical in all layouts, so conversion is a config translation plus the tensor
differences in `weight_layouts`. DeepSpec's layout is the one vLLM (`method: dspark`) and SGLang
(`--speculative-algorithm DSPARK`) serve; speculators' format is the one `vllm serve <folder>` reads; the
native layout is the one transformers loads with `import dspark_hf` (which also loads the other two).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import PreTrainedModel

from ..configuration_dspark import DEEPSPEC_ARCHITECTURE, DSparkConfig
from ..modeling_dspark import DSparkForCausalLM
from .speculators import export_speculators
from .weights import Layout, config_layout, serving_state_dict, write_serving_folder

LAYOUTS: tuple[Layout, ...] = ("native", "deepspec", "speculators")


def export_deepspec(drafter: DSparkForCausalLM, out_dir: str | Path, num_anchors: int | None = None) -> Path:
    """Write `drafter` in DeepSpec's layout (config.json + model.safetensors), which vLLM and SGLang serve.

    A draft sub-vocabulary is stored as engines read EAGLE-3 drafters' (`draft_vocab_size`, draft rows of
    `lm_head` and Markov W2, `d2t` / `t2d`; see `weight_layouts`).
    """
    config = drafter.config.to_deepspec_dict(num_anchors=num_anchors)
    tensors = serving_state_dict(drafter.state_dict(), drafter.config.vocab_size)
    return write_serving_folder(out_dir, config, tensors)


def is_deepspec_checkpoint(path: str | Path) -> bool:
    config = json.loads((Path(path) / "config.json").read_text())
    return DEEPSPEC_ARCHITECTURE in (config.get("architectures") or [])


def detect_layout(path: str | Path) -> Layout:
    """`"native"`, `"deepspec"` or `"speculators"`; a ValueError says what is wrong with any other folder."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} holds no config.json: not a drafter checkpoint folder.")
    return config_layout(json.loads(config_file.read_text()))


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: Layout | None = None,
    verifier: PreTrainedModel | str | os.PathLike | None = None,
) -> Path:
    """Convert a drafter folder to another layout; returns `dst`.

    By default a native folder becomes DeepSpec's layout and any other one the native layout, which
    `AutoModel.from_pretrained` loads after `import dspark_hf`. `verifier` (the target, or its folder / Hub
    id) supplies the weights a speculators checkpoint omits, and is the verifier a speculators export
    records (default: the drafter's `target_model_name_or_path`).
    """
    if to is not None and to not in LAYOUTS:
        raise ValueError(f"to must be one of {LAYOUTS}, got {to!r}.")
    source = detect_layout(src)
    to = to or ("deepspec" if source == "native" else "native")
    if to == source:
        raise ValueError(f"{src} is already a {source}-layout checkpoint; nothing to convert.")
    if Path(dst).resolve() == Path(src).resolve():
        raise ValueError("The destination must differ from the source folder.")
    drafter = DSparkForCausalLM.from_pretrained(src, verifier=verifier)
    if to == "native":
        drafter.save_pretrained(dst)
    elif to == "deepspec":
        export_deepspec(drafter, dst)
    else:
        export_speculators(drafter, dst, verifier if isinstance(verifier, (str, os.PathLike)) else None)
    return Path(dst)


def serving_instructions(config: DSparkConfig, folder: str | Path, layout: Layout = "deepspec") -> str:
    """Engine commands that serve `folder` (DeepSpec's or speculators' layout) as the drafter of its target.

    DeepSpec's layout: flags as in vLLM's speculative config (`method: dspark`) and SGLang's server arguments
    (`--speculative-algorithm DSPARK`, `--speculative-dspark-block-size`); both engines draft `block_size`
    tokens per round with these drafters. speculators' format: `vllm serve <folder>` reads the algorithm and
    the verifier from the checkpoint's `speculators_config`; SGLang is pointed to DeepSpec's layout.
    """
    target = config.target_model_name_or_path or "<target model>"
    if layout == "speculators":
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
    else:
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
    lines += [f"\nNote: {note}" for note in notes]
    return "\n".join(lines)


__all__ = [
    "LAYOUTS",
    "export_deepspec",
    "is_deepspec_checkpoint",
    "detect_layout",
    "convert_checkpoint",
    "serving_instructions",
]
