"""Muon for the draft layers' weight matrices, AdamW for every other trainable parameter, as one optimizer.

Muon orthogonalises the momentum of a 2-D weight matrix (a few Newton-Schulz iterations) before the update;
it is meant for hidden matrices only, so embeddings, vocabulary-sized tables (the Markov head), norms, biases
and the confidence head keep AdamW. Both halves share the learning rate (Muon's is matched to AdamW's update
RMS), so one schedule drives them; the parameter groups are the inner optimizers' own dicts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MATRIX_OPTIMIZERS: tuple[str, ...] = ("adamw", "muon")
# Parameter name prefixes of the hidden matrices Muon updates.
MUON_MODULES = ("layers.", "fc.")


def is_hidden_matrix(name: str, parameter: torch.Tensor) -> bool:
    """Whether Muon updates this parameter: a 2-D weight of the draft layers or of the context projection."""
    name = name.removeprefix("base_model.model.")  # PEFT-wrapped drafters
    return parameter.ndim == 2 and name.startswith(MUON_MODULES)


class MuonAdamW(torch.optim.Optimizer):
    """Steps a `torch.optim.Muon` over the hidden matrices and a `torch.optim.AdamW` over the rest."""

    def __init__(self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], **adamw_kwargs):
        self.muon = torch.optim.Muon(muon_groups, adjust_lr_fn="match_rms_adamw") if muon_groups else None
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw_kwargs) if adamw_groups else None
        inner = [opt for opt in (self.muon, self.adamw) if opt is not None]
        super().__init__([group for opt in inner for group in opt.param_groups], defaults={})
        self._inner = inner

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self._inner:
            optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [optimizer.state_dict() for optimizer in self._inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optimizer, state in zip(self._inner, state_dict["inner"], strict=True):
            optimizer.load_state_dict(state)


def split_for_muon(
    model: nn.Module, groups: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`groups` (AdamW parameter groups over `model`) split into Muon groups and AdamW groups."""
    matrices = {id(p) for name, p in model.named_parameters() if is_hidden_matrix(name, p)}
    muon_groups, adamw_groups = [], []
    for group in groups:
        settings = {key: value for key, value in group.items() if key != "params"}
        for is_matrix, target in ((True, muon_groups), (False, adamw_groups)):
            params = [p for p in group["params"] if (id(p) in matrices) == is_matrix]
            if not params:
                continue
            if is_matrix:
                keep = ("lr", "weight_decay", "initial_lr")
                settings_for = {key: value for key, value in settings.items() if key in keep}
            else:
                settings_for = settings
            target.append({**settings_for, "params": params})
    return muon_groups, adamw_groups


__all__ = ["MATRIX_OPTIMIZERS", "MuonAdamW", "is_hidden_matrix", "split_for_muon"]
