"""Stage ``dpo``: direct preference optimisation starting from the SFT result.

Hand-off modes (``dpo.start``, recorded in the manifest):

- ``merge`` (default): the SFT adapter is merged into full-precision base weights, saved to
  ``<output_dir>/dpo/sft_merged/``, and a fresh LoRA is trained on top. TRL computes the reference
  log-probs with the adapter disabled, so the reference is the SFT model, not the raw base.
- ``continue_adapter``: the SFT adapter itself keeps training; TRL copies it into a frozen ``ref``
  adapter that serves as the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import load_from_disk
from peft import PeftModel
from trl import DPOConfig, DPOTrainer

from pipeline.artifacts import atomic_directory
from pipeline.errors import PipelineError
from pipeline.models import load_base_model, load_tokenizer, lora_config, resolve_model_path
from pipeline.stages.context import StageContext
from pipeline.stages.training import (
    StopOnNonFiniteLoss,
    check_save_cadence,
    save_stage_model,
    train_with_resume,
    trainer_arguments,
)

MERGED = "sft_merged"


def merge_sft_adapter(model_cfg: dict[str, Any], sft_dir: Path, target: Path) -> Path:
    """Merge the SFT adapter into full-precision base weights (never into 4-bit ones) and save them."""
    if (target / "config.json").is_file():
        return target  # written atomically, so present means complete
    base = load_base_model(model_cfg, quantize=False)
    merged = PeftModel.from_pretrained(base, str(sft_dir)).merge_and_unload()
    tokenizer = load_tokenizer(model_cfg, path=str(sft_dir))
    with atomic_directory(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def run(ctx: StageContext) -> dict[str, Any]:
    recipe = ctx.recipe
    check_save_cadence(recipe.dpo)
    prepared, sft_dir = ctx.upstream_dir("prepare"), ctx.upstream_dir("sft")
    train = load_from_disk(str(prepared / "dpo_train"))
    evaluation = load_from_disk(str(prepared / "dpo_eval")) if (prepared / "dpo_eval").exists() else None
    tokenizer = load_tokenizer(recipe.model, path=str(sft_dir))  # carries the SFT chat template

    mode = recipe.dpo["start"]
    if mode == "merge":
        base_path = str(merge_sft_adapter(recipe.model, sft_dir, ctx.stage_dir / MERGED).resolve())
        model = load_base_model(recipe.model, path=base_path)
        # No trainable-token embeddings here: SFT trained them and they are merged into the weights; TRL's
        # fused LM head (used by DPOTrainer) cannot run through peft's trainable-token wrapper anyway.
        peft_config = lora_config(recipe.lora)
    else:  # continue_adapter
        base_path = resolve_model_path(recipe.model["name_or_path"])
        if recipe.lora["train_template_tokens"]:
            raise PipelineError(
                "dpo.start: continue_adapter cannot continue an SFT adapter with trainable turn-token embeddings "
                "(TRL's DPO LM head does not run through them). Use dpo.start: merge (the default), or set "
                "lora.train_template_tokens: false and re-run sft."
            )
        model = PeftModel.from_pretrained(load_base_model(recipe.model), str(sft_dir), is_trainable=True)
        peft_config = None

    args = DPOConfig(**trainer_arguments(recipe.dpo, recipe.model, ctx.stage_dir, pipeline_keys=("start",)))
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation if evaluation is not None and len(evaluation) else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StopOnNonFiniteLoss()],
    )
    metrics, resumed_from = train_with_resume(trainer, ctx.stage_dir)
    save_stage_model(trainer, tokenizer, ctx.stage_dir, base_path)
    ctx.extra.update(start=mode, base_model=base_path, resumed_from_step=resumed_from)
    return metrics
