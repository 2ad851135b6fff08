"""SFT trains on assistant tokens only, the end-of-turn token included, and our CPU loss equals the model's."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from pipeline.config import MODEL_DEFAULTS
from pipeline.models import load_tokenizer
from pipeline.stages.sft import LabelledPositionsSFTTrainer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(params=["chatml", "gemma"])
def first_batch(request, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer({**MODEL_DEFAULTS, "name_or_path": str(tiny_model_dir),
                                "chat_template": request.param})
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, use_cpu=True, bf16=False,
                       report_to="none", per_device_train_batch_size=1),
        train_dataset=Dataset.from_list([{"messages": CONVERSATION}]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=2, target_modules="all-linear"),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    return tokenizer, trainer, batch


def test_only_assistant_answers_and_their_end_of_turn_carry_labels(first_batch):
    tokenizer, _, batch = first_batch
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != -100])
    end = "<|im_end|>" if "<|im_end|>" in tokenizer.chat_template else "<end_of_turn>"
    assert trained == f"Paris.{end}Rome.{end}"
    masked = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label == -100])
    for text in ("Be brief.", "What is the capital of France?", "And of Italy?"):
        assert text in masked
    assert all(label in (-100, i) for i, label in zip(ids, labels, strict=True))


def test_labelled_positions_loss_equals_the_models_own_loss(first_batch):
    _, trainer, batch = first_batch
    model = trainer.model
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        ours = LabelledPositionsSFTTrainer.compute_loss(trainer, model, dict(batch))
    assert torch.allclose(ours, expected, atol=1e-5)
