"""Command-line entry points (``scripts/*.py`` and the ``instruct-*`` console scripts).

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
    from pipeline.config import load_recipe
    from pipeline.runner import run_recipe

    recipe = load_recipe(args.recipe, args.set)
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    outcomes = run_recipe(recipe, stage=args.stage, from_stage=args.from_stage, force=args.force)
    done = ", ".join(f"{o.stage}: {o.action}" for o in outcomes)
    print(f"finished {recipe.name} in {recipe.output_dir} ({done})")
    return 0


def main_run_recipe(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a fine-tuning recipe: prepare → sft → dpo → eval.")
    parser.add_argument("recipe", help="path to a YAML recipe")
    parser.add_argument("--stage", help="run (or resume) only this stage")
    parser.add_argument("--from", dest="from_stage", help="re-run this stage and every stage after it")
    parser.add_argument("--force", action="store_true", help="re-run selected stages even if up to date")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value (repeatable), e.g. --set sft.learning_rate=1e-4")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return _guarded(_run, parser.parse_args(argv))


def _chat(args: argparse.Namespace) -> int:
    from pipeline.inference import load_model, stream

    model, tokenizer = load_model(args.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = list(system)

    def answer(prompt: str) -> None:
        history.append({"role": "user", "content": prompt})
        pieces = []
        for piece in stream(model, tokenizer, history, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(pieces).strip()})

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    print(f"Chatting with {args.model}. Empty line or Ctrl-D quits; /reset starts a new conversation.", flush=True)
    while True:
        try:
            prompt = input("> ").strip()
        except EOFError:
            return 0
        if not prompt:
            return 0
        if prompt == "/reset":
            history[:] = system  # the system prompt stays
            print("(history cleared)", flush=True)
            continue
        answer(prompt)


def main_chat(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a trained stage or an export (streaming, multi-turn).")
    parser.add_argument("model", help="an sft/dpo stage directory (e.g. runs/quickstart/dpo), a merged export "
                                      "directory, or a .gguf export")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--system", help="system prompt (kept across /reset)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 (default) answers greedily")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                                                                 "whose probabilities add up to this (with --temperature)")
    parser.add_argument("--seed", type=int, help="seed for sampling (repeatable answers)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--debug", action="store_true")
    return _guarded(_chat, parser.parse_args(argv))


def _export(args: argparse.Namespace) -> int:
    from pipeline.export import export

    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    export(args.stage_dir, args.out_dir, fmt=args.format, dtype=args.dtype, quant=args.quant, force=args.force,
           check=not args.no_check, max_shard_size=args.max_shard_size)
    return 0


def main_export(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export a trained stage as a merged checkpoint or a GGUF, checked by reading it back.")
    parser.add_argument("stage_dir", help="an sft or dpo stage directory (e.g. runs/quickstart/dpo)")
    parser.add_argument("out_dir", help="directory to write (must be empty or absent unless --force)")
    parser.add_argument("--format", choices=("merged", "gguf"), required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="stored precision (merged default: bfloat16; gguf default: float16)")
    parser.add_argument("--quant", help="GGUF quantisation instead of --dtype: q8_0")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--no-check", action="store_true", help="skip the round-trip check (not recommended)")
    parser.add_argument("--max-shard-size", default="2GB", help="merged: largest safetensors shard (default 2GB)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return _guarded(_export, parser.parse_args(argv))
