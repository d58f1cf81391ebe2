"""DeepSpec interop: DeepSpec checkpoints load natively; native drafters export to DeepSpec's layout.

Parameter names are identical in both layouts, so conversion is a config translation plus a copy of the
safetensors weights. DeepSpec's layout is the one inference engines serve (vLLM `method: dspark`, SGLang
`--speculative-algorithm DSPARK`); the native layout is the one transformers loads with `import dspark_hf`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from safetensors.torch import save_file

from .configuration_dspark import DEEPSPEC_ARCHITECTURE, DSparkConfig, deepspec_to_native_dict
from .modeling_dspark import DSparkForCausalLM

Layout = Literal["native", "deepspec"]
LAYOUTS: tuple[Layout, ...] = ("native", "deepspec")


def export_deepspec(drafter: DSparkForCausalLM, out_dir: str | Path, num_anchors: int | None = None) -> Path:
    """Write `drafter` in DeepSpec's layout (config.json + model.safetensors), which vLLM and SGLang serve."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = drafter.config.to_deepspec_dict(num_anchors=num_anchors)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # The draft sub-vocabulary is a native drafting option that DeepSpec's layout has no place for.
    tensors = {
        name: t.detach().contiguous().cpu()
        for name, t in drafter.state_dict().items()
        if name != "draft_vocab_ids"
    }
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def convert_deepspec_to_native(deepspec_dir: str | Path, out_dir: str | Path) -> Path:
    """Load a DeepSpec checkpoint folder and save it as a native dspark_hf drafter (with its model card)."""
    drafter = DSparkForCausalLM.from_pretrained(deepspec_dir)
    drafter.save_pretrained(out_dir)
    return Path(out_dir)


def is_deepspec_checkpoint(path: str | Path) -> bool:
    config = json.loads((Path(path) / "config.json").read_text())
    return DEEPSPEC_ARCHITECTURE in (config.get("architectures") or [])


def detect_layout(path: str | Path) -> Layout:
    """`"native"` or `"deepspec"`; a ValueError says what is wrong with any other folder (e.g. Gemma4)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} holds no config.json: not a drafter checkpoint folder.")
    config = json.loads(config_file.read_text())
    if config.get("model_type") == DSparkConfig.model_type:
        return "native"
    deepspec_to_native_dict(config)  # raises for layouts that are not (supported) DSpark drafters
    return "deepspec"


def convert_checkpoint(src: str | Path, dst: str | Path, to: Layout | None = None) -> Path:
    """Convert a drafter folder to the other layout (or to `to`); returns `dst`.

    DeepSpec -> native gives a folder `AutoModel.from_pretrained` loads after `import dspark_hf`;
    native -> DeepSpec gives the folder inference engines serve.
    """
    if to is not None and to not in LAYOUTS:
        raise ValueError(f"to must be one of {LAYOUTS}, got {to!r}.")
    source = detect_layout(src)
    to = to or ("native" if source == "deepspec" else "deepspec")
    if to == source:
        raise ValueError(f"{src} is already a {source}-layout checkpoint; nothing to convert.")
    if Path(dst).resolve() == Path(src).resolve():
        raise ValueError("The destination must differ from the source folder.")
    if to == "native":
        return convert_deepspec_to_native(src, dst)
    return export_deepspec(DSparkForCausalLM.from_pretrained(src), dst)


def serving_instructions(config: DSparkConfig, deepspec_dir: str | Path) -> str:
    """Engine commands that serve the DeepSpec-layout folder `deepspec_dir` as the drafter of its target.

    Flags as in vLLM's speculative config (`method: dspark`) and SGLang's server arguments
    (`--speculative-algorithm DSPARK`, `--speculative-dspark-block-size`); both engines draft
    `block_size` tokens per round with these drafters.
    """
    target = config.target_model_name_or_path or "<target model>"
    spec = json.dumps(
        {"method": "dspark", "model": str(deepspec_dir), "num_speculative_tokens": config.block_size}
    )
    lines = [
        f"Serve {deepspec_dir} as the drafter of {target}:",
        "",
        "  vLLM:",
        f"    vllm serve {target} \\",
        f"      --speculative-config '{spec}'",
        "",
        "  SGLang:",
        f"    python -m sglang.launch_server --model-path {target} \\",
        f"      --speculative-algorithm DSPARK --speculative-draft-model-path {deepspec_dir} \\",
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
    "export_deepspec",
    "convert_deepspec_to_native",
    "is_deepspec_checkpoint",
    "detect_layout",
    "convert_checkpoint",
    "serving_instructions",
]
