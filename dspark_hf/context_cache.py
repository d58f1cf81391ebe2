"""The drafter's cache of projected target context, shared by the model's forward and the drafting loop."""

from __future__ import annotations

import torch


class DSparkContextCache:
    """Per-layer keys/values of the projected target context, so each round only pushes new positions.

    Block keys/values are never stored: a block is re-drafted every round, the context only grows.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def get_seq_length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[-2]

    def extend(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append context keys/values [B, H, C, D] of one layer; return the full cached context."""
        if self.keys[layer_idx] is not None:
            keys = torch.cat([self.keys[layer_idx], keys], dim=-2)
            values = torch.cat([self.values[layer_idx], values], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def crop(self, length: int) -> None:
        """Keep the first `length` context positions (drop positions the target rejected)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[..., :length, :], v[..., :length, :]


__all__ = ["DSparkContextCache"]
