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
from pathlib import Path
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


def _gpu_budget(args: argparse.Namespace) -> tuple[float | None, str]:
    """The memory to compare against: --gpu-memory, else the first visible GPU's total, else none."""
    from pipeline.launch_plan import parse_memory

    if args.gpu_memory:
        return parse_memory(args.gpu_memory), "--gpu-memory"
    import torch  # already imported by the recipe validation (TRL)

    if torch.cuda.is_available():
        _, total = torch.cuda.mem_get_info(0)
        return total, f"GPU 0: {torch.cuda.get_device_name(0)}"
    return None, "no GPU visible; compare with --gpu-memory 24GiB"


def _describe_source(source: dict[str, Any]) -> str:
    extras = ", ".join(f"{k} {v}" for k, v in source.items() if k != "path")
    path = Path(source["path"])
    where = (f"local file, {path.stat().st_size / 1e6:.1f} MB" if path.is_file() else
             "local directory" if path.is_dir() else
             "not a local file: prepare reads it from the Hugging Face Hub (offline: from the datasets cache)")
    return f"{source['path']}" + (f" [{extras}]" if extras else "") + f" - {where}"


def _dry_run(args: argparse.Namespace) -> int:
    """Print the launch plan: stages and what would happen to each, and the memory estimate. Writes nothing."""
    from pipeline.config import load_recipe
    from pipeline.launch_plan import ModelShape, render_estimate
    from pipeline.model_config import read_model_config
    from pipeline.runner import plan_recipe

    recipe = load_recipe(args.recipe, args.set)
    lookup = read_model_config(recipe.model)
    print(f"Launch plan for {args.recipe} (name {recipe.name}, output {recipe.output_dir}); dry run: nothing is "
          "loaded or written.")
    print(f"Model: {recipe.model['name_or_path']}" + (" (4-bit QLoRA)" if recipe.model["load_in_4bit"] else ""))
    shape = ModelShape.from_config(lookup.config) if lookup.config is not None else None
    if shape is not None:
        print(f"  {shape.describe()}")
    print(f"  config: {lookup.source}")
    for kind in ("sft", "dpo"):
        for source in recipe.data[kind]:
            print(f"Data {kind}: {_describe_source(source)}")
    plans = plan_recipe(recipe, stage=args.stage, from_stage=args.from_stage, force=args.force,
                        model_resolvable=lookup.resolvable)
    print("Stages:")
    for plan in plans:
        fp = f"  (fingerprint {plan.fingerprint})" if plan.fingerprint else ""
        print(f"  {plan.stage:<8}{plan.action:<14}{plan.reason}{fp}")
    device = "cpu" if recipe.model["device"] == "cpu" else "cuda"
    if shape is None:
        print(f"Memory estimate: needs the model's config.json, and this dry run neither downloads nor converts: "
              f"{lookup.source}. The stage plan above does not need it.")
        return 2 if any(p.action == "blocked" for p in plans) else 0
    budget, budget_source = _gpu_budget(args)
    if recipe.sft is None and recipe.dpo is None:
        print("Memory estimate: the recipe has no training stage.")
        return 0
    print(f"Memory estimate per training stage ({'one GPU' if device == 'cuda' else 'CPU'}, upper bound: every "
          f"sequence at max_length; {budget_source if budget is None else 'against ' + budget_source}):")
    lines, fits = render_estimate(recipe, shape, budget, budget_source, device)
    print("\n".join(lines))
    if any(p.action == "blocked" for p in plans):
        return 2
    return 0 if fits else 3


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
    parser.add_argument("--dry-run", action="store_true",
                        help="print the launch plan (stages to run/resume/skip, memory estimate) and exit; "
                             "loads no model and writes nothing")
    parser.add_argument("--gpu-memory", metavar="SIZE",
                        help="with --dry-run: compare the estimate against this much GPU memory, e.g. 24GiB")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    args = parser.parse_args(argv)
    if args.gpu_memory and not args.dry_run:
        parser.error("--gpu-memory goes with --dry-run")
    return _guarded(_dry_run if args.dry_run else _run, args)


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
