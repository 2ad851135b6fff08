"""Stage ``dpo``: direct preference optimisation starting from the SFT result.

Hand-off modes (``dpo.start``, recorded in the manifest):

- ``merge`` (default): the SFT adapter is merged into full-precision base weights, saved to
  ``<output_dir>/dpo/sft_merged/``, and a fresh LoRA is trained on top. TRL computes the reference
  log-probs with the adapter disabled, so the reference is the SFT model, not the raw base.
- ``continue_adapter``: the SFT adapter itself keeps training; TRL copies it into a frozen ``ref``
  adapter that serves as the reference.

With ``dpo.on_policy_rejected: true``, pairs whose prompt carries verifiable constraints (IFEval-style
``instruction_id_list`` + ``kwargs``) are first answered by the SFT model (greedy); where its answer stops
but fails a check, that answer becomes the pair's rejected one, so DPO pushes down what the model actually
does wrong, not only a synthetic mistake (on-policy rejections, as in Tulu 3's preference data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset, load_from_disk
from peft import PeftModel
from trl import DPOConfig, DPOTrainer

from pipeline.artifacts import (
    FILES,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    explain_write_failures,
    fingerprint,
    human_size,
)
from pipeline.config import DPO_PIPELINE_KEYS
from pipeline.data.constraints import CONSTRAINTS, evaluate_response
from pipeline.errors import PipelineError
from pipeline.inference import generate
from pipeline.models import (
    configure_generation,
    load_base_model,
    load_tokenizer,
    lora_config,
    resolve_device,
    resolve_model_path,
    set_adapter_dtype,
)
from pipeline.stages.context import StageContext
from pipeline.stages.fast_loss import LabelledPositionsDPOTrainer
from pipeline.stages.training import (
    CHECKPOINTS,
    StopOnNonFiniteLoss,
    save_stage_model,
    tensorboard_callbacks,
    train_with_resume,
    trainer_arguments,
)

MERGED = "sft_merged"
MERGED_FROM = "merged_from.json"  # in sft_merged/: which SFT result it was merged from
ON_POLICY_ANSWERS = "on_policy_answers.jsonl"  # in checkpoints/: a resumed stage does not generate again
ON_POLICY_MAX_NEW_TOKENS = 200
ON_POLICY_BATCH = 32


def merge_sft_adapter(model_cfg: dict[str, Any], sft_dir: Path, target: Path, sft_manifest: dict[str, Any]) -> Path:
    """Merge the SFT adapter into full-precision base weights (never into 4-bit ones) and save them.

    A merge already in ``target`` is reused (a resumed stage) only when it was made from this same SFT
    result: after ``sft`` re-ran, the old merge would silently train DPO on top of the old SFT model.
    """
    source = {"sft": fingerprint(sft_manifest["fingerprint"], sft_manifest.get(FILES) or sft_manifest.get("finished_at"))}
    try:
        if json.loads((target / MERGED_FROM).read_text(encoding="utf-8")) == source:
            return target  # written atomically, so present means complete
    except (OSError, ValueError):
        pass
    base = load_base_model(model_cfg, quantize=False)
    merged = PeftModel.from_pretrained(base, str(sft_dir)).merge_and_unload()
    tokenizer = load_tokenizer(model_cfg, path=str(sft_dir))
    weights = sum(t.numel() * t.element_size() for t in merged.state_dict().values())
    with explain_write_failures("dpo", target, what="the merged SFT model",
                                needed=f"about {human_size(weights)} (its weights)"), atomic_directory(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MERGED_FROM, source)
    return target


def _checkable(constraints: str | None) -> dict[str, list] | None:
    """The pair's constraints when there are some and we have a checker for each, else None."""
    parsed = json.loads(constraints) if constraints else None
    if not parsed or not parsed["instruction_id_list"]:
        return None
    return parsed if all(i in CONSTRAINTS for i in parsed["instruction_id_list"]) else None


def _without_constraints(rows: Dataset) -> Dataset:
    """TRL takes prompt / chosen / rejected only."""
    return rows.remove_columns("constraints") if "constraints" in rows.column_names else rows


def with_on_policy_rejected(rows: Dataset, policy: Any, tokenizer: Any,
                            cache: Path) -> tuple[Dataset, dict[str, int]]:
    """Replace the rejected answer of constrained pairs by ``policy``'s own answer where it fails a check.

    Only answers that stop on their own are used: a cut-off answer would teach DPO that ending there is bad.
    The answers are cached (``cache``), so a resumed stage does not generate again. Returns the pairs and counts.
    """
    checks = [_checkable(c) for c in rows["constraints"]]
    prompts = rows["prompt"]
    todo = [i for i, c in enumerate(checks) if c]
    if cache.is_file():
        answers = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
    else:
        print(f"  on-policy rejections: the SFT model answers {len(todo)} constrained prompts", flush=True)
        training = policy.training
        configure_generation(policy, tokenizer)
        answers = generate(policy.eval(), tokenizer, [prompts[i] for i in todo],
                           max_new_tokens=ON_POLICY_MAX_NEW_TOKENS, batch_size=ON_POLICY_BATCH, progress=True)
        policy.train(training)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
    rejected = list(rows["rejected"])
    passed = replaced = 0
    for i, answer in zip(todo, answers, strict=True):
        user_turn = prompts[i][-1]["content"]
        ok = evaluate_response(answer["text"], checks[i]["instruction_id_list"], checks[i]["kwargs"],
                               user_turn)["prompt_strict"]
        passed += ok
        if answer["stopped"] and answer["text"] and not ok:
            rejected[i] = [{"role": "assistant", "content": answer["text"]}]
            replaced += 1
    rows = rows.remove_columns("rejected").add_column("rejected", rejected)
    stats = {"on_policy_prompts": len(todo), "on_policy_passed": passed, "on_policy_rejected": replaced}
    print(f"  on-policy rejections: SFT passed {passed}/{len(todo)}; {replaced} rejected answers replaced", flush=True)
    return rows, stats


def run(ctx: StageContext) -> dict[str, Any]:
    recipe = ctx.recipe
    prepared, sft_dir = ctx.upstream_dir("prepare"), ctx.upstream_dir("sft")
    train = load_from_disk(str(prepared / "dpo_train"))
    evaluation = load_from_disk(str(prepared / "dpo_eval")) if (prepared / "dpo_eval").exists() else None
    tokenizer = load_tokenizer(recipe.model, path=str(sft_dir))  # carries the SFT chat template
    if recipe.dpo["on_policy_rejected"] and "constraints" not in train.column_names:
        raise PipelineError("dpo.on_policy_rejected needs preference rows with IFEval-style "
                            "'instruction_id_list' and 'kwargs' fields in data.dpo; none has them.")

    mode = recipe.dpo["start"]
    adapter = recipe.stage_lora("dpo")  # the lora section, with dpo.lora over it (merge only)
    processes = PartialState()  # under `accelerate launch`: the main process merges / generates, the others reuse it
    if mode == "merge":
        with processes.main_process_first():
            base_path = str(merge_sft_adapter(recipe.model, sft_dir, ctx.stage_dir / MERGED,
                                              ctx.upstream["sft"]).resolve())
        model = load_base_model(recipe.model, path=base_path)
        # No trainable-token embeddings here: SFT trained them and they are merged into the weights; TRL's
        # fused LM head (used by DPOTrainer) cannot run through peft's trainable-token wrapper anyway.
        peft_config = lora_config(adapter)
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

    on_policy: dict[str, int] = {}
    if recipe.dpo["on_policy_rejected"]:  # the model as loaded is the SFT policy: it answers before training
        with processes.main_process_first():  # the others read the answers the main process cached
            train, on_policy = with_on_policy_rejected(train, model, tokenizer,
                                                       ctx.stage_dir / CHECKPOINTS / ON_POLICY_ANSWERS)
    train = _without_constraints(train)
    evaluation = _without_constraints(evaluation) if evaluation is not None else None

    args = DPOConfig(**trainer_arguments(recipe.dpo, recipe.model, ctx.stage_dir,
                                         pipeline_keys=tuple(DPO_PIPELINE_KEYS)))
    # On CPU TRL's fused LM head scores every position against the whole vocabulary; ours only the completions'
    # (same loss, proven in tests/test_fast_dpo_loss.py). With Triton (CUDA) TRL's head is the better one.
    trainer_class = LabelledPositionsDPOTrainer if resolve_device(recipe.model) == "cpu" else DPOTrainer
    trainer = trainer_class(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation if evaluation is not None and len(evaluation) else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StopOnNonFiniteLoss(), *tensorboard_callbacks(args, ctx.stage_dir)],
    )
    set_adapter_dtype(trainer.model, adapter)
    metrics, resumed_from = train_with_resume(trainer, ctx.stage_dir)
    save_stage_model(trainer, tokenizer, ctx.stage_dir, base_path)
    ctx.extra.update(start=mode, base_model=base_path, resumed_from_step=resumed_from,
                     loss_path=getattr(trainer, "loss_path", None) or "trl")
    return {**on_policy, **metrics}
