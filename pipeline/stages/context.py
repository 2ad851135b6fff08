"""The object every stage receives from the runner: the recipe, its own directory and its upstreams."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.config import Recipe


@dataclasses.dataclass
class StageContext:
    recipe: Recipe
    stage: str
    stage_dir: Path
    upstream: dict[str, dict[str, Any]]  # name -> manifest of each completed upstream stage
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # stage facts for the manifest

    def upstream_dir(self, name: str) -> Path:
        return self.recipe.stage_dir(name)
