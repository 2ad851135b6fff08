"""Stage ``sft``: supervised fine-tuning of a LoRA adapter on the prepared conversations.

Reads ``<output_dir>/prepare/sft_{train,eval}``; writes the adapter, tokenizer (with the chat template)
and generation config to ``<output_dir>/sft/``. Loss is on assistant tokens only, end-of-turn included,
so the model learns to answer *and stop*.
"""

from __future__ import annotations

from typing import Any

from datasets import load_from_disk
from trl import SFTConfig, SFTTrainer

from pipeline.lm_head import labelled_nll
from pipeline.models import (
    load_base_model,
    load_tokenizer,
    lora_config,
    resolve_device,
    resolve_model_path,
    set_adapter_dtype,
)
from pipeline.stages.context import StageContext
from pipeline.stages.training import (
    StopOnNonFiniteLoss,
    mixed_precision,
    save_stage_model,
    tensorboard_callbacks,
    train_with_resume,
    trainer_arguments,
)


class LabelledPositionsSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss sends only the positions that carry a label through the LM head.

    TRL 1.16's fused LM head has no CPU kernel: there it scores every position (prompt and padding too)
    against the whole vocabulary and runs its backward in fp32. With Gemma's 262k-token vocabulary that
    head costs more than the transformer. Sending exactly the labelled positions through the head, a chunk at a
    time (``lm_head.labelled_nll``), yields the same loss for a fraction of the work and memory (measured:
    README "Performance").
    Used on CPU, and wherever the template's turn tokens are trained (see ``models.lora_config``).
    """

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        # the decoder runs under the accelerator's autocast, as the model's own (accelerate-wrapped) forward does
        with mixed_precision(self, model):
            outputs, nll, labelled = labelled_nll(model, inputs)
        loss = nll / (num_items_in_batch if num_items_in_batch is not None else labelled)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as Trainer.compute_loss: num_items_in_batch counts every process's tokens and DDP averages the
            # gradients over the processes, so scale back up (a no-op in one process)
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def run(ctx: StageContext) -> dict[str, Any]:
    recipe = ctx.recipe
    prepared = ctx.upstream_dir("prepare")
    train = load_from_disk(str(prepared / "sft_train"))
    evaluation = load_from_disk(str(prepared / "sft_eval")) if (prepared / "sft_eval").exists() else None

    tokenizer = load_tokenizer(recipe.model)
    model = load_base_model(recipe.model)
    args = SFTConfig(**trainer_arguments(recipe.sft, recipe.model, ctx.stage_dir))
    peft_config = lora_config(recipe.lora, tokenizer)
    # TRL's fused LM head cannot run through peft's trainable-token wrapper of a tied LM head, and on CPU it
    # is the slow path anyway: use the labelled-positions loss in both cases.
    use_ours = resolve_device(recipe.model) == "cpu" or bool(peft_config.trainable_token_indices)
    trainer = (LabelledPositionsSFTTrainer if use_ours else SFTTrainer)(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation if evaluation is not None and len(evaluation) else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StopOnNonFiniteLoss(), *tensorboard_callbacks(args, ctx.stage_dir)],
    )
    set_adapter_dtype(trainer.model, recipe.lora)
    metrics, resumed_from = train_with_resume(trainer, ctx.stage_dir)
    base_path = resolve_model_path(recipe.model["name_or_path"])
    save_stage_model(trainer, tokenizer, ctx.stage_dir, base_path)
    ctx.extra.update(base_model=base_path, resumed_from_step=resumed_from)
    return metrics
