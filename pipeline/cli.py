"""Command-line entry points (``scripts/*.py`` and the ``instruct-pipeline`` console script).

User errors (:class:`PipelineError`) print as one paragraph and exit 2, without a traceback unless
``--debug`` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from pipeline.errors import PipelineError


def _guarded(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.debug:  # bitsandbytes warns about optional CPU kernels on every import; irrelevant here
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        # Library deprecation notices (e.g. transformers' gradient→activation checkpointing rename) are for
        # developers of this project, not its users; --debug shows them.
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return main(args)
    except PipelineError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint.", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from pipeline.config import load_recipe
    from pipeline.runner import run_recipe

    recipe = load_recipe(args.recipe, args.set)
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    outcomes = run_recipe(recipe, stage=args.stage, from_stage=args.from_stage, force=args.force, verify=args.verify)
    done = ", ".join(f"{o.stage}: {o.action}" for o in outcomes)
    if PartialState().is_main_process:  # under `accelerate launch` the main process reports for all
        print(f"finished {recipe.name} in {recipe.output_dir} ({done})")
    return 0


def main_run_recipe(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a fine-tuning recipe: prepare → sft → dpo → eval.")
    parser.add_argument("recipe", help="path to a YAML recipe")
    parser.add_argument("--stage", help="run (or resume) only this stage")
    parser.add_argument("--from", dest="from_stage", help="re-run this stage and every stage after it")
    parser.add_argument("--force", action="store_true", help="re-run selected stages even if up to date")
    parser.add_argument("--verify", action="store_true",
                        help="check the sha256 of every file of the stages skipped as up to date (default: sizes)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value (repeatable), e.g. --set sft.learning_rate=1e-4")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return _guarded(_run, parser.parse_args(argv))


def _chat(args: argparse.Namespace) -> int:
    from pipeline.inference import load, stream

    model, tokenizer = load(args.stage_dir, merge=True)
    history: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []

    def answer(prompt: str) -> None:
        history.append({"role": "user", "content": prompt})
        pieces = []
        for piece in stream(model, tokenizer, history, max_new_tokens=args.max_new_tokens):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    print("Chatting with", args.stage_dir, "- empty line or Ctrl-D to quit, /reset to clear history.")
    while True:
        try:
            prompt = input("> ").strip()
        except EOFError:
            return 0
        if not prompt:
            return 0
        if prompt == "/reset":
            del history[int(bool(args.system)):]
            continue
        answer(prompt)


def main_chat(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a trained stage (streaming).")
    parser.add_argument("stage_dir", help="an sft or dpo stage directory, e.g. runs/quickstart/dpo")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--debug", action="store_true")
    return _guarded(_chat, parser.parse_args(argv))
