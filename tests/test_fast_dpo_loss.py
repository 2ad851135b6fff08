"""The labelled-positions DPO loss equals TRL's own (loss, gradients, metrics), and falls back where it is not proven."""

from __future__ import annotations

import pytest
import torch
import trl
from conftest import lora_output_dtypes, relative_difference, tiny_pref_rows
from datasets import Dataset
from packaging.version import Version
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from pipeline.config import MODEL_DEFAULTS
from pipeline.lm_head import decoder_and_head
from pipeline.models import load_tokenizer
from pipeline.stages.fast_loss import CHECKED_TRL, HANDLED_LOSS_TYPES, LabelledPositionsDPOTrainer, unsupported_reason

COMBINED = [(["sigmoid", "sft"], [1.0, 1.0]), (["sigmoid", "sft"], [1.0, 2.0]), (["ipo", "sft", "hinge"], None),
            (["robust", "apo_zero", "apo_down", "sigmoid_norm"], [0.5, 1.0, 1.0, 2.0])]
CASES = [([t], None) for t in sorted(HANDLED_LOSS_TYPES)] + COMBINED


def _build(tiny_model_dir, tmp_path, dtype=torch.float32, **config) -> LabelledPositionsDPOTrainer:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer({**MODEL_DEFAULTS, "name_or_path": str(tiny_model_dir), "chat_template": "chatml"})
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in tiny_pref_rows(4)]
    trainer = LabelledPositionsDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype),
        args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=2,
                       max_length=64, **{"bf16": dtype == torch.bfloat16, **config}),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    )
    torch.manual_seed(0)
    for name, param in trainer.model.named_parameters():  # LoRA B starts at zero: the policy would equal the reference
        if "lora_B" in name:
            param.data.normal_(0.0, 0.3)
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module", params=[False, True], ids=["reference-forward", "precomputed-reference"])
def trainer(request, tiny_model_dir, tmp_path_factory):
    return _build(tiny_model_dir, tmp_path_factory.mktemp("dpo"), precompute_ref_log_probs=request.param)


def _use_losses(trainer, loss_types, weights=None, label_smoothing=0.0):
    """Configure the loss the way DPOTrainer.__init__ reads DPOConfig (both paths read these fields)."""
    trainer.args.loss_type, trainer.args.loss_weights = loss_types, weights
    trainer.loss_types, trainer.loss_weights = loss_types, weights or [1.0] * len(loss_types)
    trainer.args.label_smoothing = trainer.label_smoothing = label_smoothing


def _loss_grads_metrics(trainer, batch, compute):
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    loss = compute(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(("loss_types", "weights"), CASES, ids=["+".join(c[0]) + (f"@{c[1]}" if c[1] else "")
                                                              for c in CASES])
def test_loss_gradients_and_metrics_equal_trls_own_path(trainer, loss_types, weights):
    _use_losses(trainer, loss_types, weights, label_smoothing=0.1 if "robust" in loss_types else 0.0)
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("ref_chosen_logps" in batch) == trainer.precompute_ref_logps
    # exactly the completion positions go through the head, and they are not the rows' union
    completion = batch["completion_mask"][:, 1:].bool()
    assert decoder_and_head(trainer.model) is not None and completion.sum() < completion.any(dim=0).sum() * len(completion)
    _assert_labelled_positions_equal_trl(trainer, batch)


def _assert_labelled_positions_equal_trl(trainer, batch):
    """Our ``compute_loss`` took its own path and gave TRL's loss, every LoRA gradient and every logged metric."""
    expected = _loss_grads_metrics(trainer, batch, lambda m, b: DPOTrainer.compute_loss(trainer, m, b))
    ours = _loss_grads_metrics(trainer, batch, trainer.compute_loss)
    assert trainer.loss_path == "labelled_positions"
    assert ours[0].item() != 0.0
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == expected[1].keys() and len(ours[1]) > 0
    for name, grad in expected[1].items():
        assert grad.abs().sum() > 0, name  # every trainable weight gets a gradient, so equality means something
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ours[2].keys() == expected[2].keys()
    for key, values in expected[2].items():
        assert ours[2][key] == pytest.approx(values, rel=1e-4, abs=1e-6), key


def test_reference_log_probs_equal_trls_for_the_precompute(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    ours = trainer.compute_ref_log_probs(trainer.model, dict(batch))
    expected = DPOTrainer.compute_ref_log_probs(trainer, trainer.model, dict(batch))
    for mine, theirs in zip(ours, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    if trainer.precompute_ref_logps:  # and the values the dataset carries came from it
        torch.testing.assert_close(batch["ref_chosen_logps"], expected[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-forward", "precomputed-reference"])
def test_ld_dpo_weighting_of_the_longer_answers_tail_equals_trls(tiny_model_dir, tmp_path, precompute):
    trainer = _build(tiny_model_dir, tmp_path, ld_alpha=0.3, precompute_ref_log_probs=precompute,
                     loss_type=["sigmoid", "sft"])
    batch = next(iter(trainer.get_train_dataloader()))
    lengths = batch["completion_mask"][:, 1:].sum(dim=1)
    assert not torch.equal(*lengths.chunk(2))  # a pair whose answers differ in length: there is a tail to weight
    _assert_labelled_positions_equal_trl(trainer, batch)
    weighted = trainer.compute_ref_log_probs(trainer.model, dict(batch))
    for mine, theirs in zip(weighted, DPOTrainer.compute_ref_log_probs(trainer, trainer.model, dict(batch)),
                            strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    trainer.ld_alpha = None  # the weighting changes the log-probs (so the equality above tested it)
    assert not torch.allclose(torch.cat(trainer.compute_ref_log_probs(trainer.model, dict(batch))), torch.cat(weighted))


@pytest.mark.parametrize(("option", "reason"), [
    ({"loss_type": ["bco_pair"]}, "loss_type \\['bco_pair'\\] is not handled"),
    ({"loss_type": ["sigmoid", "nca_pair"]}, "loss_type \\['nca_pair'\\] is not handled"),
    ({"f_divergence_type": "js_divergence"}, "f_divergence_type is not handled"),
    ({"use_weighting": True}, "use_weighting is not handled"),
])
def test_unhandled_options_fall_back_to_trls_own_loss(tiny_model_dir, tmp_path, capsys, option, reason):
    trainer = _build(tiny_model_dir, tmp_path, **option)
    batch = next(iter(trainer.get_train_dataloader()))
    ours = trainer.compute_loss(trainer.model, dict(batch))
    assert trainer.loss_path == "trl"
    assert torch.equal(ours, DPOTrainer.compute_loss(trainer, trainer.model, dict(batch)))
    assert "DPO loss: TRL's own path" in capsys.readouterr().out
    assert unsupported_reason(trainer.args) is not None
    with pytest.raises(AssertionError, match=reason):
        assert unsupported_reason(trainer.args) is None, unsupported_reason(trainer.args)


def test_another_trl_version_falls_back():
    args = DPOConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none")
    assert unsupported_reason(args) is None
    for version in ("1.15.2", "1.17.0", "2.0.0"):
        assert "outside the checked range" in unsupported_reason(args, trl_version=version)


def test_installed_trl_is_the_version_the_fast_dpo_loss_was_checked_against():
    assert Version(trl.__version__) in CHECKED_TRL, (
        f"TRL {trl.__version__} is installed but pipeline/stages/fast_loss.py was proven equal to TRL {CHECKED_TRL}: "
        "re-read TRL's DPOTrainer._compute_loss, re-run this file's equality tests and then widen CHECKED_TRL."
    )


def test_the_stages_held_out_evaluation_keeps_no_logits_and_uses_the_labelled_positions(tiny_model_dir, tmp_path):
    """With the Trainer's defaults, evaluation asks compute_loss for the logits (TRL's all-positions head) and
    keeps every eval batch's (positions x vocabulary) tensor: the stages' arguments turn both off."""
    from pathlib import Path

    from pipeline.stages.training import trainer_arguments

    settings = trainer_arguments({"per_device_train_batch_size": 2, "max_length": 64, "report_to": "none"},
                                 {**MODEL_DEFAULTS, "dtype": "float32"}, Path(tmp_path))
    assert settings["prediction_loss_only"] is True and settings["per_device_eval_batch_size"] == 2
    trainer = _build(tiny_model_dir, tmp_path, prediction_loss_only=True, per_device_eval_batch_size=2)
    metrics = trainer.evaluate(trainer.train_dataset)
    assert trainer.loss_path == "labelled_positions"
    assert "eval_rewards/accuracies" in metrics and "eval_loss" in metrics
    # the recipe still decides when it sets them
    override = trainer_arguments({"per_device_train_batch_size": 2, "per_device_eval_batch_size": 4,
                                  "prediction_loss_only": False}, MODEL_DEFAULTS, Path(tmp_path))
    assert override["per_device_eval_batch_size"] == 4 and override["prediction_loss_only"] is False


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-forward", "precomputed-reference"])
def test_under_bf16_mixed_precision_the_loss_runs_as_trls_autocast_forward(tiny_model_dir, tmp_path, precompute):
    # bf16=True: accelerate runs the model's forward under CPU autocast (float32 adapters, bf16 products); the
    # labelled-positions path calls the decoder itself and must run under the same autocast, or it computes the
    # adapters in float32: another loss (and a slower one)
    trainer = _build(tiny_model_dir, tmp_path, dtype=torch.bfloat16, precompute_ref_log_probs=precompute)
    assert trainer.accelerator.native_amp
    model = trainer.accelerator.prepare_model(trainer.model)  # as Trainer.train wraps it
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    _use_losses(trainer, ["sigmoid", "sft"])
    batch = next(iter(trainer.get_train_dataloader()))
    theirs, their_dtypes = lora_output_dtypes(
        model, lambda: _loss_grads_metrics(trainer, batch, lambda m, b: DPOTrainer.compute_loss(trainer, m, b)))
    ours, our_dtypes = lora_output_dtypes(model, lambda: _loss_grads_metrics(trainer, batch, trainer.compute_loss))
    assert trainer.loss_path == "labelled_positions"
    assert our_dtypes == their_dtypes == {torch.bfloat16}
    # measured 5e-7 and 0.7 % (bf16 rounding in the head); the adapters in float32 instead: 2.4e-4 and 3.3 %
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=2e-5)
    assert relative_difference(ours[1], theirs[1]) < 0.015


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_a_padded_batch_runs_as_one_row_of_its_tokens_with_trls_loss_and_gradients(tmp_path, arch):
    from conftest import build_tiny_model

    from pipeline.stages.fast_loss import _packed

    trainer = _build(build_tiny_model(tmp_path / "model", arch=arch), tmp_path / "out")
    _use_losses(trainer, ["sigmoid", "sft"])
    batch = next(iter(trainer.get_train_dataloader()))
    attention = batch["attention_mask"].bool()
    assert not attention.all()  # chosen and rejected differ in length: the rows carry padding
    model_inputs, labelled = _packed(batch)
    assert model_inputs["input_ids"].shape == (1, int(attention.sum()))  # exactly the real tokens, in one row
    assert torch.equal(model_inputs["input_ids"][0], batch["input_ids"][attention])
    assert int(labelled.sum()) == int(batch["completion_mask"][:, 1:].sum())
    assert (model_inputs["position_ids"][0] == 0).sum() == len(attention)  # each row starts again at position 0
    expected = _loss_grads_metrics(trainer, batch, lambda m, b: DPOTrainer.compute_loss(trainer, m, b))
    ours = _loss_grads_metrics(trainer, batch, trainer.compute_loss)
    assert trainer.loss_path == "labelled_positions"
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-5, atol=1e-6)
    for name, grad in expected[1].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_rows_that_are_not_right_padded_prefixes_are_not_packed():
    from pipeline.stages.fast_loss import _packed

    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 8, 9]])
    completion = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1]])
    assert _packed({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
                    "completion_mask": completion}) is not None
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert _packed({"input_ids": ids, "attention_mask": left, "completion_mask": completion}) is None
    one_row = {"input_ids": ids[1:], "attention_mask": torch.ones(1, 4, dtype=torch.long), "completion_mask": completion[1:]}
    assert _packed(one_row) is None  # nothing to remove
    assert _packed({"input_ids": ids, "completion_mask": completion}) is None  # no mask: keep the rows
