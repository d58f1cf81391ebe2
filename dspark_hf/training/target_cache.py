"""A disk cache of the frozen target's hidden states, so that training epochs after the first skip the target.

Each training row's entry holds what the loss needs of the target at every position of the row: the
concatenated features of `target_layer_ids` and the final-norm hidden state (from which the target's LM head
gives its distribution at the supervised positions, over whatever vocabulary the step trains on). An entry
depends on the row's token ids, the target's weights, the captured layers and the precision only, so it is
keyed by a hash of the token ids inside a folder whose manifest records the rest: a folder made for another
target, other layers or another precision is refused with a message naming the difference. Tokenizer and
draft vocabulary do not enter what is stored (the ids are the key; the distribution is computed anew).

Entries are written to a temporary name and renamed into place, so an interrupted run never leaves a
half-written entry behind, and a later run resumes where it stopped. `max_size_gb` bounds the folder: past
it, new rows are computed online and not stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.utils import logging

logger = logging.get_logger(__name__)

MANIFEST = "target_cache.json"
FORMAT_VERSION = 1
# Elements hashed from the start of each target parameter for its fingerprint: cheap for a 14B target, and
# any fine-tune or other checkpoint changes them.
FINGERPRINT_ELEMENTS = 4096


def target_fingerprint(target: PreTrainedModel) -> str:
    """A hash of the target's config and of the first elements of each of its parameters."""
    digest = hashlib.sha256(target.config.to_json_string(use_diff=False).encode())
    for name, parameter in target.named_parameters():
        head = parameter.detach().reshape(-1)[:FINGERPRINT_ELEMENTS].float().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(parameter.shape)).encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()


def row_key(input_ids: torch.Tensor) -> str:
    """The entry name of a row: a hash of its token ids."""
    return hashlib.sha256(input_ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:32]


class TargetFeatureCache:
    """The cache folder of one (target, `target_layer_ids`, dtype); see the module docstring."""

    def __init__(
        self,
        directory: str | os.PathLike,
        target: PreTrainedModel,
        target_layer_ids: list[int],
        precision: str,
        max_size_gb: float,
    ):
        """`precision` names how the target computes (its dtype, autocast): entries are stored as computed."""
        self.directory = Path(directory)
        self.max_bytes = int(max_size_gb * 1024**3)
        self.manifest = {
            "format": FORMAT_VERSION,
            "target": target_fingerprint(target),
            "target_name_or_path": target.config.name_or_path,
            "target_layer_ids": [int(i) for i in target_layer_ids],
            "precision": precision,
        }
        self._check_or_write_manifest()
        self.size_bytes = sum(path.stat().st_size for path in self.directory.glob("*.safetensors"))
        self.hits = self.misses = 0

    def _check_or_write_manifest(self) -> None:
        path = self.directory / MANIFEST
        if path.exists():
            try:
                found = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path} is not valid JSON ({err}); delete the folder to rebuild it."
                ) from err
            for field in ("format", "target", "target_layer_ids", "precision"):
                if found.get(field) != self.manifest[field]:
                    what = "target weights or config" if field == "target" else field
                    raise ValueError(
                        f"target_cache_dir {self.directory} was made for another {what} "
                        f"({found.get(field)!r}, now {self.manifest[field]!r}); pass another folder or "
                        "delete this one."
                    )
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{MANIFEST}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(self.manifest, indent=2) + "\n")
        os.replace(temporary, path)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features [T, m*d], last hidden [T, d]) of the row `input_ids` [T], or None when not stored."""
        path = self._path(row_key(input_ids))
        if not path.exists():
            self.misses += 1
            return None
        self.hits += 1
        tensors = load_file(path)
        return tensors["features"], tensors["last_hidden"]

    def put(self, input_ids: torch.Tensor, features: torch.Tensor, last_hidden: torch.Tensor) -> bool:
        """Store a row's entry unless the folder is full; returns whether it was stored."""
        tensors = {
            "features": features.detach().cpu().contiguous(),
            "last_hidden": last_hidden.detach().cpu().contiguous(),
        }
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.size_bytes + size > self.max_bytes:
            return False
        path = self._path(row_key(input_ids))
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        save_file(tensors, temporary)
        os.replace(temporary, path)
        self.size_bytes += path.stat().st_size
        return True

    def stats(self) -> dict[str, float]:
        """This run's reads and the folder's size, for the training log."""
        return {
            "target_cache_hits": self.hits,
            "target_cache_misses": self.misses,
            "target_cache_gb": self.size_bytes / 1024**3,
        }

    def describe(self) -> str:
        entries = sum(1 for _ in self.directory.glob("*.safetensors"))
        return (
            f"target cache {self.directory}: {entries} rows, {self.size_bytes / 1024**3:.2f} GB of "
            f"{self.max_bytes / 1024**3:.1f} GB ({self.hits} hits, {self.misses} misses this run)"
        )


__all__ = ["TargetFeatureCache", "row_key", "target_fingerprint"]
