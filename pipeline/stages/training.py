"""What the two training stages (SFT and DPO) share: trainer arguments, resume, NaN guard, saving.

Each training stage writes TRL checkpoints to ``<stage_dir>/checkpoints/`` while it runs and the final
adapter, tokenizer (with its chat template) and generation config to ``<stage_dir>/`` when it ends.
A checkpoint or final save that fails for lack of room (full disk, ``ulimit -f``) stops the stage with a
message saying how much it needed; the half-written checkpoint is removed and the newest complete one kept,
so the same command resumes from it once there is room.
TensorBoard event files (the default ``report_to``) go to ``<stage_dir>/runs/``, which outlives the checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback

from pipeline.artifacts import (
    CHECKPOINTS,
    atomic_write_json,
    explain_write_failures,
    human_size,
    write_failure,
)
from pipeline.errors import PipelineError
from pipeline.models import configure_generation, precision_args

# What a checkpoint holds beyond what the final save writes (optimizer, scheduler, RNG and Trainer state).
_RESUME_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state", "trainer_state.json")
TENSORBOARD_DIR = "runs"
TENSORBOARD_ENV = "TENSORBOARD_LOGGING_DIR"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@contextlib.contextmanager
def mixed_precision(trainer: Any, model: Any) -> Iterator[None]:
    """The trainer's autocast (accelerate's, as the model's own wrapped forward gets it), without peft's casts of
    the LoRA inputs that autocast undoes (:func:`without_lora_input_casts`)."""
    with trainer.accelerator.autocast(), without_lora_input_casts(model, trainer.accelerator.device.type):
        yield


@contextlib.contextmanager
def without_lora_input_casts(model: Any, device_type: str) -> Iterator[None]:
    """While autocast is on for ``device_type``, peft's cast of each LoRA layer's input to the adapter's dtype
    turned off.

    With float32 adapters on bf16 weights peft casts every LoRA input to float32, which autocast's linear then
    casts straight back to bf16, forward and backward: the same bf16 product (bit for bit: tests/test_fast_sft_loss.py)
    after two copies of the activations per LoRA layer (5 % of the decoder's step on gemma-3-270m, 2026-12-05,
    Zen 4). Without autocast the cast is what makes the dtypes meet, and stays. (``peft.helpers.
    disable_input_dtype_casting`` sets the same switch but fails on a model with trainable token rows, whose layer
    lacks it in peft 0.21: the LoRA layers' documented ``cast_input_dtype_enabled`` is set here directly.)"""
    layers = []
    if torch.is_autocast_enabled(device_type):
        layers = [m for m in model.modules()
                  if isinstance(m, LoraLayer) and getattr(m, "cast_input_dtype_enabled", True)]
    try:
        for layer in layers:
            layer.cast_input_dtype_enabled = False
        yield
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


def trainer_arguments(section: dict[str, Any], model_cfg: dict[str, Any], stage_dir: Path,
                      pipeline_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword arguments for SFTConfig/DPOConfig: the recipe section + where to write + precision."""
    args = {key: value for key, value in section.items() if key not in pipeline_keys}
    args["output_dir"] = str(stage_dir / CHECKPOINTS)
    for key, value in precision_args(model_cfg).items():
        args.setdefault(key, value)  # the recipe may still choose, e.g. fp32 on a bf16-capable CPU
    # Neither stage computes metrics from predictions. Without these two, the held-out evaluation keeps every
    # batch's (positions x vocabulary) logits (DPO also falls back to TRL's all-positions head for them) at the
    # Trainer's default eval batch of 8: with Gemma's 262k vocabulary, 8 packed rows of 512 tokens are 4.3 GB of
    # float32 logits per copy, which made the quickstart's SFT peak at 16.5 GB RSS against about 5 GB in training.
    args.setdefault("prediction_loss_only", True)
    args.setdefault("per_device_eval_batch_size", args.get("per_device_train_batch_size", 8))
    return args


def latest_complete_checkpoint(stage_dir: Path) -> str | None:
    """Newest checkpoint whose trainer_state.json (written last by the Trainer) parses.

    A checkpoint the process was killed while writing is removed, so the Trainer never sees it.
    """
    root = stage_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    for _, path in found:
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return str(path)
        except (OSError, json.JSONDecodeError):
            shutil.rmtree(path, ignore_errors=True)
    return None


def clear_checkpoints(stage_dir: Path) -> None:
    shutil.rmtree(stage_dir / CHECKPOINTS, ignore_errors=True)


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first logged NaN/inf loss, before a checkpoint of the broken weights is saved.

    The Trainer logs before it saves at a given step, so with ``save_steps`` a multiple of
    ``logging_steps`` the last checkpoint on disk holds finite weights.
    """

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        # grad_norm too: a non-finite gradient at step N has already put NaN into the weights checkpoint-N
        # would hold, even when step N's loss (computed before the update) was finite.
        bad = {k: logs[k] for k in ("loss", "grad_norm") if k in logs and not math.isfinite(float(logs[k]))}
        if bad:
            what = ", ".join(f"{k} {v}" for k, v in bad.items())
            last = max((h["step"] for h in state.log_history[:-1] if "loss" in h), default=0)
            raise PipelineError(
                f"Training diverged at step {state.global_step} ({what}; last finite loss logged at step {last}). "
                f"The checkpoints before it are kept in {args.output_dir}. Lower the learning rate (or use fp32 "
                "with model.dtype: float32) and re-run the stage; with changed settings it starts from step 0."
            )


def tensorboard_callbacks(args: Any, stage_dir: Path) -> list[TrainerCallback]:
    """TensorBoard logging to ``<stage_dir>/runs/`` when ``report_to`` asks for it (the default), else nothing.

    transformers 5 dropped ``TrainingArguments.logging_dir``: its TensorBoard callback writes under ``output_dir``
    (our ``checkpoints/``, deleted when the stage completes) unless its documented ``TENSORBOARD_LOGGING_DIR``
    environment variable, read when the callback is built, names another directory. So when the recipe's
    ``report_to`` asks for TensorBoard we build that callback ourselves with the variable set for the moment, and
    take "tensorboard" out of ``report_to`` so the Trainer does not add a second one. (The callback writes on the
    main process only, and keeps writing there for the held-out evaluation after training.)
    """
    if "tensorboard" not in args.report_to:  # TrainingArguments normalised it to a list ("all" expanded)
        return []
    from transformers.integrations import TensorBoardCallback

    args.report_to = [r for r in args.report_to if r != "tensorboard"]
    previous = os.environ.get(TENSORBOARD_ENV)
    os.environ[TENSORBOARD_ENV] = str(stage_dir / TENSORBOARD_DIR)
    try:
        return [TensorBoardCallback()]
    finally:
        if previous is None:
            del os.environ[TENSORBOARD_ENV]
        else:
            os.environ[TENSORBOARD_ENV] = previous


def _checkpoint_sizes(trainer: Any, checkpoint: str | None) -> tuple[int, int, int, str]:
    """(whole checkpoint, its largest file, the part the final save also writes) in bytes, and how estimated.

    Measured on the newest complete checkpoint; before the first one, estimated from the trainable
    parameters: the adapter, plus two fp32 optimizer moments per parameter (AdamW, the Trainer's default).
    """
    if checkpoint:
        files = [p for p in Path(checkpoint).rglob("*") if p.is_file()]
        sizes = [p.stat().st_size for p in files]
        final = sum(s for p, s in zip(files, sizes, strict=True) if not p.name.startswith(_RESUME_STATE))
        return sum(sizes), max(sizes, default=0), final, f"as measured on {Path(checkpoint).name}"
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    adapter = sum(p.numel() * p.element_size() for p in trainable)
    moments = 2 * 4 * sum(p.numel() for p in trainable)
    return (adapter + moments, max(adapter, moments), adapter,
            "estimated from the trainable parameters: adapter and optimizer state, the tokenizer comes on top")


def train_with_resume(trainer: Any, stage_dir: Path) -> tuple[dict[str, Any], int]:
    """Train, resuming from the last complete checkpoint; returns (metrics, step resumed from)."""
    with trainer.accelerator.main_process_first():  # the main process removes a half-written checkpoint first
        checkpoint = latest_complete_checkpoint(stage_dir)
    resumed_from = int(Path(checkpoint).name.split("-")[1]) if checkpoint else 0
    if checkpoint and trainer.accelerator.is_main_process:
        print(f"  resuming from {checkpoint} (step {resumed_from})", flush=True)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except PipelineError:
        raise
    except Exception as exc:
        _explain_failed_checkpoint(exc, trainer, stage_dir)
        raise
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    return metrics, resumed_from


def _explain_failed_checkpoint(exc: Exception, trainer: Any, stage_dir: Path) -> None:
    """If training stopped because a checkpoint could not be written, raise a PipelineError saying so.

    The half-written checkpoint is removed (it would only take room); the newest complete one is kept.
    """
    if write_failure(exc) is None:
        return
    written = {p.name for p in (stage_dir / CHECKPOINTS).glob("checkpoint-*")}
    newest = latest_complete_checkpoint(stage_dir)  # removes the incomplete ones
    failed = sorted(written - {p.name for p in (stage_dir / CHECKPOINTS).glob("checkpoint-*")})
    total, largest, _, how = _checkpoint_sizes(trainer, newest)
    kept = (f"The newest complete checkpoint, {Path(newest).name}, is kept: the re-run resumes from step "
            f"{Path(newest).name.split('-')[1]}." if newest else "No checkpoint was complete yet: the re-run starts "
            "the stage from step 0.")
    with explain_write_failures(stage_dir.name, stage_dir / CHECKPOINTS,
                                what=f"a checkpoint ({', '.join(failed) or 'the next one'})",
                                needed=f"{'about' if newest else 'at least'} {human_size(total)} per checkpoint, "
                                       f"its largest file {human_size(largest)} ({how})",
                                kept=f"{kept} Earlier stages are untouched."):
        raise exc


def save_stage_model(trainer: Any, tokenizer: Any, stage_dir: Path, base_model_path: str) -> None:
    """Save the trained adapter (only the 'default' one), tokenizer, generation config and log history.

    Call it in every process: the weights are gathered from all of them (FSDP and ZeRO-3 shard them) and the main
    process alone writes.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # DeepSpeed: the engine gathers
    if not trainer.accelerator.is_main_process:
        return
    configure_generation(model, tokenizer)
    model.peft_config["default"].base_model_name_or_path = str(Path(base_model_path).resolve()) \
        if Path(base_model_path).exists() else base_model_path
    newest = latest_complete_checkpoint(stage_dir)
    _, _, needed, how = _checkpoint_sizes(trainer, newest)
    resume = (f"The final checkpoint, {Path(newest).name}, is kept: the re-run only saves again." if newest
              else "The re-run trains the stage again.")
    with explain_write_failures(stage_dir.name, stage_dir, what="the trained adapter",
                                needed=f"about {human_size(needed)} ({how})",
                                kept=f"{resume} Earlier stages are untouched."):
        model.save_pretrained(stage_dir, selected_adapters=["default"], state_dict=state_dict,
                              safe_serialization=True)
        tokenizer.save_pretrained(stage_dir)
        model.generation_config.save_pretrained(stage_dir)
        atomic_write_json(stage_dir / "log_history.json", trainer.state.log_history)
    # The held-out evaluation after training reopened the TensorBoard writer the callback closed at the end of
    # training; release its file.
    for callback in trainer.callback_handler.callbacks:
        if getattr(callback, "tb_writer", None) is not None:
            callback.tb_writer.close()
