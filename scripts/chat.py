"""Chat with a trained stage or an export: ``python scripts/chat.py runs/quickstart/dpo [--prompt "..."]``.

Also takes a merged export directory or a ``.gguf`` export; ``--system``, ``--temperature``, ``--top-p``; type
``/reset`` to start a new conversation.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main_chat  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_chat())
