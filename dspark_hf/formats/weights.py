"""Which tensors each checkpoint layout stores, shared by the serving formats.

All three layouts (native, DeepSpec, speculators) use dspark_hf's parameter names. They differ in what they
keep: speculators omits the copies of the target's embedding and (for a full vocabulary) of its LM head,
which a loader takes from the verifier; and the serving formats store a draft sub-vocabulary the way EAGLE-3
drafters do, so that engines read it: `lm_head` and `markov_head.markov_w2` hold only the draft rows,
`d2t[i]` is the offset from draft index i to its target id (`target_id = i + d2t[i]`) and `t2d` is a boolean
mask over the target vocabulary. The native layout keeps full-vocabulary rows plus `draft_vocab_ids`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedConfig
from transformers.utils import logging

from ..errors import InputError, check_model_source, check_safetensors_files, is_local_path, read_json_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..configuration_dspark import DSparkConfig

logger = logging.get_logger(__name__)

# Tensors with one row per vocabulary entry that a serving format restricts to the draft vocabulary.
DRAFT_ROW_WEIGHTS = ("lm_head.weight", "markov_head.markov_w2.weight")
# Copies of the target's tensors (frozen in the drafter).
TARGET_COPY_WEIGHTS = ("embed_tokens.weight", "lm_head.weight")
# Where each layout keeps a draft sub-vocabulary.
NATIVE_VOCAB_BUFFER = "draft_vocab_ids"
VOCAB_MAPPING_BUFFERS = ("d2t", "t2d")


def vocab_mappings(draft_vocab_ids: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """EAGLE-3's `d2t` (int64 offsets, one per draft id) and `t2d` (bool mask over the target vocabulary)."""
    ids = draft_vocab_ids.detach().cpu().long()
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return {"d2t": ids - torch.arange(ids.numel()), "t2d": t2d}


def draft_vocab_from_mappings(d2t: torch.Tensor, t2d: torch.Tensor | None = None) -> torch.LongTensor:
    """The sorted target ids of a draft vocabulary stored as `d2t` offsets; a ValueError when `t2d` (if
    given) marks other ids or the ids are not strictly increasing (the order the stored rows follow)."""
    ids = d2t.long() + torch.arange(d2t.numel())
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("d2t does not describe strictly increasing target ids.")
    if t2d is not None and not torch.equal(t2d.bool().nonzero().flatten(), ids):
        raise ValueError("t2d and d2t describe different draft vocabularies.")
    return ids


def serving_state_dict(
    state_dict: dict[str, torch.Tensor], vocab_size: int, omit: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """A native state dict as a serving format stores it: `omit` dropped, a draft vocabulary as draft rows
    plus `d2t` / `t2d`.

    Rows of `lm_head` and Markov W2 outside the draft vocabulary are not stored (a native drafter only uses
    them to draft a prompt's own tokens, which `extend_draft_vocab_with_prompt` adds).
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k not in omit}
    draft_ids = tensors.pop(NATIVE_VOCAB_BUFFER, None)
    if draft_ids is not None:
        for name in DRAFT_ROW_WEIGHTS:
            if name in tensors:
                tensors[name] = tensors[name][draft_ids].contiguous()
        tensors.update(vocab_mappings(draft_ids, vocab_size))
    return tensors


def write_serving_folder(
    out_dir: str | os.PathLike, config_dict: dict, tensors: dict[str, torch.Tensor]
) -> Path:
    """The two files of a serving layout: config.json (sorted keys) and model.safetensors."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def native_state_dict(
    tensors: dict[str, torch.Tensor], config: DSparkConfig, target_copies: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The inverse of `serving_state_dict`: full-vocabulary rows and `draft_vocab_ids` again.

    `target_copies` (from `target_copy_tensors`) fills the embedding and LM head a checkpoint omits, and the
    LM-head rows outside a draft vocabulary. Markov W2 rows outside it are zero: the drafter never drafts
    those ids (`extend_draft_vocab_with_prompt` is off after such an import).
    """
    tensors = dict(tensors)
    copies = target_copies or {}
    mappings = [tensors.pop(name, None) for name in VOCAB_MAPPING_BUFFERS]
    if mappings[0] is not None:
        draft_ids = draft_vocab_from_mappings(*mappings)
        for name in DRAFT_ROW_WEIGHTS:
            if name not in tensors:
                continue
            rows = tensors[name]
            full = copies.get(name)
            full = rows.new_zeros(config.vocab_size, rows.shape[1]) if full is None else full.to(rows).clone()
            full[draft_ids] = rows
            tensors[name] = full
        tensors[NATIVE_VOCAB_BUFFER] = draft_ids
        if "lm_head.weight" not in copies:
            logger.warning(
                "No verifier given: the LM-head rows outside the draft vocabulary are zero (pass `verifier=` "
                "to copy the target's)."
            )
    missing = [name for name in TARGET_COPY_WEIGHTS if name not in tensors]
    absent = [name for name in missing if name not in copies]
    if absent:
        raise ValueError(
            f"The checkpoint omits {absent}, copies of the target's weights (speculators, and a native "
            "folder saved without them, take them from the verifier); pass `verifier=` (the target model or "
            "its folder / Hub id)."
        )
    dtype = tensors["fc.weight"].dtype  # the checkpoint's own precision, not the verifier's
    # Copies of their own: a target with tied embeddings hands over one tensor for both.
    tensors.update({name: copies[name].to(dtype, copy=True) for name in missing})
    return tensors


def read_config_dict(path: str | os.PathLike, what: str = "checkpoint folder", **kwargs) -> dict:
    """The raw config.json of a local folder or Hub repo, untranslated. A local folder (`is_local_path`) that
    is missing, holds no config.json or a malformed one, or truncated safetensors files raises an InputError
    naming it as `what`."""
    if is_local_path(path):
        check_model_source(path, what)
        return read_json_file(Path(path).expanduser() / "config.json")
    return PreTrainedConfig.get_config_dict(str(path), **kwargs)[0]


def load_folder_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files; an InputError names a truncated one."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} holds no safetensors weights.")
    check_safetensors_files(files)
    return {name: t for f in files for name, t in load_file(f).items()}


def omits_target_copies(folder: str | os.PathLike) -> bool:
    """Whether a local folder's safetensors files lack a copy of the target's embedding or LM head (read from
    their headers only): a drafter saved without them, e.g. to keep every file small, since the target holds
    them anyway."""
    stored = set()
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            stored.update(f.keys())
    return any(name not in stored for name in TARGET_COPY_WEIGHTS)


def target_copy_tensors(verifier: PreTrainedModel | str | os.PathLike) -> dict[str, torch.Tensor]:
    """The target's input embedding and LM head (its embedding when tied), from a model or a folder/Hub id."""
    if not isinstance(verifier, (str, os.PathLike)):
        return {
            "embed_tokens.weight": verifier.get_input_embeddings().weight.detach().cpu(),
            "lm_head.weight": verifier.get_output_embeddings().weight.detach().cpu(),
        }
    check_model_source(verifier, "verifier")
    folder = Path(verifier).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(verifier), allow_patterns=["*.json", "*.safetensors"]))
    tensors = load_folder_tensors(folder)
    found = {}
    for name in TARGET_COPY_WEIGHTS:
        matches = [key for key in tensors if key == name or key.endswith(f".{name}")]
        if matches:
            found[name] = tensors[min(matches, key=len)]
    if "embed_tokens.weight" not in found:
        raise ValueError(f"{verifier} holds no embed_tokens weight: not a causal-LM target folder.")
    found.setdefault("lm_head.weight", found["embed_tokens.weight"])
    return found


def write_native_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: DSparkConfig,
    verifier: PreTrainedModel | str | os.PathLike | None = None,
) -> Path:
    """Write the checkpoint folder `src`, whose config translates to `config`, as a native folder
    (config.json, model.safetensors).

    `verifier` defaults to the target the checkpoint records (speculators' `verifier.name_or_path`) when that
    is needed and resolvable.
    """
    tensors = load_folder_tensors(src)
    needs_copies = any(name not in tensors for name in TARGET_COPY_WEIGHTS) or "d2t" in tensors
    if verifier is None and needs_copies and config.target_model_name_or_path:
        verifier = config.target_model_name_or_path
    copies = target_copy_tensors(verifier) if verifier is not None else None
    tensors = native_state_dict(tensors, config, copies)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dst)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"}
    )
    return dst


__all__ = [
    "vocab_mappings",
    "draft_vocab_from_mappings",
    "serving_state_dict",
    "write_serving_folder",
    "native_state_dict",
    "read_config_dict",
    "load_folder_tensors",
    "omits_target_copies",
    "target_copy_tensors",
    "write_native_folder",
]
