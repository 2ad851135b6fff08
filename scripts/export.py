"""Export a trained stage for serving, checked by reading it back.

    python scripts/export.py runs/quickstart/dpo exports/quickstart-merged --format merged
    python scripts/export.py runs/quickstart/dpo exports/quickstart-gguf --format gguf --quant q8_0
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main_export  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_export())
