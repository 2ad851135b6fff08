"""The SFT trainer's head for the trainable turn-token rows equals peft's wrapper: loss, gradients, saved adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import lora_output_dtypes, relative_difference
from datasets import Dataset
from peft import LoraConfig, PeftModel
from trl import SFTConfig

from pipeline.config import MODEL_DEFAULTS
from pipeline.lm_head import trained_token_rows
from pipeline.models import load_tokenizer, template_token_ids
from pipeline.stages.sft import LabelledPositionsSFTTrainer

CONVERSATIONS = [[{"role": "user", "content": f"Name a fruit ({i})."},
                  {"role": "assistant", "content": f"A pear, {i} times."}] for i in range(4)]


def _build(tmp_path, arch, dtype=torch.float32):
    from conftest import build_tiny_model
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path / "model", arch=arch)
    tokenizer = load_tokenizer({**MODEL_DEFAULTS, "name_or_path": str(model_dir), "chat_template": "gemma"})
    trainer = LabelledPositionsSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
        args=SFTConfig(output_dir=str(tmp_path / "out"), assistant_only_loss=True, use_cpu=True,
                       bf16=dtype == torch.bfloat16, report_to="none", per_device_train_batch_size=2, max_steps=1,
                       save_strategy="no"),
        train_dataset=Dataset.from_list([{"messages": c} for c in CONVERSATIONS]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0,
                               trainable_token_indices=template_token_ids(tokenizer)),
    )
    torch.manual_seed(0)
    for name, param in trainer.model.named_parameters():  # LoRA B starts at zero, the rows at their base values
        if "lora_B" in name or "trainable_tokens_delta" in name:
            param.data.add_(torch.randn_like(param) * 0.2)
    trainer.model_dir = model_dir
    return trainer


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def trainer(request, tmp_path):
    return _build(tmp_path, request.param)


def _loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_turn_token_rows_head_gives_the_wrappers_loss_and_gradients(trainer):
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    rows = trained_token_rows(model)
    assert rows is not None and rows.embedding is not None  # the two-part head and the lookup are under test
    assert (batch["input_ids"].unsqueeze(-1) == rows.rows).any()  # the batch holds turn tokens
    expected = _loss_and_grads(model, lambda: model(**batch, use_cache=False).loss)
    ours = _loss_and_grads(model, lambda: trainer.compute_loss(model, dict(batch)))
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-5, atol=1e-6)
    assert any("trainable_tokens_delta" in n for n in expected[1])
    for name, grad in expected[1].items():
        assert grad.abs().sum() > 0, name
        # float32 rounding only: the head sees the labelled (row, position)s gathered, not the rows' union
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_under_bf16_mixed_precision_the_loss_runs_as_the_models_autocast_forward(tmp_path):
    # bf16=True: accelerate runs the model's forward under CPU autocast (float32 adapters, bf16 products); the
    # two-part head calls the decoder itself and must run under the same autocast, or it computes the adapters in
    # float32: another loss (and a slower one)
    trainer = _build(tmp_path, "gemma3", dtype=torch.bfloat16)
    assert trainer.accelerator.native_amp
    model = trainer.accelerator.prepare_model(trainer.model)  # as Trainer.train wraps it
    batch = next(iter(trainer.get_train_dataloader()))
    theirs, their_dtypes = lora_output_dtypes(
        model, lambda: _loss_and_grads(model, lambda: model(**batch, use_cache=False).loss))
    ours, our_dtypes = lora_output_dtypes(
        model, lambda: _loss_and_grads(model, lambda: trainer.compute_loss(model, dict(batch))))
    assert our_dtypes == their_dtypes == {torch.bfloat16}
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=5e-5)  # measured 4e-6
    assert relative_difference(ours[1], theirs[1]) < 0.02  # measured 0.9 %: bf16 rounding in the head


def test_under_autocast_peft_s_input_cast_is_skipped_with_the_same_loss_and_gradients_bit_for_bit(tmp_path):
    # float32 adapters on bf16 weights: peft casts each LoRA input to float32 and autocast casts it back to bf16;
    # mixed_precision skips that round trip, which must change nothing at all
    from peft.tuners.tuners_utils import BaseTunerLayer

    from pipeline.lm_head import labelled_nll

    trainer = _build(tmp_path, "gemma3", dtype=torch.bfloat16)
    model = trainer.accelerator.prepare_model(trainer.model)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    batch = next(iter(trainer.get_train_dataloader()))

    def with_peft_cast():
        with trainer.accelerator.autocast():
            _, nll, count = labelled_nll(model, dict(batch))
        return nll / count

    cast_seen = []
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "lora_A")]
    hook = layers[0].register_forward_pre_hook(lambda m, args: cast_seen.append(m.cast_input_dtype_enabled))
    theirs = _loss_and_grads(model, with_peft_cast)
    ours = _loss_and_grads(model, lambda: trainer.compute_loss(model, dict(batch)))
    hook.remove()
    assert cast_seen == [True, False]  # the switch was off inside our loss only ...
    assert all(m.cast_input_dtype_enabled for m in layers)  # ... and is back on after it
    assert torch.equal(ours[0], theirs[0])
    assert ours[1].keys() == theirs[1].keys() and all(torch.equal(ours[1][n], g) for n, g in theirs[1].items())


def test_the_trained_rows_save_an_adapter_stock_peft_loads_with_the_same_weights(trainer, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trainer.model_dir), tmp_path / "adapter")
    ours = {n: p for n, p in trainer.model.state_dict().items() if "lora_" in n or "trainable_tokens_delta" in n}
    theirs = loaded.state_dict()
    assert ours and all(torch.equal(p, theirs[n]) for n, p in ours.items())
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits)


def test_without_trainable_rows_the_models_own_head_is_used(tiny_model_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules="all-linear"))
    assert trained_token_rows(plain) is None
    assert trained_token_rows(AutoModelForCausalLM.from_pretrained(tiny_model_dir)) is None
