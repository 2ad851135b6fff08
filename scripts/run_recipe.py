"""Run a recipe's stages: prepare → sft → dpo → eval.

    python scripts/run_recipe.py recipes/quickstart.yaml
    python scripts/run_recipe.py recipes/quickstart.yaml --stage dpo          # only this stage
    python scripts/run_recipe.py recipes/quickstart.yaml --from sft           # re-run sft and after
    python scripts/run_recipe.py recipes/quickstart.yaml --set sft.learning_rate=1e-4
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main_run_recipe  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_run_recipe())
