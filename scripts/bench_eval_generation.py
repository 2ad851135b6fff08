"""Time the eval stage's generation of a trained stage at several batch sizes, and check the answers agree.

    python scripts/bench_eval_generation.py runs/quickstart/sft --prompts 96 --batch-sizes 32 16 8 p32

Each setting answers the same first ``--prompts`` prompts of the eval file with ``pipeline.inference.generate``
(greedy, adapter merged, as the eval stage does); ``pN`` means padded batches of N instead of continuous
batching. One JSON line per setting: seconds, new tokens, tokens/s and how many answers equal the first
setting's. Settings run in sequence in one process: compare them within one run (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation import load_prompts  # noqa: E402
from pipeline.inference import generate, load  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", help="a finished sft or dpo stage directory")
    parser.add_argument("--eval-prompts", default="data/eval_prompts.jsonl")
    parser.add_argument("--prompts", type=int, default=96, help="how many of the eval prompts")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--batch-sizes", nargs="+", default=["32", "16", "8", "p32"],
                        help="continuous batching at N, or pN for padded batches of N")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.stage, merge=True)
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in load_prompts(args.eval_prompts, args.prompts)]
    generate(model, tokenizer, conversations[:4], max_new_tokens=8, batch_size=4)  # warm-up: one-off allocations
    first = None
    for setting in args.batch_sizes:
        started = time.perf_counter()
        answers = generate(model, tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                           batch_size=int(setting.lstrip("p")), continuous=not setting.startswith("p"))
        seconds = time.perf_counter() - started
        tokens = sum(a["new_tokens"] for a in answers)
        same = None if first is None else sum(a["text"] == b["text"] for a, b in zip(first, answers, strict=True))
        first = first or answers
        print(json.dumps({"setting": setting, "seconds": round(seconds, 2), "new_tokens": tokens,
                          "tokens_per_s": round(tokens / seconds, 1), "same_answers_as_first": same}), flush=True)


if __name__ == "__main__":
    main()
