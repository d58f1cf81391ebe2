"""DeepSpec interop: DeepSpec checkpoints load natively; native drafters export to DeepSpec's layout.

Parameter names are identical in both layouts, so conversion is a config translation plus a copy of the
safetensors weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from .configuration_dspark import DEEPSPEC_ARCHITECTURE
from .modeling_dspark import DSparkForCausalLM


def export_deepspec(drafter: DSparkForCausalLM, out_dir: str | Path, num_anchors: int | None = None) -> Path:
    """Write `drafter` in DeepSpec's layout (config.json + model.safetensors), served by vLLM and SGLang."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = drafter.config.to_deepspec_dict(num_anchors=num_anchors)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {name: t.detach().contiguous().cpu() for name, t in drafter.state_dict().items()}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def convert_deepspec_to_native(deepspec_dir: str | Path, out_dir: str | Path) -> Path:
    """Load a DeepSpec checkpoint folder and save it as a native dspark_hf drafter."""
    drafter = DSparkForCausalLM.from_pretrained(deepspec_dir)
    drafter.save_pretrained(out_dir)
    return Path(out_dir)


def is_deepspec_checkpoint(path: str | Path) -> bool:
    config = json.loads((Path(path) / "config.json").read_text())
    return DEEPSPEC_ARCHITECTURE in (config.get("architectures") or [])


__all__ = ["export_deepspec", "convert_deepspec_to_native", "is_deepspec_checkpoint"]
