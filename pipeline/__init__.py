"""Turn a small open base language model into an instruct model: prepare → SFT (LoRA) → DPO → eval."""

__version__ = "0.1.0"
