"""Named training recipes: what a drafter is and how it learns, for DSpark and its DFlash ablations.

Every result names the recipe it used, so a DSpark-vs-DFlash comparison says which DFlash it means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """`drafter` overrides go to `DSparkForCausalLM.from_target`, `training` ones to
    `DSparkTrainingArguments`."""

    name: str
    description: str
    drafter: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("dspark", "DSpark: Markov and confidence heads, CE 0.1 + L1 0.9 (+ confidence BCE)"),
        Recipe(
            "dflash",
            "DeepSpec's DFlash recipe: parallel backbone only (no Markov or confidence head), CE 1.0, L1 0.0",
            drafter={"markov_rank": 0, "enable_confidence_head": False},
            training={"ce_weight": 1.0, "l1_weight": 0.0},
        ),
        Recipe(
            "dflash_same_recipe",
            "DFlash ablation with DSpark's recipe: markov_rank 0, otherwise as dspark",
            drafter={"markov_rank": 0},
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose from {sorted(RECIPES)}.")
    return RECIPES[name]


__all__ = ["RECIPES", "Recipe", "get_recipe"]
