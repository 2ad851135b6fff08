"""Stage ``sft``: supervised fine-tuning of a LoRA adapter on the prepared conversations.

Reads ``<output_dir>/prepare/sft_{train,eval}``; writes the adapter, tokenizer (with the chat template)
and generation config to ``<output_dir>/sft/``. Loss is on assistant tokens only, end-of-turn included,
so the model learns to answer *and stop*.
"""

from __future__ import annotations

from typing import Any

from datasets import load_from_disk
from trl import SFTConfig, SFTTrainer

from pipeline.models import load_base_model, load_tokenizer, lora_config, resolve_model_path
from pipeline.stages.context import StageContext
from pipeline.stages.training import (
    StopOnNonFiniteLoss,
    check_save_cadence,
    save_stage_model,
    train_with_resume,
    trainer_arguments,
)


def run(ctx: StageContext) -> dict[str, Any]:
    recipe = ctx.recipe
    check_save_cadence(recipe.sft)
    prepared = ctx.upstream_dir("prepare")
    train = load_from_disk(str(prepared / "sft_train"))
    evaluation = load_from_disk(str(prepared / "sft_eval")) if (prepared / "sft_eval").exists() else None

    tokenizer = load_tokenizer(recipe.model)
    model = load_base_model(recipe.model)
    args = SFTConfig(**trainer_arguments(recipe.sft, recipe.model, ctx.stage_dir))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation if evaluation is not None and len(evaluation) else None,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.lora),
        callbacks=[StopOnNonFiniteLoss()],
    )
    metrics, resumed_from = train_with_resume(trainer, ctx.stage_dir)
    base_path = resolve_model_path(recipe.model["name_or_path"])
    save_stage_model(trainer, tokenizer, ctx.stage_dir, base_path)
    ctx.extra.update(base_model=base_path, resumed_from_step=resumed_from)
    return metrics
